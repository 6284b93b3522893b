"""The built wheel works outside the checkout: installed (not editable) into a fresh target, then run from an
empty folder, the dataset maker, converter, pretrain, distill, evaluate, export and demo entry points all run,
reading only what the wheel ships (its recipes included)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 300) -> str:
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(map(str, cmd))}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    return p.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    tmp = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    # No build isolation: the venv's setuptools builds it, so the test needs no index.
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(ROOT)], cwd=tmp)
    wheels = list((tmp / "dist").glob("fastvpd-*.whl"))
    assert len(wheels) == 1, wheels
    site = tmp / "site"
    _run([*pip, "install", "--no-deps", "--target", str(site), str(wheels[0])], cwd=tmp)
    # The dependencies come from this venv's site-packages; fastvpd itself only from the fresh target.
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONNOUSERSITE": "1", "CUDA_VISIBLE_DEVICES": ""}
    return wheels[0], env


def test_wheel_ships_the_package_recipes_and_no_checkout_folders(installed: tuple[Path, dict]) -> None:
    wheel, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    recipes = {Path(n).name for n in names if n.startswith("fastvpd/configs/") and n.endswith(".yaml")}
    assert {"demo_digits_pretrain.yaml", "demo_digits_distill.yaml", "vipriors_moco_r50.yaml"} <= recipes
    assert any(n.startswith("fastvpd/convert/") for n in names)
    assert any(n.startswith("fastvpd/datasets/") for n in names)
    assert not any(n.split("/")[0] in ("tests", "data_tools", "benchmarks") for n in names)
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(meta).decode()
    assert "License-Expression: MIT" in text
    assert "Provides-Extra: demo" in text and "Provides-Extra: cpu" in text


@pytest.mark.slow
def test_installed_wheel_runs_every_entry_point_from_an_empty_folder(
    installed: tuple[Path, dict], tmp_path: Path
) -> None:
    _, env = installed
    work = tmp_path / "empty"
    work.mkdir()
    py = [sys.executable]

    where = _run(
        [
            *py,
            "-c",
            "import fastvpd, importlib.util as u; print(fastvpd.__file__); print(u.find_spec('data_tools'))",
        ],
        cwd=work,
        env=env,
    )
    assert str(ROOT) not in where.splitlines()[0] and where.splitlines()[1] == "None", where

    # Every entry point's --help, and the shipped recipes resolved, run as `python -m` would (one child).
    child = (
        "import contextlib, io, json, runpy, sys\n"
        "out = {}\n"
        "for mod, args in json.loads(sys.argv[1]):\n"
        "    sys.argv = [mod, *args]; buf = io.StringIO()\n"
        "    with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):\n"
        "        runpy.run_module(f'fastvpd.{mod}', run_name='__main__', alter_sys=True)\n"
        "    out[mod + ' ' + ' '.join(args)] = buf.getvalue()\n"
        "print(json.dumps(out))\n"
    )
    mods = ("pretrain", "distill", "linear", "evaluate", "export", "demo", "convert")
    calls = [[m, ["--help"]] for m in mods]
    calls += [["pretrain", ["--config", "demo_digits_pretrain", "--print-config"]],
              ["distill", ["--config", "demo_digits_distill", "--print-config"]]]  # fmt: skip
    outs = json.loads(_run([*py, "-c", child, json.dumps(calls)], cwd=work, env=env).splitlines()[-1])
    for key, out in outs.items():
        if key.endswith("--help"):
            assert out.lower().startswith("usage"), (key, out[:300])
        else:
            assert "train:" in out and "data:" in out, (key, out[:300])

    # The converter's command line on a dataset made by the installed package.
    _run([*py, "-m", "fastvpd.datasets.digits", "src"], cwd=work, env=env)
    _run([*py, "-m", "fastvpd.convert", "src", "conv", "--formats", "cache"], cwd=work, env=env)
    assert json.loads((work / "conv" / "manifest.json").read_text())["splits"]["train"]["count"] == 500

    # The demo trains every stage (pretrain, distill, fine-tune, scratch) from the shipped recipes, briefly.
    _run(
        [*py, "-m", "fastvpd.demo", "--out", "demo", "train.max_steps=2", "train.epochs=1"], cwd=work, env=env
    )
    assert json.loads((work / "demo" / "results.json").read_text())
    student = work / "demo" / "seed0" / "distill" / "checkpoints" / "last.pt"

    _run(
        [*py, "-m", "fastvpd.evaluate", str(student), "--data", "conv", "--split", "test", "--out", "ev"],
        cwd=work,
        env=env,
    )
    assert "top1" in json.loads((work / "ev" / "results.json").read_text())
    _run([*py, "-m", "fastvpd.export", str(student), "exported"], cwd=work, env=env)
    for suffix in (".pt", ".safetensors", ".json"):
        assert (work / f"exported{suffix}").is_file(), suffix

"""Config and data mistakes through the real CLIs: one stderr line naming the key (or file) and the fix,
exit code 2, no traceback; plus the in-process messages of fastvpd.config. See RELIABILITY.md."""

from __future__ import annotations

import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fastvpd import config
from fastvpd.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.arch=resnet18",
    "model.small_stem=true",
    "aug.res=16",
    "train.device=cpu",
    "train.batch_size=16",
    "moco.queue_size=64",
    "moco.mlp_hidden=16",
    "moco.bn_splits=2",
    "eval.knn_every=0",
    "log.tensorboard=false",
    "log.progress=false",
]


def _cli(module: str, args: list[str], timeout: float = 240) -> tuple[int, str]:
    r = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return r.returncode, r.stderr


def _run_all(cases: list[tuple[str, list[str]]], subprocess_first: int = 1) -> list[tuple[int, str]]:
    """The first `subprocess_first` cases through `python -m MODULE` (the real CLI: exit code, stderr, no
    traceback); the rest through the same `main` in this process (each subprocess pays ~5-12 s of torch
    imports on a 2-core box)."""
    import contextlib
    import importlib
    import io

    def in_process(module: str, args: list[str]) -> tuple[int, str]:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                importlib.import_module(module).main(args)
                rc = 0
            except SystemExit as e:
                rc = int(e.code or 0)
        return rc, err.getvalue()

    with ThreadPoolExecutor(max_workers=2) as ex:
        futs = [ex.submit(_cli, *c) for c in cases[:subprocess_first]]
        rest = [in_process(*c) for c in cases[subprocess_first:]]
        return [f.result() for f in futs] + rest


def _one_line(rc: int, err: str, *words: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert rc == 2, (rc, err)
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


# ------------------------------------------------------------------------------------------------ in-process
@pytest.mark.parametrize(
    "argv, words",
    [
        (["train.batchsize=3"], ["'train.batchsize'", "did you mean 'train.batch_size'"]),
        (["train.lr=0.1"], ["'train.lr'", "did you mean 'optim.lr'"]),
        (["log.evry=3"], ["did you mean 'log.every'"]),
        (["a.b.c=1"], ["'a.b.c'", "section one of"]),
        (["train=3"], ["train is a section", "train."]),
        (["train.batch_size.x=1"], ["train.batch_size is a single value"]),
        (["train.batch_size=abc"], ["train.batch_size=abc", "whole number", "train.batch_size=256"]),
        (["train.deterministic=maybe"], ["train.deterministic", "true/false"]),
        (["optim.milestones=[a]"], ["optim.milestones", "list of whole numbers"]),
        (["data.backend=ffvc"], ["data.backend", "did you mean 'ffcv'"]),
        (["moco.queue_size=16", "train.batch_size=32"], ["moco.queue_size=16", "raise moco.queue_size"]),
        (["train.max_steps=0"], ["train.max_steps", "-1"]),
        (["ckpt.keep=-1"], ["ckpt.keep must be >= 0"]),
        (["stray"], ["unexpected argument 'stray'"]),
    ],
)
def test_config_messages_name_the_key_and_the_fix(argv: list[str], words: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        config.load(config.PretrainRun, argv)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


def test_yaml_mistakes_name_the_file_and_full_key(tmp_path: Path) -> None:
    y = tmp_path / "run.yaml"
    y.write_text("train:\n  batchsize: 3\n")
    with pytest.raises(
        ConfigError, match=r"'train.batchsize' in .*run.yaml: did you mean 'train.batch_size'"
    ):
        config.load(config.PretrainRun, ["--config", str(y)])
    y.write_text("train: [1\n")
    with pytest.raises(ConfigError, match="could not read the config"):
        config.load(config.PretrainRun, ["--config", str(y)])
    y.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        config.load(config.PretrainRun, ["--config", str(y)])
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(config.PretrainRun, ["--config", str(tmp_path / "nope.yaml")])


def test_valid_configs_still_load(tmp_path: Path) -> None:
    y = tmp_path / "ok.yaml"
    y.write_text("train:\n  batch_size: 64\noptim:\n  milestones: [3, 6]\n")
    cfg = config.load(config.PretrainRun, ["--config", str(y), "moco.queue_size=128", "train.epochs=2"])
    assert cfg.train.batch_size == 64 and list(cfg.optim.milestones) == [3, 6] and cfg.moco.queue_size == 128
    for schema in (config.DistillRun, config.LinearRun):
        config.load(schema, ["train.epochs=1"])
    for name in ("demo_digits_pretrain", "demo_digits_distill", "demo_digits_linear"):
        path = ROOT / "configs" / f"{name}.yaml"  # the checkout's configs/ link to the packaged recipes
        schema = {"pretrain": config.PretrainRun, "distill": config.DistillRun, "linear": config.LinearRun}
        config.load(schema[name.rsplit("_", 1)[1]], ["--config", str(path)])
    # the paper's GPU recipes load by name too, compiled and captured
    for name, schema in (
        ("vipriors_moco_r50", config.PretrainRun),
        ("vipriors_distill_r50", config.DistillRun),
        ("vipriors_distill_tricks", config.DistillRun),
    ):
        cfg = config.load(schema, ["--config", name])
        assert cfg.train.compile and cfg.train.cuda_graph and cfg.data.root == "data/vipriors_converted", name


def test_suggest_key() -> None:
    from fastvpd.cli import suggest_key

    keys = ["train.batch_size", "optim.lr", "log.every", "ckpt.every", "eval.every"]
    assert suggest_key("train.batchsize", keys) == "train.batch_size"
    assert suggest_key("ckpt.evry", keys) == "ckpt.every"  # same section preferred
    assert suggest_key("zzz.qqq", keys) is None


# ------------------------------------------------------------------------------------------- the real CLIs
def test_cli_config_and_data_mistakes_exit_2_one_line(digits_converted: Path, tmp_path: Path) -> None:
    data = f"data.root={digits_converted}"
    out = f"train.out_dir={tmp_path / 'run'}"
    cases = [
        ("fastvpd.pretrain", [data, out, *TINY, "train.batchsize=8"]),
        ("fastvpd.pretrain", [data, out, *TINY, "train.batch_size=lots"]),
        ("fastvpd.pretrain", [f"data.root={tmp_path / 'missing'}", out, *TINY]),
        ("fastvpd.pretrain", [data, out, *TINY, "train.batch_size=1024", "moco.queue_size=2048"]),
        ("fastvpd.pretrain", [data, out, *TINY, "moco.queue_size=8"]),
        ("fastvpd.distill", [data, out, "train.device=cpu", "distill.teacher_bn=frozen"]),
    ]
    results = _run_all(cases)
    _one_line(*results[0], "'train.batchsize'", "did you mean 'train.batch_size'")
    _one_line(*results[1], "train.batch_size=lots", "whole number")
    _one_line(*results[2], "no manifest.json", "fastvpd.convert")
    _one_line(*results[3], "larger than the 500 training samples", "lower train.batch_size")
    _one_line(*results[4], "moco.queue_size=8", "raise moco.queue_size")
    _one_line(*results[5], "distill.teacher_bn", "train, eval")


def test_cli_catches_stale_partial_or_foreign_data(
    digits_converted: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A truncated cache, an altered header, an altered tail (full mode) and a .beton of another dataset."""
    from PIL import Image

    from fastvpd.convert import convert

    roots = {}
    for name in ("trunc", "header", "tail", "beton"):
        roots[name] = tmp_path / name
        shutil.copytree(digits_converted, roots[name])
    pix = "train/cache/pixels.npy"
    p = roots["trunc"] / pix
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    p = roots["header"] / pix
    b = bytearray(p.read_bytes())
    b[200] ^= 0xFF
    p.write_bytes(bytes(b))
    p = roots["tail"] / pix
    b = bytearray(p.read_bytes())
    b[-5] ^= 0xFF
    p.write_bytes(bytes(b))
    other_src = tmp_path_factory.mktemp("other_src")  # another dataset, converted to FFCV
    for c in ("x", "y"):
        (other_src / "train" / c).mkdir(parents=True)
        for i in range(20):
            Image.new("RGB", (32, 32), (i * 10, 40 if c == "x" else 200, 90)).save(
                other_src / "train" / c / f"{i}.png"
            )
    other = tmp_path / "other_conv"
    convert(other_src, other, formats=("ffcv",), workers=1, progress=False)
    shutil.copy(other / "train" / "train.beton", roots["beton"] / "train" / "train.beton")

    run = [f"train.out_dir={tmp_path / 'run'}", *TINY]
    cases = [
        ("fastvpd.pretrain", [f"data.root={roots['trunc']}", *run]),
        (
            "fastvpd.distill",
            [f"data.root={roots['header']}", f"train.out_dir={tmp_path / 'd'}", "train.device=cpu"],
        ),
        ("fastvpd.pretrain", [f"data.root={roots['tail']}", "data.verify=full", *run]),
        ("fastvpd.pretrain", [f"data.root={roots['beton']}", "data.backend=ffcv", *run]),
    ]
    results = _run_all(cases)
    _one_line(*results[0], "pixels.npy", "partial or stale", "--formats cache --force")
    _one_line(*results[1], "pixels.npy", "header hash", "--force")
    _one_line(*results[2], "pixels.npy", "content hash", "--force")
    _one_line(*results[3], "train.beton", "--formats ffcv --force")
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any training


def test_string_fields_take_override_values_verbatim() -> None:
    """YAML would read `off` as False and an empty value as null; for str fields the user means a string."""
    cfg = config.load(config.DistillRun, ["data.verify=off", "distill.teacher=", "train.out_dir=it's here"])
    assert cfg.data.verify == "off" and cfg.distill.teacher == "" and cfg.train.out_dir == "it's here"
    with pytest.raises(config.ConfigError, match="train.epochs"):
        config.load(config.DistillRun, ["train.epochs=off"])

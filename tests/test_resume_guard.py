"""Resuming against a changed config: a one-line refusal (exit 2) naming the keys and the way out, never a
state_dict traceback or a silent pick of the old checkpoint; the keys in engine.RESUME_SAFE may change; a
restart from step 0 for want of a valid checkpoint is said. See RELIABILITY.md."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from tiny_data import converted_tree

from fastvpd import checkpoint, distill, pretrain
from fastvpd.engine import RESUME_SAFE

COMMON = [
    "model.arch=resnet18",
    "model.small_stem=true",
    "aug.res=8",
    "train.batch_size=12",
    "train.epochs=2",
    "train.max_steps=1",
    "train.device=cpu",
    "train.amp=none",
    "log.every=1",
    "log.tensorboard=false",
    "log.progress=false",
]
MOCO = ["moco.queue_size=24", "moco.mlp_hidden=16", "moco.dim=8", "moco.bn_splits=2", "eval.knn_every=0"]
SCRATCH = ["model.init=random", "distill.kind=none", "eval.every=0"]  # no teacher file needed


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 classes x 12 train / 3 val 10-px images, converted to the cache."""
    return converted_tree(tmp_path_factory, "guard", {"train": 12, "val": 3}, classes=2, size=10)


@pytest.fixture(scope="module")
def runs(data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One pretraining and one from-scratch distillation run folder, each stopped after 1 step."""
    base = tmp_path_factory.mktemp("guard_runs")
    pre = pretrain.main([f"data.root={data}", f"train.out_dir={base / 'pre'}", *COMMON, *MOCO])
    dis = distill.main([f"data.root={data}", f"train.out_dir={base / 'dis'}", *COMMON, *SCRATCH])
    return {"pre": Path(pre), "dis": Path(dis)}


def _refused(capsys: pytest.CaptureFixture[str], main, argv: list[str]) -> str:  # type: ignore[no-untyped-def]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error:") and "\n" not in err, err
    return err


@pytest.mark.parametrize("change", ["model.arch=resnet34", "moco.queue_size=36", "model.small_stem=false"])
def test_pretrain_rerun_with_a_changed_model_is_refused_in_one_line(
    data: Path, runs: dict[str, Path], capsys: pytest.CaptureFixture[str], change: str
) -> None:
    before = (runs["pre"] / "checkpoints" / "last.pt").read_bytes()
    argv = [f"data.root={data}", f"train.out_dir={runs['pre']}", *COMMON, *MOCO, "train.max_steps=2", change]
    err = _refused(capsys, pretrain.main, argv)
    key = change.split("=")[0]
    assert f"{key} (" in err and "another train.out_dir" in err and "train.epochs" in err  # the allowed keys
    assert (runs["pre"] / "checkpoints" / "last.pt").read_bytes() == before  # nothing touched


def test_distill_rerun_with_another_arch_is_refused(
    data: Path, runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [f"data.root={data}", f"train.out_dir={runs['dis']}", *COMMON, *SCRATCH, "model.arch=resnet34"]
    err = _refused(capsys, distill.main, argv)
    assert "model.arch ('resnet18' -> 'resnet34')" in err and "another train.out_dir" in err


def test_resume_from_a_path_of_another_arch_is_refused(
    data: Path, runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ck = runs["pre"] / "checkpoints" / "last.pt"
    argv = [f"data.root={data}", f"train.out_dir={tmp_path / 'new'}", *COMMON, *MOCO, "model.arch=resnet34",
            f"train.resume={ck}"]  # fmt: skip
    err = _refused(capsys, pretrain.main, argv)
    assert "model.arch" in err and "train.resume=never" in err and str(ck) in err


def test_safe_keys_may_change_on_resume_and_are_said(
    data: Path, runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert {"train.epochs", "train.max_steps", "log.", "ckpt.", "eval.", "data.workers"} <= set(RESUME_SAFE)
    run = tmp_path / "pre"
    shutil.copytree(runs["pre"], run)
    capsys.readouterr()
    pretrain.main([f"data.root={data}", f"train.out_dir={run}", *COMMON, *MOCO, "train.max_steps=2",
                   "train.epochs=3", "log.every=2", "optim.lr=0.01", "eval.knn_k=5"])  # fmt: skip
    out = capsys.readouterr().out
    assert "resumed from" in out and "train.epochs: 2 -> 3" in out and "optim.lr: 0.03 -> 0.01" in out
    assert checkpoint.load(run / "checkpoints" / "last.pt")["progress"]["global_step"] == 2


def test_restart_from_step_0_for_want_of_a_valid_checkpoint_is_said(
    data: Path, runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "dis"
    shutil.copytree(runs["dis"], run)
    for p in (run / "checkpoints").glob("*.pt"):
        p.write_bytes(p.read_bytes()[:100])  # torn: no valid checkpoint left
    capsys.readouterr()
    distill.main([f"data.root={data}", f"train.out_dir={run}", *COMMON, *SCRATCH])
    out = capsys.readouterr().out
    assert [ln for ln in out.splitlines() if "starts from step 0" in ln] != []
    assert "resumed from" not in out
    assert checkpoint.load(run / "checkpoints" / "last.pt")["progress"]["global_step"] == 1

"""The Python API: `fastvpd.pretrain.run`, `distill.run` and `linear.run` take a config object, a mapping
of overrides or argv, and return the run's result (run directory, last checkpoint, final metrics)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fastvpd import checkpoint, config, distill, linear, pretrain

# the cheapest real runs: ResNet-18 at 16 px, two steps of a batch of 16
TINY = {
    "model.arch": "resnet18",
    "aug.res": 16,
    "train.batch_size": 16,
    "train.epochs": 1,
    "train.max_steps": 2,
    "train.device": "cpu",
    "train.deterministic": True,
    "log.every": 1,
    "log.progress": False,
    "log.tensorboard": False,
}
MOCO = {
    "moco.queue_size": 64,
    "moco.mlp_hidden": 16,
    "moco.dim": 16,
    "moco.bn_splits": 2,
    "eval.knn_every": 0,
}


def _last_row(run: Path) -> dict:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][-1]


def _check(result, out: Path, steps: int = 2) -> None:  # type: ignore[no-untyped-def]
    assert result.run_dir == out and result.stopped == "max_steps" and result.global_step == steps
    assert result.last_checkpoint == out / "checkpoints" / "last.pt" and result.last_checkpoint.is_file()
    assert checkpoint.load(result.last_checkpoint)["progress"]["global_step"] == steps
    assert result.metrics["loss"] == pytest.approx(_last_row(out)["loss"])  # the last logged window


def test_pretrain_run_takes_a_mapping_a_config_object_or_argv(digits_converted: Path, tmp_path: Path) -> None:
    over = {"data.root": str(digits_converted), **TINY, **MOCO}
    a = pretrain.run({**over, "train.out_dir": str(tmp_path / "map")})
    _check(a, tmp_path / "map")
    cfg = config.resolve(config.PretrainRun, {**over, "train.out_dir": str(tmp_path / "obj")})
    _check(pretrain.run(cfg), tmp_path / "obj")  # OmegaConf config
    dc = OmegaConf.to_object(cfg)
    dc.train.out_dir = str(tmp_path / "dc")
    _check(pretrain.run(dc), tmp_path / "dc")  # the dataclass
    argv = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in over.items()]
    _check(pretrain.run(argv=[*argv, f"train.out_dir={tmp_path / 'argv'}"]), tmp_path / "argv")
    # the same seed and settings: the same first steps in every form
    rows = [_last_row(tmp_path / d) for d in ("map", "obj", "dc", "argv")]
    assert all(r["loss"] == rows[0]["loss"] for r in rows)
    with pytest.raises(config.ConfigError, match="did you mean 'train.epochs'"):
        pretrain.run({**over, "train.epoch": 1})


def test_distill_and_linear_run_from_python(digits_converted: Path, tmp_path: Path) -> None:
    pre = pretrain.run(
        {"data.root": str(digits_converted), "train.out_dir": str(tmp_path / "pre"), **TINY, **MOCO}
    ).last_checkpoint
    common = {"data.root": str(digits_converted), **TINY, "eval.every": 1}
    d = distill.run(
        {
            **common,
            "train.out_dir": str(tmp_path / "d"),
            "distill.teacher": str(pre),
            "distill.start_epoch": 1,
        },
        argv=["--config", "demo_digits_distill"],
    )
    _check(d, tmp_path / "d")
    assert {"loss", "ce", "distill"} <= set(d.metrics)
    lin = config.LinearRun()
    lin.data.root, lin.linear.backbone, lin.train.out_dir = (
        str(digits_converted),
        str(pre),
        str(tmp_path / "l"),
    )
    lin.model.arch, lin.aug.res, lin.train.batch_size, lin.train.device = "resnet18", 16, 16, "cpu"
    lin.train.epochs, lin.log.progress, lin.log.tensorboard = 1, False, False
    result = linear.run(lin)  # a whole epoch: the final metrics carry the validation
    assert result.stopped == "done" and result.last_checkpoint.is_file()
    assert 0.0 <= result.metrics["val_top1"] <= 100.0 and "loss" in result.metrics

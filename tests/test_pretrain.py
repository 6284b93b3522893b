"""End-to-end `python -m fastvpd.pretrain` on the digits: exact resume, SIGTERM, export, learning."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastvpd import checkpoint, pretrain
from fastvpd.export import export
from fastvpd.models import build_backbone

ROOT = Path(__file__).resolve().parents[1]
TIMING = {"samples_per_s", "data_wait"}
# ResNet-18 with the standard stem at 16 px is the cheapest real MoCo this code supports on 2 CPU cores.
TINY = [
    "model.arch=resnet18",
    "model.small_stem=false",
    "aug.res=16",
    "train.batch_size=16",
    "moco.queue_size=64",
    "moco.mlp_hidden=64",
    "moco.dim=32",
    "moco.bn_splits=2",
    "train.epochs=2",
    "train.deterministic=true",
    "train.device=cpu",
    "log.every=2",
    "log.progress=false",
    "log.tensorboard=false",
    "eval.knn_every=0",
    "ckpt.every=1",
]


def _run(conv: Path, out: Path, *extra: str) -> Path:
    return pretrain.main([f"data.root={conv}", f"train.out_dir={out}", *TINY, *extra])


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def test_resume_mid_epoch_is_bit_exact(digits_converted: Path, tmp_path: Path) -> None:
    ref = _run(digits_converted, tmp_path / "ref", "train.max_steps=4")
    _run(digits_converted, tmp_path / "cut", "train.max_steps=2")  # stops mid-epoch (31 steps/epoch)
    cut = _run(digits_converted, tmp_path / "cut", "train.max_steps=4")  # resume=auto
    a = checkpoint.load(ref / "checkpoints" / "last.pt")
    b = checkpoint.load(cut / "checkpoints" / "last.pt")
    assert a["progress"] == b["progress"] and a["progress"]["global_step"] == 4
    for k, v in a["task"]["model"].items():  # both encoders, queue, queue_ptr
        assert torch.equal(v, b["task"]["model"][k]), k
    assert int(a["task"]["model"]["queue_ptr"]) == (4 * 16) % 64 == 0
    for sa, sb in zip(a["task"]["optimizer"]["state"].values(), b["task"]["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert _metrics(ref) == _metrics(cut) and len(_metrics(ref)) == 2
    # export: the query backbone loads into a plain backbone and reproduces the checkpoint's weights
    sd = export(ref / "checkpoints" / "last.pt", tmp_path / "backbone.pt").state_dict
    net = build_backbone("resnet18")
    missing, unexpected = net.load_state_dict(
        torch.load(tmp_path / "backbone.pt", weights_only=True), strict=False
    )
    assert not missing and not unexpected
    assert torch.equal(sd["conv1.weight"], a["task"]["model"]["encoder_q.backbone.conv1.weight"])


def test_sigterm_saves_and_exits_zero(digits_converted: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "fastvpd.pretrain",
        f"data.root={digits_converted}",
        f"train.out_dir={out}",
        *TINY,
        "train.epochs=50",
        "log.every=1",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and metrics.read_text().strip():
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0]
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, log
    assert "stopped (SIGTERM)" in log
    state = checkpoint.load(out / "checkpoints" / "last.pt")
    assert 1 <= state["progress"]["global_step"] < 50 * 31


def test_bad_config_is_exit_2(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as e:
        pretrain.main([f"train.out_dir={tmp_path}", "train.nonsense=1"])
    assert e.value.code == 2


def test_views_rendered_in_the_step_train_bit_identically(
    digits_converted: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache backend's step renders the views from indices + seed (on a GPU inside the step's CUDA
    graph); the same draws as the loader rendering them: the same weights, bit for bit."""
    from fastvpd import distill

    steps = ["train.max_steps=3", "train.epochs=1"]
    in_step = _run(digits_converted, tmp_path / "step", *steps)
    assert "inside the training step" in capsys.readouterr().out
    common = [
        f"data.root={digits_converted}", "model.arch=resnet18", "aug.res=16", "train.batch_size=16",
        "train.device=cpu", "train.deterministic=true", "train.epochs=1", "train.max_steps=2",
        "distill.start_epoch=0", "eval.every=0", "log.progress=false", "log.tensorboard=false",
        f"distill.teacher={in_step / 'checkpoints' / 'last.pt'}",
    ]  # fmt: skip
    db = distill.main([*common, f"train.out_dir={tmp_path / 'd_step'}"])
    capsys.readouterr()
    for module in (pretrain, distill):  # the loader renders the views instead (the benchmarks' hook)
        monkeypatch.setattr(module, "views_in_step", lambda *a: False)
    loader_side = _run(digits_converted, tmp_path / "loader", *steps)
    assert "inside the training step" not in capsys.readouterr().out
    a = checkpoint.load(loader_side / "checkpoints" / "last.pt")["task"]["model"]
    b = checkpoint.load(in_step / "checkpoints" / "last.pt")["task"]["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _metrics(loader_side) == _metrics(in_step)
    # distillation: one view rendered in the step, same student
    da = distill.main([*common, f"train.out_dir={tmp_path / 'd_loader'}"])
    sa = checkpoint.load(da / "checkpoints" / "last.pt")["task"]["classifier"]["state_dict"]
    sb = checkpoint.load(db / "checkpoints" / "last.pt")["task"]["classifier"]["state_dict"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)

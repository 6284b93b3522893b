"""CUDA-graph MoCo step: same numbers as eager (bf16 tolerance), and no host sync inside a replay."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fastvpd.config import OptimConfig
from fastvpd.moco import MoCo
from fastvpd.optim import build_sgd
from fastvpd.step import MOCO_METRICS, DeviceMeters, GraphedStep, Precision, moco_step, pin_lr

pytestmark = pytest.mark.cuda
B, RES, STEPS = 32, 32, 7


def _setup(
    graph: bool, logs: list[str], overlap: bool = False
) -> tuple[MoCo, torch.Tensor, GraphedStep, DeviceMeters]:
    dev = torch.device("cuda")
    torch.manual_seed(0)
    # bn_splits=1: the split-BN key shuffle draws random numbers, whose stream differs under graph replay
    model = MoCo(
        "resnet18", dim=32, mlp_hidden=128, queue_size=256, momentum=0.9, bn_splits=1, small_stem=True
    )
    model = model.to(dev).to(memory_format=torch.channels_last)
    lr = torch.tensor(0.03, device=dev)
    opt = build_sgd(model.encoder_q.parameters(), OptimConfig(), lr)
    pin_lr(opt, lr)
    meters = DeviceMeters(MOCO_METRICS, dev)
    side = torch.cuda.Stream(dev) if overlap else None
    fn = functools.partial(moco_step, model, opt, Precision("bf16", dev), meters, key_stream=side)
    return model, lr, GraphedStep(fn, enabled=graph, warmup=3, log=logs.append), meters


def _data() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, 2, B, 3, RES, RES, generator=g)
    return x.cuda().to(torch.bfloat16)


def _run(graph: bool, overlap: bool = False) -> tuple[MoCo, list[float], list[str]]:
    logs: list[str] = []
    model, lr, step, meters = _setup(graph, logs, overlap)
    data = _data()
    losses = []
    for s in range(STEPS):
        lr.fill_(0.03 * (1 - s / STEPS))
        v1 = data[s, 0].contiguous(memory_format=torch.channels_last)
        v2 = data[s, 1].contiguous(memory_format=torch.channels_last)
        losses.append(float(step(v1, v2)["loss"]))
    assert meters.read()["steps"] == STEPS
    return model, losses, logs


def _same_training(ref: MoCo, l_ref: list[float], other: MoCo, l_other: list[float]) -> None:
    """Same losses (bf16 tolerance), queue pointer, weights, key encoder, queue and BN statistics."""
    assert l_ref == pytest.approx(l_other, rel=2e-2, abs=2e-2)
    sr, so = ref.state_dict(), other.state_dict()
    assert torch.equal(sr["queue_ptr"], so["queue_ptr"])
    for k, v in sr.items():
        if v.is_floating_point():
            assert torch.allclose(v.float(), so[k].float(), rtol=5e-2, atol=5e-3), k


def test_graph_matches_eager() -> None:
    eager, l_e, _ = _run(False)
    graphed, l_g, logs = _run(True)
    assert any("captured" in m for m in logs), logs
    _same_training(eager, l_e, graphed, l_g)


@pytest.mark.parametrize("graph", [False, True])
def test_key_encoder_on_a_second_stream_trains_the_same(graph: bool) -> None:
    """Pretraining's key_stream: the momentum update and key forward on a side stream, eager and captured,
    give the sequential step's training (same kernels, scheduled concurrently)."""
    seq, l_s, _ = _run(False)
    ovl, l_o, logs = _run(graph, overlap=True)
    assert not graph or any("captured" in m for m in logs), logs
    _same_training(seq, l_s, ovl, l_o)


def test_replay_has_no_host_sync() -> None:
    logs: list[str] = []
    model, lr, step, meters = _setup(True, logs)
    data = _data()
    views = [
        (
            data[s, 0].contiguous(memory_format=torch.channels_last),
            data[s, 1].contiguous(memory_format=torch.channels_last),
        )
        for s in range(STEPS)
    ]
    for s in range(4):  # warm-up + capture
        step(*views[s])
    assert step.captured, logs
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for s in range(4, STEPS):
            lr.fill_(0.01)
            step(*views[s])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert meters.read()["steps"] == STEPS


def test_pretrain_on_gpu_captures(
    digits_converted: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from fastvpd import checkpoint, pretrain

    run = pretrain.main(
        [
            f"data.root={digits_converted}",
            f"train.out_dir={tmp_path}",
            "model.arch=resnet18",
            "model.small_stem=true",
            "aug.res=32",
            "train.batch_size=64",
            "moco.queue_size=256",
            "moco.mlp_hidden=128",
            "train.epochs=2",
            "train.max_steps=10",
            "log.every=5",
            "log.progress=false",
            "eval.knn_every=1",
        ]
    )
    out = capsys.readouterr().out
    assert "cuda graph: captured" in out and "augmentation rendered inside the training step" in out
    assert checkpoint.load(run / "checkpoints" / "last.pt")["progress"]["global_step"] == 7 + 3


@pytest.mark.parametrize("kernel", ["torch", "auto"])
def test_graph_captures_the_cache_augmentation_with_its_generator(
    digits_converted: Path, replay_views: Callable, kernel: str
) -> None:
    """Views rendered in the step on a GPU: the cache loader's augmentation replayed from a CUDA graph, its
    generator registered with the graph and re-seeded per batch on the host, gives the loader's own views;
    with the torch ops and with the default kernel choice (`auto`: the Triton kernels on a GPU)."""
    import itertools

    from fastvpd.config import DataConfig
    from fastvpd.data import build_loader, moco_v2

    cfg = DataConfig(root=str(digits_converted), backend="cache")
    plain = build_loader(cfg, moco_v2(RES), "train", B, "cuda", torch.bfloat16, seed=5, aug_kernel=kernel)
    deferred = build_loader(cfg, moco_v2(RES), "train", B, "cuda", torch.bfloat16, seed=5, aug_kernel=kernel)
    assert deferred.defer_views() == ""
    logs: list[str] = []

    def render(indices: torch.Tensor) -> dict[str, torch.Tensor]:
        v1, v2 = deferred.augment(indices)
        return {"v1": v1, "v2": v2}

    step = GraphedStep(render, enabled=True, warmup=2, log=logs.append, generators=deferred.generators)
    plain.set_epoch(1)
    deferred.set_epoch(1)
    pairs = list(itertools.islice(zip(plain, deferred), STEPS))
    for k, (a, b) in enumerate(pairs):
        out = replay_views(deferred, step, b, strict=k >= 4)  # after warm-up and capture: no host sync
        for name, want in zip(("v1", "v2"), a.views):
            got = out[name]
            assert got.is_contiguous(memory_format=torch.channels_last) and got.dtype == torch.bfloat16
            torch.testing.assert_close(got, want, atol=0.02, rtol=0)  # a bf16 ulp at most
            assert (got != want).float().mean().item() < 1e-3, (k, name)
    assert step.captured, logs

"""SGD construction and learning-rate schedules (step schedules against the authors' and MoCo's rules)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from fastvpd import checkpoint, config
from fastvpd.config import ConfigError, OptimConfig
from fastvpd.optim import base_lr, build_sgd, lr_at, param_groups
from fastvpd.step import pin_lr

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_param_groups_decay_everything_trainable() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model[2].weight.requires_grad_(False)
    (group,) = param_groups(model, 1e-4)
    assert group["weight_decay"] == 1e-4
    assert len(group["params"]) == 5 and all(p.requires_grad for p in group["params"])


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_sgd_two_steps_match_the_update_rule(nesterov: bool, tensor_lr: bool) -> None:
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(5))
    cfg = OptimConfig(momentum=0.9, weight_decay=0.01, nesterov=nesterov)
    lr = torch.tensor(0.1) if tensor_lr else 0.1
    opt = build_sgd(param_groups(nn.ParameterList([p]), cfg.weight_decay), cfg, lr)
    assert opt.param_groups[0]["foreach"] is True and not opt.param_groups[0]["fused"]  # CPU path
    lr_t = torch.tensor(0.1)
    if tensor_lr:  # the trainers' way: one pinned tensor, filled before each step
        pin_lr(opt, lr_t)
    w, buf = p.detach().clone(), None
    for step, lr_now in enumerate([0.1, 0.05]):
        if tensor_lr:
            lr_t.fill_(lr_now)
        else:
            opt.param_groups[0]["lr"] = lr_now
        g = torch.randn(5)
        p.grad = g.clone()
        opt.step()
        d = g + 0.01 * w
        buf = d.clone() if buf is None else 0.9 * buf + d
        w = w - lr_now * (d + 0.9 * buf if nesterov else buf)
        assert torch.allclose(p.detach(), w, atol=1e-6), step
    if tensor_lr:
        assert isinstance(opt.param_groups[0]["lr"], torch.Tensor) and opt.param_groups[0][
            "lr"
        ].item() == pytest.approx(0.05)


def test_tensor_lr_is_kept_by_identity_when_already_right() -> None:
    lr = torch.tensor(0.1)
    opt = build_sgd([nn.Parameter(torch.zeros(2))], OptimConfig(), lr)
    assert opt.param_groups[0]["lr"] is lr  # the caller may fill_ its own tensor
    opt64 = build_sgd([nn.Parameter(torch.zeros(2))], OptimConfig(), torch.tensor([0.1], dtype=torch.float64))
    assert opt64.param_groups[0]["lr"].dtype == torch.float32 and opt64.param_groups[0]["lr"].dim() == 0


def test_build_sgd_rejects_empty_params() -> None:
    with pytest.raises(ConfigError):
        build_sgd([], OptimConfig(), 0.1)


def test_base_lr_linear_scaling() -> None:
    assert base_lr(OptimConfig(lr=0.03, lr_batch=256), 512) == pytest.approx(0.06)
    assert base_lr(OptimConfig(lr=0.1, lr_batch=256), 64) == pytest.approx(0.025)


def test_cosine_schedule_endpoints_and_shape() -> None:
    cfg = OptimConfig(schedule="cosine")
    spe, epochs, lr0 = 10, 20, 0.3
    total = spe * epochs
    values = [lr_at(s, spe, cfg, lr0, epochs) for s in range(total + 1)]
    assert values[0] == pytest.approx(lr0)
    assert values[total // 2] == pytest.approx(lr0 / 2)
    assert values[total] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(values, values[1:]))
    # Per step, the same curve as MoCo's per-epoch lr*0.5*(1+cos(pi*epoch/epochs)) at epoch boundaries.
    for e in range(epochs):
        assert values[e * spe] == pytest.approx(lr0 * 0.5 * (1 + math.cos(math.pi * e / epochs)))


def _authors_lr(lr: float, epoch: int, every: int = 30) -> float:
    """sup_train_distill/train_selfsup.py: `for epoch in range(1, args.epochs + 1)` and
    `lr = args.lr * (0.1 ** (epoch // 30))` (their epochs count from 1)."""
    return lr * (0.1 ** (epoch // every))


def _lincls_lr(lr: float, epoch: int, schedule: list[int]) -> float:
    """MoCo's main_lincls.py: `for epoch in range(args.start_epoch, args.epochs)` (from 0) and
    `for milestone in args.schedule: lr *= 0.1 if epoch >= milestone else 1.`"""
    for milestone in schedule:
        lr *= 0.1 if epoch >= milestone else 1.0
    return lr


def test_step_every_follows_the_authors_one_based_epochs_epoch_by_epoch() -> None:
    cfg = OptimConfig(schedule="step", step_every=30, step_gamma=0.1)
    spe = 3
    ours = [lr_at(e * spe + i, spe, cfg, 0.1, 100) for e in range(100) for i in range(spe)]
    theirs = [_authors_lr(0.1, e1) for e1 in range(1, 101) for _ in range(spe)]
    assert ours == pytest.approx(theirs, rel=1e-12)
    per_epoch = ours[::spe]
    runs = [sum(1 for v in per_epoch if v == pytest.approx(0.1 * 0.1**j)) for j in range(4)]
    assert runs == [29, 30, 30, 11]  # drops at 0-based epochs 29, 59, 89
    assert lr_at(29 * spe - 1, spe, cfg, 0.1, 100) == pytest.approx(0.1)  # the drop is at the epoch boundary
    assert lr_at(29 * spe, spe, cfg, 0.1, 100) == pytest.approx(0.01)


@pytest.mark.parametrize(
    ("recipe", "every"), [("vipriors_distill_r50.yaml", 30), ("demo_digits_distill.yaml", 4)]
)
def test_distill_recipes_follow_the_authors_rule(recipe: str, every: int) -> None:
    """The recipe's own schedule (and the demo's scaled one) against the authors' formula, epoch by epoch."""
    cfg = config.load(config.DistillRun, ["--config", str(CONFIGS / recipe)])
    assert cfg.optim.schedule == "step" and cfg.optim.step_every == every and not cfg.optim.milestones
    lr0, spe = base_lr(cfg.optim, cfg.train.batch_size), 2
    for e in range(cfg.train.epochs):
        want = lr0 * cfg.optim.step_gamma ** ((e + 1) // every)
        assert want == pytest.approx(_authors_lr(lr0, e + 1, every))
        assert lr_at(e * spe + 1, spe, cfg.optim, lr0, cfg.train.epochs) == pytest.approx(want), e


def test_linear_milestones_follow_moco_lincls_zero_based_epochs() -> None:
    cfg = config.load(config.LinearRun, [])
    assert list(cfg.optim.milestones) == [60, 80] and cfg.train.epochs == 100
    ours = [lr_at(e * 4, 4, cfg.optim, 30.0, 100) for e in range(100)]
    assert ours == pytest.approx([_lincls_lr(30.0, e, [60, 80]) for e in range(100)], rel=1e-12)
    demo = config.load(config.LinearRun, ["--config", str(CONFIGS / "demo_digits_linear.yaml")])
    n = demo.train.epochs
    got = [lr_at(e, 1, demo.optim, 1.0, n) for e in range(n)]
    assert got == pytest.approx([_lincls_lr(1.0, e, list(demo.optim.milestones)) for e in range(n)])


@pytest.mark.slow
def test_a_real_distill_run_logs_and_applies_the_authors_rate(digits_converted: Path, tmp_path: Path) -> None:
    """A tiny real run (2 steps per epoch, x0.1 every 2 epochs): the rate in metrics.jsonl for every step,
    and the rate the optimizer held at each epoch's end (saved in each epoch's checkpoint), against the
    authors' formula applied to the logged 1-based epoch."""
    from fastvpd import distill

    out = tmp_path / "run"
    distill.main(
        ["--config", str(CONFIGS / "demo_digits_distill.yaml"), f"data.root={digits_converted}",
         f"train.out_dir={out}", "model.init=random", "distill.kind=none", "aug.res=16", "train.epochs=5",
         "train.batch_size=250", "optim.step_every=2", "log.every=1", "eval.every=0", "ckpt.every=1",
         "ckpt.keep=10", "log.progress=false", "log.tensorboard=false", "train.device=cpu"]
    )  # fmt: skip
    lr0 = 0.1 * 250 / 256
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [r for r in rows if "lr" in r]
    assert [r["step"] for r in steps] == list(range(1, 11))
    assert [r["epoch"] for r in steps] == [e for e in range(1, 6) for _ in range(2)]
    assert [r["lr"] for r in steps] == pytest.approx([_authors_lr(lr0, r["epoch"], 2) for r in steps])
    held = {}
    for ck in (out / "checkpoints").glob("*.pt"):
        state = checkpoint.load(ck)
        held[state["progress"]["epoch"]] = float(state["task"]["optimizer"]["param_groups"][0]["lr"])
    assert sorted(held) == [1, 2, 3, 4, 5]  # every epoch's periodic checkpoint (keep=10), last.pt among them
    for done, lr in held.items():  # `done` epochs finished = the authors' epoch number of the last step
        assert lr == pytest.approx(_authors_lr(lr0, done, 2), rel=1e-6), done


def test_warmup_then_cosine_and_warmup_with_step() -> None:
    cfg = OptimConfig(schedule="cosine", warmup_epochs=2)
    spe, epochs, lr0 = 10, 10, 1.0
    warm = [lr_at(s, spe, cfg, lr0, epochs) for s in range(20)]
    assert warm[0] == pytest.approx(lr0 / 20) and warm[19] == pytest.approx(lr0)
    assert all(b > a for a, b in zip(warm, warm[1:]))
    assert lr_at(20, spe, cfg, lr0, epochs) == pytest.approx(lr0)  # cosine starts after the warm-up
    assert lr_at(60, spe, cfg, lr0, epochs) == pytest.approx(0.5)  # halfway through the remaining 80 steps
    assert lr_at(100, spe, cfg, lr0, epochs) == pytest.approx(0.0, abs=1e-12)
    step_cfg = OptimConfig(schedule="step", warmup_epochs=1, step_every=3)
    assert lr_at(4, spe, step_cfg, lr0, epochs) == pytest.approx(0.5)
    assert lr_at(30, spe, step_cfg, lr0, epochs) == pytest.approx(0.1)


def test_bad_schedule_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        lr_at(0, 10, OptimConfig(schedule="linear"), 0.1, 10)


@pytest.mark.cuda
def test_fused_sgd_with_tensor_lr_in_a_cuda_graph() -> None:
    p = nn.Parameter(torch.ones(8, device="cuda"))
    cfg = OptimConfig(momentum=0.9, weight_decay=0.0)
    lr = torch.tensor(0.1, device="cuda")
    opt = build_sgd([p], cfg, lr)
    assert opt.param_groups[0]["fused"] is True
    p.grad = torch.ones_like(p)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm-up creates the momentum buffers outside the graph
            opt.step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        opt.step()
    before = p.detach().clone()
    lr.fill_(0.0)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(p.detach(), before)  # the replay read the new (zero) lr from the tensor
    lr.fill_(0.1)
    g.replay()
    torch.cuda.synchronize()
    assert not torch.equal(p.detach(), before)

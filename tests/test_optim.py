"""SGD construction and learning-rate schedules."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from fastvpd.config import ConfigError, OptimConfig
from fastvpd.optim import base_lr, build_sgd, lr_at, param_groups, set_lr_


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
    w, buf = p.detach().clone(), None
    for step, lr_now in enumerate([0.1, 0.05]):
        set_lr_(opt, lr_now)
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


def test_step_schedule_every_30_epochs_and_milestones() -> None:
    cfg = OptimConfig(schedule="step", step_every=30, step_gamma=0.1)
    spe = 5
    at = {e: lr_at(e * spe, spe, cfg, 0.1, 100) for e in (0, 29, 30, 59, 60, 90, 99)}
    assert at[0] == at[29] == pytest.approx(0.1)
    assert at[30] == at[59] == pytest.approx(0.01)
    assert at[60] == pytest.approx(0.001) and at[90] == at[99] == pytest.approx(1e-4)
    assert lr_at(30 * spe - 1, spe, cfg, 0.1, 100) == pytest.approx(0.1)  # drops at the epoch boundary
    ms = OptimConfig(schedule="step", milestones=[60, 80], step_gamma=0.1)
    assert [lr_at(e * spe, spe, ms, 30.0, 100) for e in (59, 60, 79, 80)] == pytest.approx(
        [30.0, 3.0, 3.0, 0.3]
    )


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
    set_lr_(opt, 0.0)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(p.detach(), before)  # the replay read the new (zero) lr from the tensor
    set_lr_(opt, 0.1)
    g.replay()
    torch.cuda.synchronize()
    assert not torch.equal(p.detach(), before)

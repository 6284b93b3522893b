"""SGD and the learning-rate schedules (pure functions of the step, so resume is exact).

The schedule is evaluated on the host (`lr_at`, a float). Each trainer gives its optimizer one 0-d lr tensor
(`fastvpd.step.pin_lr`, again after `load_state_dict`, which replaces the groups' lr) and `fill_`s it
before every step; the fill runs outside a captured CUDA graph and the fused SGD kernel reads the tensor
inside it, so a replay uses the new rate.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from fastvpd.config import ConfigError, OptimConfig

__all__ = ["param_groups", "build_sgd", "base_lr", "lr_at"]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """One group of all trainable parameters with `weight_decay`.

    MoCo (main_moco.py) and the authors' code apply weight decay to every parameter, BN and biases
    included; we keep that so the recipe is reproduced exactly.
    """
    return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]


def _all_params(params_or_groups: Iterable[Any]) -> tuple[list[Any], list[Tensor]]:
    items = list(params_or_groups)
    flat: list[Tensor] = []
    for it in items:
        flat.extend(it["params"] if isinstance(it, dict) else [it])
    return items, flat


def build_sgd(params_or_groups: Iterable[Any], optim_cfg: OptimConfig, lr: float | Tensor) -> torch.optim.SGD:
    """SGD with the config's momentum / weight decay / Nesterov.

    Implementation: `fused=True` when every parameter is on CUDA (one kernel for the whole update; it
    accepts a CUDA float32 0-d tensor lr, read on the device, which is what CUDA-graph capture needs);
    otherwise `foreach=True`. lr: a float, or a tensor for graph use (moved to the parameters' device as
    fp32 if needed; on the foreach path a tensor lr is read with `.item()` each step, fine on CPU). The
    trainers change it through the tensor they pin (`fastvpd.step.pin_lr`). Groups given as dicts keep
    their own `weight_decay`. (torch's SGD has no
    `capturable` flag: the fused kernel with a device lr is its graph-safe form.)
    """
    items, flat = _all_params(params_or_groups)
    if not flat:
        raise ConfigError("no trainable parameters were given to the optimizer")
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("a tensor learning rate must have one element")
    on_cuda = all(p.is_cuda for p in flat)
    if isinstance(lr, Tensor):
        # The fused CUDA kernel reads the rate as a float32 on the parameters' device; a converted copy
        # becomes the optimizer's own tensor (the caller's original no longer drives it).
        device = flat[0].device if on_cuda else lr.device
        if lr.device != device or lr.dtype != torch.float32 or lr.dim() != 0 or lr.requires_grad:
            lr = lr.detach().to(device=device, dtype=torch.float32).reshape(())
    kind = {"fused": True} if on_cuda else {"foreach": True}
    return torch.optim.SGD(
        items,
        lr=lr,
        momentum=optim_cfg.momentum,
        weight_decay=optim_cfg.weight_decay,
        nesterov=optim_cfg.nesterov,
        **kind,
    )


def base_lr(optim_cfg: OptimConfig, global_batch: int) -> float:
    """Linear scaling rule: `lr` is given for `lr_batch` images per step."""
    return optim_cfg.lr * global_batch / optim_cfg.lr_batch


def lr_at(step: int, steps_per_epoch: int, optim_cfg: OptimConfig, base_lr: float, epochs: int) -> float:
    """Learning rate for global step `step` (0-based) of a run of `epochs` epochs.

    - warm-up (optim.warmup_epochs > 0): linear from base_lr/W to base_lr over the first W steps;
    - cosine: base_lr·0.5·(1 + cos(π·t)) with t the fraction of the post-warm-up steps done, evaluated per
      step (MoCo evaluates the same curve per epoch; per step is smoother), reaching 0 at step = total;
    - step, every optim.step_every epochs: base_lr·gamma^((e + 1) // step_every) in 0-based epoch e. This
      is the authors' phase-2 rule `lr·0.1^(epoch // 30)` with their epochs counted from 1: the rate drops
      at their epochs 30, 60, 90 = 0-based 29, 59, 89 (29/30/30/11 epochs per rate over 100 epochs);
    - step, at optim.milestones: base_lr·gamma^j with j the number of milestones ≤ e, the 0-based epoch
      (MoCo's main_lincls, which counts epochs from 0: 60 and 80 give 60/20/20 epochs per rate).
    Both change the rate at epoch boundaries. Warm-up multiplies the step schedule.
    """
    if steps_per_epoch <= 0 or epochs <= 0:
        raise ValueError("steps_per_epoch and epochs must be > 0")
    total = steps_per_epoch * epochs
    step = min(max(step, 0), total)
    warm = min(int(round(optim_cfg.warmup_epochs * steps_per_epoch)), total)
    warm_factor = (step + 1) / warm if step < warm else 1.0  # step 0 already moves the weights
    if optim_cfg.schedule == "cosine":
        if step < warm:
            return base_lr * warm_factor
        span = max(total - warm, 1)
        t = (step - warm) / span
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * t))
    if optim_cfg.schedule == "step":
        epoch = step // steps_per_epoch
        if optim_cfg.milestones:
            j = sum(1 for m in optim_cfg.milestones if epoch >= m)
        elif optim_cfg.step_every > 0:
            j = (epoch + 1) // optim_cfg.step_every  # the authors' epochs are 1-based
        else:
            j = 0
        return base_lr * warm_factor * optim_cfg.step_gamma**j
    raise ConfigError(f"optim.schedule={optim_cfg.schedule!r} is not one of cosine, step")

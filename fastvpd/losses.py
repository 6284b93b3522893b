"""The paper's losses as pure functions (no module state, no host syncs; safe inside a CUDA graph).

- `margin_info_nce`: MoCo v2's InfoNCE with an additive margin on the positive logit (the authors' code);
  margin 0 is plain MoCo v2.
- `ofd_margin` / `ofd_partial_l2`: the margin and the partial L2 of OFD ("A Comprehensive Overhaul of
  Feature Distillation", Heo et al. 2019), re-implemented in torch (no scipy at run time).
- `smoothed_ce`: label-smoothed cross-entropy for the distillation student, in one place so every caller
  shares it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["margin_info_nce", "ofd_margin", "ofd_partial_l2", "smoothed_ce"]


def _up(x: Tensor) -> Tensor:
    """At least fp32 (bf16/fp16 go up, fp64 stays fp64 so gradcheck works)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def margin_info_nce(
    q: Tensor, k: Tensor, queue: Tensor, temperature: float = 0.2, margin: float = 0.4
) -> tuple[Tensor, Tensor]:
    """InfoNCE with a margin on the positive pair.

    q, k: N×C L2-normalised query / key embeddings (k carries no gradient in MoCo); queue: K×C negatives
    (rows L2-normalised, any dtype). Per sample i:

        loss_i = -log( exp((q_i·k_i - m)/τ) / (exp((q_i·k_i - m)/τ) + Σ_j exp(q_i·queue_j/τ)) )

    and the result is the mean over i, i.e. cross-entropy of the logits below with target class 0
    (computed as logsumexp(logits) - logits[:, 0], which is that exactly, without a target tensor).
    Logits are computed in fp32 with autocast off, so bf16/fp16 inputs do not lose the small
    differences between cosine similarities that τ=0.2 amplifies (fp64 inputs stay fp64).

    Returns (loss: 0-d fp32, logits: N×(1+K) fp32, already divided by τ).
    """
    with torch.autocast(device_type=q.device.type, enabled=False):
        q32, k32, queue32 = _up(q), _up(k), _up(queue)
        l_pos = (q32 * k32).sum(dim=1, keepdim=True) - margin  # l_pos: Nx1
        l_neg = q32 @ queue32.t()  # l_neg: NxK
        logits = torch.cat([l_pos, l_neg], dim=1) / temperature  # logits: Nx(1+K)
        loss = (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()
    return loss, logits


def _std_normal_pdf(x: Tensor) -> Tensor:
    return torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def _std_normal_cdf_neg(x: Tensor) -> Tensor:
    """Φ(-x) via erfc, accurate in the far tail where 1 - Φ(x) would cancel to 0."""
    return 0.5 * torch.erfc(x / math.sqrt(2.0))


@torch.no_grad()
def ofd_margin(bn_weight: Tensor, bn_bias: Tensor) -> Tensor:
    """OFD's per-channel margin from the BN (γ, β) that precedes a ReLU (OFD's `get_margin_from_BN`).

    The pre-ReLU response of a channel is modelled as N(β, s²) with s = |γ|; the margin is the expected
    value of its negative part, E[x | x < 0] = β - s·φ(β/s)/Φ(-β/s), used when Φ(-β/s) > 0.001, and
    -3s otherwise (almost no negative mass). The margin is therefore always ≤ 0. Computed in float64
    (OFD computes it in Python doubles) and returned as float32 [C].
    """
    s = bn_weight.detach().double().abs()
    b = bn_bias.detach().double()
    x = b / s.clamp_min(1e-30)  # β/s; the clamp only avoids 0/0 for a dead channel (γ = 0)
    tail = _std_normal_cdf_neg(x)  # Φ(-β/s)
    expect_neg = b - s * _std_normal_pdf(x) / tail.clamp_min(1e-300)
    margin = torch.where(tail > 0.001, expect_neg, -3.0 * s)
    return margin.float()


def ofd_partial_l2(s: Tensor, t: Tensor, margin: Tensor) -> Tensor:
    """OFD's partial L2 distance between student features s and teacher features t (both N×C×H×W, pre-ReLU).

    margin: [C] (or anything broadcastable to N×C×H×W, e.g. 1×C×1×1). Element-wise, with m the
    channel's margin (m ≤ 0, see `ofd_margin`):

        (s - m)²   where t ≤ m      and s > m
        (s - t)²   where m < t ≤ 0  and s > t
        (s - t)²   where t > 0
        0          otherwise

    summed over all elements (OFD then divides by the batch size). The code uses OFD's own form,
    `target = max(t, m); loss = (s - target)² · [(s > target) | (target > 0)]`, which is identical to the
    case split above whenever m ≤ 0 (then target > 0 ⇔ t > 0, and target = m exactly when t ≤ m);
    `ofd_margin` always returns m ≤ 0. Computed in fp32 with autocast off.

    When only s needs a gradient (OFD: the teacher is detached) it runs as `_PartialL2`, which keeps the
    masked difference d and back-propagates 2·d in one kernel (the plain autograd graph streams five
    fp32 tensors of the feature map's size through memory); otherwise, and under torch.compile, through
    plain autograd.
    """
    with torch.autocast(device_type=s.device.type, enabled=False):
        if not (t.requires_grad or margin.requires_grad or torch.compiler.is_compiling()):
            return _PartialL2.apply(s, t, margin)  # (compiled, Inductor fuses the plain form itself)
        s32, t32, m = _up(s), _up(t), _margin_nd(margin, s)
        target = torch.maximum(t32, m)
        mask = (s32 > target) | (target > 0)
        return ((s32 - target).square() * mask).sum()


def _margin_nd(margin: Tensor, s: Tensor) -> Tensor:
    """margin [C] (or already broadcastable) as fp32 (fp64 for fp64 s) 1xCx1x1."""
    m = margin.to(torch.promote_types(s.dtype, torch.float32))
    return m.view(1, -1, *([1] * (s.dim() - 2))) if m.dim() == 1 else m


class _PartialL2(torch.autograd.Function):
    """`ofd_partial_l2` with a gradient for s only: forward keeps d = (s - max(t, m))·mask in fp32, whose
    square sums to the loss; backward is ds = 2·g·d, written in s's dtype in one kernel."""

    @staticmethod
    def forward(ctx: Any, s: Tensor, t: Tensor, margin: Tensor) -> Tensor:  # type: ignore[override]
        target = torch.maximum(t, _margin_nd(margin, s))  # fp32 (fp64): the margin's dtype wins
        d = torch.sub(s, target)
        keep = (d > 0).logical_or_(target > 0)  # (s > target) | (target > 0)
        d.mul_(keep)
        ctx.save_for_backward(d)
        ctx.s_dtype = s.dtype
        return torch.linalg.vector_norm(d).square()

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, None, None]:  # type: ignore[override]
        (d,) = ctx.saved_tensors
        ds = torch.empty_like(d, dtype=ctx.s_dtype)
        torch.mul(d, 2.0 * g, out=ds)  # computed in fp32, stored in s's dtype
        return ds, None, None


def smoothed_ce(logits: Tensor, target: Tensor, smoothing: float = 0.1) -> Tensor:
    """Mean cross-entropy with label smoothing (fp32 logits), as the authors' distillation recipe uses."""
    with torch.autocast(device_type=logits.device.type, enabled=False):
        return F.cross_entropy(_up(logits), target, label_smoothing=smoothing)

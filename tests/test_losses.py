"""Losses against independent re-derivations (numpy/float64, scipy, hand-computed cases)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import norm

from fastvpd.losses import margin_info_nce, ofd_margin, ofd_partial_l2, smoothed_ce


def _unit(n: int, c: int, gen: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return F.normalize(torch.randn(n, c, generator=gen, dtype=dtype), dim=1)


def test_margin_info_nce_matches_per_sample_float64_formula() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, queue = _unit(6, 16, g), _unit(6, 16, g), _unit(40, 16, g)
    tau, m = 0.2, 0.4
    loss, logits = margin_info_nce(q, k, queue, temperature=tau, margin=m)
    qn, kn, Qn = (t.double().numpy() for t in (q, k, queue))
    per = []
    for i in range(6):
        pos = math.exp((qn[i] @ kn[i] - m) / tau)
        neg = sum(math.exp(qn[i] @ Qn[j] / tau) for j in range(40))
        per.append(-math.log(pos / (pos + neg)))
    assert logits.shape == (6, 41) and logits.dtype == torch.float32
    assert loss.item() == pytest.approx(float(np.mean(per)), rel=1e-5)
    assert torch.allclose(logits[:, 0], ((q * k).sum(1) - m) / tau)


def test_zero_margin_is_moco_v2_cross_entropy() -> None:
    g = torch.Generator().manual_seed(1)
    q, k, queue = _unit(8, 32, g), _unit(8, 32, g), _unit(64, 32, g)
    loss, logits = margin_info_nce(q, k, queue, temperature=0.07, margin=0.0)
    # MoCo builder.py, verbatim maths: queue stored CxK there.
    l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)
    l_neg = torch.einsum("nc,ck->nk", [q, queue.t().contiguous()])
    ref_logits = torch.cat([l_pos, l_neg], dim=1) / 0.07
    ref = F.cross_entropy(ref_logits, torch.zeros(8, dtype=torch.long))
    assert torch.allclose(logits, ref_logits, atol=1e-5)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)


def test_margin_info_nce_gradcheck_float64() -> None:
    g = torch.Generator().manual_seed(2)
    q = _unit(3, 5, g, torch.float64).requires_grad_()
    k = _unit(3, 5, g, torch.float64).requires_grad_()
    queue = _unit(7, 5, g, torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: margin_info_nce(a, b, queue, 0.2, 0.4)[0], (q, k))


def test_margin_info_nce_low_precision_inputs_and_queue() -> None:
    g = torch.Generator().manual_seed(3)
    q, k, queue = _unit(8, 16, g), _unit(8, 16, g), _unit(32, 16, g)
    ref, _ = margin_info_nce(q, k, queue)
    low, logits = margin_info_nce(q.bfloat16(), k.bfloat16(), queue.half())
    assert logits.dtype == torch.float32 and low.dtype == torch.float32
    assert low.item() == pytest.approx(ref.item(), rel=2e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast must not push the matmul to bf16
        auto, auto_logits = margin_info_nce(q, k, queue)
    assert auto_logits.dtype == torch.float32 and auto.item() == pytest.approx(ref.item(), rel=1e-6)


def test_ofd_margin_matches_scipy_including_the_minus_three_sigma_branch() -> None:
    gamma = torch.tensor([1.0, -0.5, 2.0, 0.3, 1.0, 0.7, 0.01])
    beta = torch.tensor([0.0, 0.2, -1.0, 0.5, 4.0, -2.0, 0.05])  # β/s = 4 and 5 → Φ(-β/s) < 0.001
    got = ofd_margin(gamma, beta)
    want = []
    for s, m in zip(gamma.tolist(), beta.tolist()):
        s = abs(s)
        if norm.cdf(-m / s) > 0.001:
            want.append(-s * math.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi) / norm.cdf(-m / s) + m)
        else:
            want.append(-3 * s)
    assert got.dtype == torch.float32 and got.shape == (7,)
    np.testing.assert_allclose(got.numpy(), np.array(want, dtype=np.float32), rtol=1e-6, atol=1e-7)
    assert got[4].item() == pytest.approx(-3.0) and got[6].item() == pytest.approx(-0.03)
    assert (got <= 0).all()


def test_ofd_margin_is_negative_part_expectation() -> None:
    # E[x | x < 0] for x ~ N(β, s²), checked by Monte Carlo.
    x = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1.5 + 0.5
    mc = x[x < 0].mean().item()
    assert ofd_margin(torch.tensor([1.5]), torch.tensor([0.5])).item() == pytest.approx(mc, abs=3e-3)


def test_ofd_partial_l2_each_case_by_hand() -> None:
    m = torch.tensor([-1.0])
    cases = [  # (s, t, expected) with m = -1
        (0.5, -2.0, (0.5 + 1.0) ** 2),  # t ≤ m, s > m → (s - m)²
        (-1.5, -2.0, 0.0),  # t ≤ m, s ≤ m → 0
        (0.3, -0.5, (0.3 + 0.5) ** 2),  # m < t ≤ 0, s > t → (s - t)²
        (-0.7, -0.5, 0.0),  # m < t ≤ 0, s ≤ t → 0
        (0.2, 0.0, 0.2**2),  # t = 0 belongs to the middle case, s > t
        (-1.0, 1.0, 4.0),  # t > 0 → (s - t)² even when s < t
        (2.0, 1.0, 1.0),  # t > 0, s > t
    ]
    for s, t, want in cases:
        got = ofd_partial_l2(torch.tensor(s).view(1, 1, 1, 1), torch.tensor(t).view(1, 1, 1, 1), m)
        assert got.item() == pytest.approx(want, abs=1e-7), (s, t)
    s_all = torch.tensor([c[0] for c in cases]).view(1, 1, 1, -1)
    t_all = torch.tensor([c[1] for c in cases]).view(1, 1, 1, -1)
    assert ofd_partial_l2(s_all, t_all, m).item() == pytest.approx(sum(c[2] for c in cases), rel=1e-6)


def test_ofd_partial_l2_equals_documented_case_split_on_random_data() -> None:
    g = torch.Generator().manual_seed(4)
    s = torch.randn(3, 5, 4, 4, generator=g)
    t = torch.randn(3, 5, 4, 4, generator=g)
    margin = -torch.rand(5, generator=g) - 0.1
    m = margin.view(1, 5, 1, 1)
    case_split = torch.where(
        (t <= m) & (s > m),
        (s - m) ** 2,
        torch.where(((t > m) & (t <= 0) & (s > t)) | (t > 0), (s - t) ** 2, torch.zeros_like(s)),
    ).sum()
    assert ofd_partial_l2(s, t, margin).item() == pytest.approx(case_split.item(), rel=1e-6)
    assert ofd_partial_l2(s, t, m).item() == pytest.approx(case_split.item(), rel=1e-6)  # 1xCx1x1 margin


def test_ofd_partial_l2_gradient_only_through_active_elements() -> None:
    s = torch.tensor([[0.5, -1.5, 2.0]]).view(1, 1, 1, 3).requires_grad_()
    t = torch.tensor([[-2.0, -2.0, 1.0]]).view(1, 1, 1, 3)
    ofd_partial_l2(s, t, torch.tensor([-1.0])).backward()
    assert torch.allclose(s.grad.flatten(), torch.tensor([2 * 1.5, 0.0, 2 * 1.0]))


def test_smoothed_ce_matches_manual_formula() -> None:
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 10, generator=g)
    target = torch.randint(0, 10, (6,), generator=g)
    logp = logits.double().log_softmax(1)
    eps = 0.1
    manual = ((1 - eps) * -logp[torch.arange(6), target] + eps * -logp.mean(1)).mean()
    assert smoothed_ce(logits, target, eps).item() == pytest.approx(manual.item(), rel=1e-6)
    assert smoothed_ce(logits, target, 0.0).item() == pytest.approx(F.cross_entropy(logits, target).item())


def _partial_l2_autograd(s: torch.Tensor, t: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """The plain-autograd form (what ofd_partial_l2 runs when t needs a gradient)."""
    s32, t32 = s.float(), t.float()
    target = torch.maximum(t32, margin.float().view(1, -1, 1, 1))
    return ((s32 - target).square() * ((s32 > target) | (target > 0))).sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ofd_partial_l2_fused_backward_equals_autograd(dtype: torch.dtype) -> None:
    """The one-kernel backward (ds = 2·g·d) gives autograd's value and gradient, in s's dtype and layout."""
    g = torch.Generator().manual_seed(6)
    s0 = torch.randn(4, 8, 5, 5, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    t = torch.randn(4, 8, 5, 5, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    margin = -torch.rand(8, generator=g) - 0.05
    s1, s2 = s0.clone().requires_grad_(), s0.clone().requires_grad_()
    fused, plain = ofd_partial_l2(s1, t, margin), _partial_l2_autograd(s2, t, margin)
    assert fused.dtype == torch.float32
    assert fused.item() == pytest.approx(plain.item(), rel=1e-5)
    (fused * 0.7).backward()
    (plain * 0.7).backward()
    assert s1.grad.dtype == dtype and s1.grad.is_contiguous(memory_format=torch.channels_last)
    tol = 0 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(s1.grad, s2.grad, atol=tol, rtol=tol)
    # float64 gradcheck of the custom backward
    s64 = torch.randn(2, 3, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    t64 = torch.randn(2, 3, 3, 3, dtype=torch.float64, generator=g)
    assert torch.autograd.gradcheck(lambda x: ofd_partial_l2(x, t64, torch.tensor([-0.5, -1.0, -0.2])), s64)
    # a teacher that needs a gradient takes the plain-autograd path, which gives it one
    t_req = t.float().requires_grad_()
    ofd_partial_l2(s0.float(), t_req, margin).backward()
    assert t_req.grad is not None and t_req.grad.abs().sum() > 0

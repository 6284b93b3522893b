"""Per-sample parameter draws of the photometric ops (the geometry's draws are in `geometry`).

One function draws a view's jitter, grayscale and blur parameters for a whole batch from a caller-owned
`torch.Generator`, a fixed number of draws per call: every rendering (torch, numba, Triton) takes the same
draws, so they give the same pixels, a batch is a function of its generator seed (exact resume), and a
CUDA graph can capture the draws with the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fastvpd.data.spec import ColorJitter, ViewSpec


@dataclass
class Photometric:
    """Per-sample photometric parameters of one view (all [B] or [B, 4] tensors on the device)."""

    jitter_on: Tensor | None = None  # bool [B]
    factors: Tensor | None = None  # float [B, 4]: brightness, contrast, saturation, hue
    order: Tensor | None = None  # int64 [B, 4]: op index applied at each step (0 b, 1 c, 2 s, 3 h)
    gray_on: Tensor | None = None  # bool [B]
    blur_on: Tensor | None = None  # bool [B]
    sigma: Tensor | None = None  # float [B]


def jitter_ranges(j: ColorJitter) -> list[tuple[float, float]]:
    """torchvision ColorJitter factor ranges: brightness, contrast, saturation (multipliers), hue (turns)."""
    bounds = [(max(0.0, 1.0 - x), 1.0 + x) for x in (j.brightness, j.contrast, j.saturation)]
    return [*bounds, (-j.hue, j.hue)]


def sample_photometric(
    view: ViewSpec, b: int, gen: torch.Generator | None, device: torch.device
) -> Photometric:
    """Draw jitter/grayscale/blur parameters for a batch (fixed number of draws: resumable, capturable)."""
    p = Photometric()
    if view.jitter is not None:
        j: ColorJitter = view.jitter
        u = torch.rand(b, 9, generator=gen, device=device)
        p.jitter_on = u[:, 0] < j.p
        # python-float bounds (no host->device copy: capturable in a CUDA graph)
        bounds = jitter_ranges(j)
        p.factors = torch.stack([lo + (hi - lo) * u[:, 1 + c] for c, (lo, hi) in enumerate(bounds)], dim=1)
        p.order = torch.argsort(u[:, 5:9], dim=1)  # a uniformly random permutation per sample
    if view.grayscale_p > 0:
        p.gray_on = torch.rand(b, generator=gen, device=device) < view.grayscale_p
    if view.blur is not None:
        u = torch.rand(b, 2, generator=gen, device=device)
        p.blur_on = u[:, 0] < view.blur.p
        s0, s1 = view.blur.sigma
        p.sigma = s0 + (s1 - s0) * u[:, 1]
    return p

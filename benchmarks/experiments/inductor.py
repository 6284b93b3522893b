"""Inductor settings the compiled, captured MoCo step is also timed under (GPU, --compile): 1x1
convolutions (half of ResNet-50's) lowered to GEMMs, and Triton kernels (BN's reductions, the fused
elementwise chains) tuned by coordinate descent. A compile each."""

from __future__ import annotations

from typing import Any

import torch

from benchmarks.harness import Options
from benchmarks.ladder import Rung
from benchmarks.moco_steps import MocoForm, rung

INDUCTOR_VARIANTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("1x1 convs as GEMMs", {"conv_1x1_as_mm": True}),
    ("coordinate-descent tuning", {"coordinate_descent_tuning": True}),
)


def rungs(opts: Options, device: torch.device) -> list[Rung]:
    if not (opts.compile and device.type == "cuda"):
        return []
    return [
        rung(
            f"+ torch.compile + CUDA graph, {label}",
            MocoForm(graphed=True, compiled=True, inductor=tuple(settings.items())),
            device,
        )
        for label, settings in INDUCTOR_VARIANTS
    ]

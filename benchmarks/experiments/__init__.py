"""Variants no GPU run has decided yet, registered and timed by the benchmark itself (`--experiments`).

The package carries only the hook each needs: fastvpd.models.adapt_stem for the stem forms, the loaders'
`aug_kernel` and DALILoader's `pipelines` constructor arguments for the loader rows; the user's config
has none of them. A variant that a measurement settles is deleted here, and the winner becomes the
package's behaviour.
- stems.py: the stem convolution computed other ways (zero-padded input, space-to-depth, im2col + GEMM);
- inductor.py: Inductor settings for the compiled MoCo step;
- loader_rows.py: DALI with several pipelines, and the torch against the Triton pixel kernels.
"""

from __future__ import annotations

from typing import Any

import torch

from benchmarks.experiments import inductor, stems
from benchmarks.experiments.loader_rows import LOADER_ROWS

__all__ = ["LOADER_ROWS", "step_rungs"]


def step_rungs(opts: Any, device: torch.device) -> list[Any]:
    """The experiments' MoCo rungs, after the ladder's own (their speed-ups are against its reference)."""
    return stems.rungs(opts, device) + inductor.rungs(opts, device)

"""The stem convolution computed other ways, through the hook fastvpd.models.adapt_stem(model, channels,
impl): the image zero-padded to 4 or 8 channels (cuDNN pads 3 to 8 itself and may pick another kernel
for 4 or 8), space-to-depth (a 4x4 stride-1 convolution over 2x2 pixel blocks) and im2col + one GEMM.
Same parameters and results (tests/test_models.py).

The eager captured step times each form cheaply; the stem is an extern kernel in the compiled step too,
so the compiled rung compiles only the form that beat the plain stem eager by the most, in the same run
(or skips, saying so)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from benchmarks.harness import Options, Skip
from benchmarks.ladder import Rung, measured
from benchmarks.moco_steps import PLAIN_STEM, MocoForm, rung

# (label, (channels, impl)) timed besides PLAIN_STEM
STEMS: tuple[tuple[str, tuple[int, str]], ...] = (
    ("stem input padded to 4 channels", (4, "direct")),
    ("stem input padded to 8 channels", (8, "direct")),
    ("stem as space-to-depth", (3, "s2d")),
    ("stem as space-to-depth on 4 channels", (4, "s2d")),
    ("stem as im2col + GEMM", (3, "im2col")),
)
FASTEST = "+ torch.compile + CUDA graph, the eager rungs' fastest stem"


def _eager_captured(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        r
        for r in measured(rows)
        if r["form"]["graphed"] and not r["form"]["compiled"] and not r["form"]["reference"]
        and not r["form"]["inductor"]
    ]  # fmt: skip


def fastest_eager_stem(rows: Sequence[dict[str, Any]]) -> tuple[tuple[int, str] | None, str]:
    """(stem, why): the stem whose eager captured rung beat the plain stem's (same run) by the most, or
    None when the plain one or every other was not measured, or none beat it (nothing worth a compile)."""
    eager = _eager_captured(rows)
    base = next((r for r in eager if tuple(r["form"]["stem"]) == PLAIN_STEM), None)
    if base is None:
        return None, "the eager captured step with the plain stem was not measured in this run"
    timed = [r for r in eager if tuple(r["form"]["stem"]) != PLAIN_STEM]
    if not timed:
        return None, "no eager stem rung was measured in this run"
    top = max(timed, key=lambda r: r["samples_s"])
    rate, plain = top["samples_s"], base["samples_s"]
    if rate <= plain:
        best = f"best {top['name']}, {rate:.1f}"
        return None, f"no eager stem rung beat the plain stem ({plain:.1f} samples/s; {best})"
    return (
        tuple(top["form"]["stem"]),  # type: ignore[return-value]
        f"{top['name']}: {rate:.1f} against {plain:.1f} samples/s eager (+{100 * (rate / plain - 1):.1f} %)",
    )


def _pick(rows: list[dict[str, Any]]) -> tuple[MocoForm, str]:
    stem, why = fastest_eager_stem(rows)
    if stem is None:
        raise Skip(why)
    return MocoForm(graphed=True, compiled=True, stem=stem), why


def rungs(opts: Options, device: torch.device) -> list[Rung]:
    out = [rung(f"+ CUDA graph, {label}", MocoForm(graphed=True, stem=stem), device) for label, stem in STEMS]
    if opts.compile and device.type == "cuda":  # a cold compile each: select them with --rungs
        compiled = [(label, MocoForm(graphed=True, compiled=True, stem=stem)) for label, stem in STEMS]
        out += [rung(f"+ torch.compile + CUDA graph, {label}", form, device) for label, form in compiled]
        out.append(Rung(FASTEST, None, warmup_extra=4, pick=_pick))
    return out

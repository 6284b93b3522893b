"""Device-independent cost model of a torch function: aten kernels launched and bytes moved.

Memory-bound elementwise chains (the batched augmentations) cost about (bytes through HBM) / bandwidth
plus one launch per kernel, whatever the device. A `TorchDispatchMode` sees every aten op the function
runs (after autograd and composite decompositions, i.e. the ops a GPU would launch) and counts, per op:
one kernel, and the bytes of its tensor inputs read plus outputs written. Conventions:

- views and metadata-only ops (view, permute, expand, slice, unbind, detach, alias, as_strided, ...)
  and allocations (empty*) are free: 0 kernels, 0 bytes;
- a tensor counts the distinct elements it addresses (broadcast dims with stride 0 once), never its
  whole storage; an `out=` argument is counted as written only; an in-place `self` as read and written;
- gathers (index, gather, index_select, take) read at most as many source elements as they write;
- batch norm in training is two kernels, as PyTorch's CUDA BN runs it: a statistics pass that reads the
  input (backward: the gradient and the input) before the elementwise pass;
- host syncs (`.item()`, `nonzero`, ...) are counted separately in `.syncs`.

A model: caches and compiler fusion are ignored. CLI: `python benchmarks/traffic.py aug --estimate-tbs 3`;
`python benchmarks/traffic.py moco` (or `distill`) models a whole eager training step.
"""

from __future__ import annotations

import argparse
import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

aten = torch.ops.aten
_FREE = {  # metadata-only or allocation ops that are not marked as views in their schema
    aten._unsafe_view,
    aten.empty,
    aten.empty_like,
    aten.empty_strided,
    aten.new_empty,
    aten.new_empty_strided,
    aten.resize_,
    aten.set_,
    aten.lift_fresh,
    aten.scalar_tensor,  # python scalars wrapped for an op: host-side, no kernel
}
_SECTOR = 32
# addmm/baddbmm first copy their (broadcast) `input` into the result, then the GEMM reads it back (beta=1)
_BIAS_GEMMS = {aten.addmm, aten.baddbmm}
_GATHERS = {aten.index, aten.gather, aten.index_select, aten.take, aten.embedding}
_SYNCS = {aten._local_scalar_dense, aten.nonzero, aten.is_nonzero, aten.masked_select, aten.equal}
# Training BN on a GPU is two kernels: a statistics pass (forward: over the input; backward: over grad and
# input) before the elementwise one. op -> (index of its `training` flag, arguments that pass re-reads).
_BN_STATS_PASS = {aten.native_batch_norm: (5, (0,)), aten.native_batch_norm_backward: (7, (0, 1))}


def touched_bytes(t: torch.Tensor) -> int:
    """Bytes a (possibly broadcast or strided) tensor costs to stream through DRAM.

    Distinct elements (broadcast dims with stride 0 once) times the item size, times the stride of its
    innermost non-broadcast dim up to one 32-byte sector: a channel plane of a channels-last tensor
    (stride 3) costs the whole tensor, as on a GPU, where memory moves in 32-byte sectors.
    """
    if not t.numel():
        return 0
    live = [(s, st) for s, st in zip(t.shape, t.stride()) if st != 0 and s > 1]
    n = math.prod(s for s, _ in live)
    inner = min((abs(st) for _, st in live), default=1)
    return n * t.element_size() * max(1, min(inner, _SECTOR // t.element_size()))


@dataclass
class Traffic:
    """Counts of one run: kernels, bytes and host syncs, in total and per aten op."""

    kernels: int = 0
    bytes: int = 0
    syncs: int = 0
    flops: int = 0  # matmuls and convolutions (torch.utils.flop_counter's formulas)
    large: int = 0  # kernels moving at least `large_bytes` (whole-batch passes, not per-sample scalars)
    large_bytes: int = 1 << 20
    per_op: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))

    @property
    def by_op(self) -> list[tuple[str, int, int]]:
        """(op, kernels, bytes) rows, dearest first."""
        return sorted(((k, c, b) for k, (c, b) in self.per_op.items()), key=lambda r: (-r[2], -r[1], r[0]))

    def table(self, top: int = 15, scale: float = 1.0) -> str:
        rows = [f"{'aten op':<34}{'kernels':>7}{'MB':>11}"]
        rows += [f"{k:<34}{c:>7}{b * scale / 1e6:>11.1f}" for k, c, b in self.by_op[:top]]
        return "\n".join(rows)


class TrafficMode(TorchDispatchMode):
    """Accumulates a `Traffic` over every aten op dispatched while active."""

    def __init__(self, large_bytes: int = 1 << 20) -> None:
        super().__init__()
        self.traffic = Traffic(large_bytes=large_bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func.overloadpacket
        if func.is_view or packet in _FREE:
            return out
        written = {
            id(kwargs[a.name])
            for a in func._schema.arguments
            if a.kwarg_only and a.alias_info is not None and a.alias_info.is_write and a.name in kwargs
        }
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        wrote = sum(touched_bytes(t) for t in outs)
        src = args[0] if packet in _GATHERS and args else None  # read only where indexed
        read = 0
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor) and id(t) not in written:
                read += min(touched_bytes(t), wrote) if t is src else touched_bytes(t)
        launches = 1
        if packet in _BIAS_GEMMS and kwargs.get("beta", 1) != 0:
            launches, read, wrote = 2, read + wrote, 2 * wrote  # + the copy's write, the GEMM's read of it
        if packet in _BN_STATS_PASS:
            flag, reread = _BN_STATS_PASS[packet]
            if len(args) > flag and args[flag]:
                launches += 1
                read += sum(touched_bytes(args[i]) for i in reread)
        rec = self.traffic.per_op[str(packet).removeprefix("aten.")]
        rec[0] += launches
        rec[1] += read + wrote
        self.traffic.kernels += launches
        self.traffic.bytes += read + wrote
        self.traffic.large += read + wrote >= self.traffic.large_bytes
        self.traffic.syncs += packet in _SYNCS
        if packet in flop_registry:
            self.traffic.flops += int(flop_registry[packet](*args, **kwargs, out_val=out))
        return out


def count_traffic(fn: Callable[..., Any], *args: Any, large_bytes: int = 1 << 20, **kwargs: Any) -> Traffic:
    """Run `fn(*args, **kwargs)` once and return its aten kernel / byte / sync counts."""
    with TrafficMode(large_bytes) as mode:
        fn(*args, **kwargs)
    return mode.traffic


# ------------------------------------------------------------------------------------------------ CLI
def synthetic_store(n: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """A ragged uint8 [P, 3] store of n ImageNet-like images (~500x375, both orientations)."""
    g = torch.Generator().manual_seed(seed)
    hs = 375 + torch.randint(-40, 41, (n,), generator=g)
    ws = 500 + torch.randint(-60, 61, (n,), generator=g)
    portrait = torch.rand(n, generator=g) < 0.25
    H, W = torch.where(portrait, ws, hs), torch.where(portrait, hs, ws)
    sizes = H * W
    offsets = torch.cumsum(sizes, 0) - sizes
    pixels = torch.randint(0, 256, (int(sizes.sum()), 3), generator=g, dtype=torch.uint8)
    return pixels, offsets, H, W


def aug_report(batch: int, res: int, tbs: float | None, reps: int = 3) -> str:
    """Traffic and CPU time of the fixed-shape (GPU, capturable) two-view moco_v2 render."""
    from fastvpd.data.augment import PixelAugmenter
    from fastvpd.data.spec import moco_v2

    pixels, offsets, H, W = synthetic_store(batch)
    aug = PixelAugmenter(moco_v2(res), pixels, offsets, H, W, torch.float32, torch.Generator().manual_seed(0))

    def run() -> list[torch.Tensor]:
        return aug.render(pixels, offsets, H, W, fixed_shape=True)

    run()
    t0 = time.perf_counter()
    for _ in range(reps):
        run()
    wall = (time.perf_counter() - t0) / reps
    tr = count_traffic(run, large_bytes=batch * res * res * 4)  # large: moves >= one [B, H, W] fp32 plane
    scale = 256 / batch
    gb = tr.bytes * scale / 1e9
    lines = [
        f"fixed-shape moco_v2 two-view render, {res} px: counted at batch {batch} on CPU, bytes and FLOPs"
        f" scaled linearly to batch 256 (x{scale:g}); the kernel count does not depend on the batch",
        f"kernels/batch: {tr.kernels} (whole-batch passes: {tr.large})   GB/batch of 256: {gb:.2f}"
        f"   GFLOP (matmul/conv): {tr.flops * scale / 1e9:.1f}   host syncs: {tr.syncs}",
        f"CPU wall time at batch {batch} ({torch.get_num_threads()} threads): {wall * 1e3:.0f} ms",
        tr.table(scale=scale),
    ]
    if tbs:
        t = gb / (tbs * 1e3)
        lines.append(
            f"MODEL, not a measurement: lower bound {t * 1e3:.1f} ms/batch at {tbs:g} TB/s"
            f" (bytes / bandwidth, launches ignored) -> at most {256 / t:,.0f} samples/s"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ training steps
STEP_NETS = ("moco", "distill")


@dataclass
class StepModel:
    """One training step's traffic as fixed + per-sample parts, fitted from counts at two batch sizes.

    Parameter-sized work (optimizer, momentum update, weight casts) does not grow with the batch and
    activation-sized work grows linearly, so `a + b·B` from two counts extrapolates to any batch; counting
    at 256 directly would take the CPU tens of minutes.
    """

    label: str
    batches: tuple[int, int]
    kernels: int
    fixed_bytes: float
    sample_bytes: float
    fixed_flops: float
    sample_flops: float
    rows: list[tuple[str, int, float, float]]  # (aten op, kernels, fixed bytes, bytes per sample)

    def bytes_at(self, batch: int) -> float:
        return self.fixed_bytes + self.sample_bytes * batch

    def flops_at(self, batch: int) -> float:
        return self.fixed_flops + self.sample_flops * batch

    def bound_ms(self, batch: int, tbs: float, tflops: float) -> float:
        """Lower bound on one step: every byte at `tbs` TB/s plus every FLOP at `tflops` (no overlap: one
        stream runs the memory-bound kernels and the GEMMs one after another)."""
        return self.bytes_at(batch) / (tbs * 1e9) + self.flops_at(batch) / (tflops * 1e9)


def step_fn(
    net: str, arch: str, res: int, batch: int, amp: torch.dtype | None = torch.bfloat16
) -> Callable[[], Any]:
    """The package's eager training step as the benchmark's ladders time it, channels-last, with bf16
    autocast on the CPU so that every tensor has the dtype (and so the size) it has in a GPU bf16 step.
    (`amp=None` counts an fp32 step: CPU bf16 convolutions take a slow path, too slow for the tests.)"""
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    from benchmarks.distill_steps import DistillForm, distill_step_for
    from benchmarks.harness import Options
    from benchmarks.moco_steps import MocoForm, package_step_for
    from fastvpd.step import Precision

    cpu = torch.device("cpu")
    precision = Precision("none", cpu)
    precision.dtype = amp  # Precision keeps CPU runs in fp32; the model wants a GPU's dtypes
    opts = Options(arch=arch, res=res, batch=batch, queue=4096)
    if net == "moco":
        return package_step_for(opts, cpu, MocoForm(), precision=precision)
    return distill_step_for(opts, cpu, DistillForm(), precision=precision)


def step_model(
    net: str,
    arch: str,
    res: int,
    batches: tuple[int, int],
    amp: torch.dtype | None = torch.bfloat16,
    say: Callable[[str], None] | None = None,
) -> StepModel:
    """Count one step (after one untimed step: optimizer state exists) at two batch sizes and fit."""
    if net not in STEP_NETS:
        raise ValueError(f"net must be one of {STEP_NETS} (got {net!r})")
    b0, b1 = batches
    if not 0 < b0 < b1:
        raise ValueError(f"need two increasing batch sizes (got {batches})")
    counts = []
    for b in batches:
        if say is not None:
            say(f"counting one {net} step at batch {b} (a few minutes for ResNet-50 at 224 px on a CPU) ...")
        step = step_fn(net, arch, res, b, amp)
        step()
        counts.append(count_traffic(step))
    t0, t1 = counts

    def fit(y0: float, y1: float) -> tuple[float, float]:
        per = (y1 - y0) / (b1 - b0)
        return y0 - per * b0, per

    rows = []
    for op, (kernels, by1) in t1.per_op.items():
        fixed, per = fit(t0.per_op.get(op, [0, 0])[1], by1)
        rows.append((op, kernels, fixed, per))
    label = f"{net} step, {arch} at {res} px"
    label += ", bf16 autocast" if amp == torch.bfloat16 else f", {amp or torch.float32}"
    return StepModel(label, (b0, b1), t1.kernels, *fit(t0.bytes, t1.bytes), *fit(t0.flops, t1.flops), rows)


def step_report(m: StepModel, batch: int, tbs: float, tflops: float, top: int = 15) -> str:
    rows = sorted(m.rows, key=lambda r: -(r[2] + r[3] * batch))[:top]
    lines = [
        f"{m.label}: eager, channels-last; counted on CPU at batches {m.batches}, fitted"
        f" as fixed + per-sample, reported at batch {batch}",
        f"kernels/step: {m.kernels}   GB/step: {m.bytes_at(batch) / 1e9:.1f}"
        f" (fixed {m.fixed_bytes / 1e9:.2f}, {m.sample_bytes / 1e6:.0f} MB per sample)"
        f"   TFLOP/step: {m.flops_at(batch) / 1e12:.2f}",
        f"{'aten op':<34}{'kernels':>7}{'GB':>9}",
        *(f"{op:<34}{k:>7}{(fx + per * batch) / 1e9:>9.2f}" for op, k, fx, per in rows),
    ]
    ms = m.bound_ms(batch, tbs, tflops)
    lines.append(
        f"MODEL, not a measurement: lower bound {ms:.1f} ms/step at {tbs:g} TB/s and {tflops:g} TFLOP/s"
        f" (launches ignored) -> at most {batch / ms * 1e3:,.0f} samples/s"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["aug", *STEP_NETS], help="the augmentation render, or a training step")
    ap.add_argument("--batch", type=int, default=16, help="aug: batch counted on CPU (scaled to 256)")
    ap.add_argument("--batches", default="8,16", help="step: the two batch sizes counted on CPU")
    ap.add_argument("--at", type=int, default=256, help="step: batch to report")
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--res", type=int, default=224)
    ap.add_argument("--estimate-tbs", type=float, default=None, help="HBM TB/s for a lower-bound time")
    ap.add_argument("--estimate-tflops", type=float, default=989.0, help="step: dense bf16 TFLOP/s")
    a = ap.parse_args(argv)
    if a.what == "aug":
        print(aug_report(a.batch, a.res, a.estimate_tbs))
        return
    try:
        b0, b1 = (int(b) for b in a.batches.split(","))
        if not 0 < b0 < b1:
            raise ValueError
    except ValueError:
        ap.error(f"--batches {a.batches!r}: two increasing batch sizes, e.g. 8,16")
    m = step_model(a.what, a.arch, a.res, (b0, b1), say=lambda msg: print(msg, flush=True))
    print(step_report(m, a.at, a.estimate_tbs or 3.0, a.estimate_tflops))


if __name__ == "__main__":
    main()

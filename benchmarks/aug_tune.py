"""Launch-shape sub-benchmark of the loaders section: the Triton augmentation (the loaders' device default)
timed for several (pixels per program, warps) pairs, so one GPU call can pick
`fastvpd.data.augment.triton.BLOCK/WARPS`.

Why: compiled for sm_90 on a CPU, the colour kernel takes 128 registers a thread at 1024 pixels and 4
warps, 76 at 8 warps, 40 at 256 pixels and 4 warps; which occupancy feeds its scattered uint8 loads and
the blur's taps best is a GPU question. Each row renders the same two-view batch from the cache loader's
device store, as the training step does (draws included), and reports the GPU kernel time per batch
(torch.profiler CUDA activity: no launch gaps, which a CUDA graph removes in training) and the part
spent in the Triton kernels themselves. It never raises: the loader figures must survive.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import Options, device_events, first_line, log, patched, self_us
from benchmarks.loaders import LoaderRow, build_row_loader

TUNING = ((256, 4), (512, 4), (1024, 4), (1024, 8), (2048, 8))  # (pixels per program, warps)
KERNELS = ("colour", "blur")  # triton_kernels' launch names, as the profiler lists them
REPS = 5
# the cache loader with the Triton kernels asked for by its constructor hook (not left to the device default)
TRITON_CACHE = LoaderRow("cache_triton", "cache", hooks=(("aug_kernel", "triton"),), gpu=True)


def launch_shape(block: int, warps: int) -> AbstractContextManager[None]:
    """The Triton kernels' launch shape set inside, restored after."""
    from fastvpd.data.augment import triton as triton_aug

    return patched(triton_aug, BLOCK=block, WARPS=warps)


def kernel_ms(render: Callable[[], Any], device: torch.device, reps: int = REPS) -> tuple[float, float]:
    """(all GPU kernels, the Triton kernels alone) in ms per call of `render`, after one untimed call
    (which compiles a new launch shape)."""
    events = device_events(render, device, reps)
    total = sum(self_us(e, on_device=True) for e in events)
    ours = sum(self_us(e, on_device=True) for e in events if str(e.key).startswith(KERNELS))
    return total / 1000.0 / reps, ours / 1000.0 / reps


def section_triton_tuning(root: Path, opts: Options, device: torch.device) -> dict[str, Any]:
    """The launch-shape table: {rows, notes}, or {status, reason, rows: []}."""
    if device.type != "cuda":
        return {"status": "skipped", "reason": "needs a CUDA GPU", "rows": []}
    t0 = time.perf_counter()
    try:
        from fastvpd.data.augment import triton as triton_aug

        why = triton_aug.unavailable(device)
        if why:
            return {"status": "skipped", "reason": why, "rows": []}
        loader = build_row_loader(TRITON_CACHE, root, opts, device)
        if getattr(loader, "placement", "device") != "device":
            return {"status": "skipped", "reason": "the cache does not fit on the GPU", "rows": []}
        idx = torch.arange(opts.batch, device=device) % loader.num_samples
        default = (triton_aug.BLOCK, triton_aug.WARPS)
        log(f"triton tuning: {len(TUNING)} launch shapes, {REPS} two-view batches each")
        rows = []
        for block, warps in TUNING:
            with launch_shape(block, warps):
                total, ours = kernel_ms(lambda: loader.augment(idx), device)
            mark = " (default)" if (block, warps) == default else ""
            rows.append(
                {
                    "name": f"{block} px x {warps} warps{mark}",
                    "block": block,
                    "warps": warps,
                    "device_ms_per_batch": total,
                    "triton_ms_per_batch": ours,
                    "samples_s": 1000.0 * opts.batch / total if total > 0 else None,
                }
            )
    except Exception as e:
        traceback.print_exc()
        return {"status": "failed", "reason": first_line(e), "rows": []}
    best = min(rows, key=lambda r: r["device_ms_per_batch"])
    notes = [
        f"two-view moco_v2 batch of {opts.batch} at {opts.res} px from the device store, {REPS} timed after "
        "one untimed (compiling); GPU kernel time (torch.profiler), so no launch gaps: the draws' small "
        "kernels are the difference between the two columns; samples/s = batch / GPU time",
        f"fastest: {best['name']}; the default is fastvpd.data.augment.triton.BLOCK x WARPS = "
        f"{default[0]} x {default[1]}",
    ]
    return {"rows": rows, "notes": notes, "seconds": round(time.perf_counter() - t0, 1)}

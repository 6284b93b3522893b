"""fastvpd throughput benchmark: loaders, step ladder, end to end, hardware use, full-recipe projection.

    python benchmarks/throughput.py [--quick] [--sections loaders,steps,e2e] [--arch resnet50 --res 224
                                    --batch 256] [--profile] [--compile] [--out DIR]

Every speed-up is a ratio against a baseline measured in the same process on the same inputs:
- loaders: each backend's two-view `moco_v2` samples/s against the torchvision backend, same images
  (a synthetic ImageNet-like set, converted once into a cache folder), same cores, same batch size;
- steps: a ladder from the reference MoCo formulation (benchmarks/reference_moco.py: builder.py and
  main_moco.py, eager fp32 NCHW) through channels-last, bf16 autocast, the package's MoCo step (fused
  enqueue, foreach momentum, fused SGD) and the package's CUDA-graphed step, on device-resident inputs;
- e2e: `fastvpd.pretrain.main` over each loader for a fixed number of steps.
A section (or a row) whose package, module or GPU is missing is skipped with the reason in the table.
Output: a terminal table, results.json, results.md and chart.png in the output folder.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `fastvpd` and `benchmarks` importable
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.hw import (  # noqa: E402
    HwMonitor,
    device_facts,
    device_slug,
    measure_matmul_tflops,
    peak_bf16_tflops,
    usable_cores,
)
from fastvpd.config import ConfigError, UserError, main_guard  # noqa: E402

# Full recipe of the paper (VIPriors ImageNet subset: 50 images x 1000 classes).
RECIPE_IMAGES = 50_000
RECIPE_PRETRAIN_EPOCHS = 800
RECIPE_DISTILL_EPOCHS = 100
LOADER_BACKENDS = (
    "torchvision", "ffcv", "ffcv_once", "ffcv_triton", "dali", "dali_fused", "dali_twice", "dali_device",
    "dali_triton", "dali_x4", "dali_fused_x4", "dali_triton_x4", "cache", "cache_graphed", "cache_triton",
    "cache_compiled", "cache_compiled_pointwise", "ffcv_compiled",
)  # fmt: skip
# loader rows that are a backend with non-default data.* settings: ffcv decoding each JPEG once per sample
# for both views (instead of once per view), dali with the fused instead of the exact colour jitter
LOADER_VARIANTS: dict[str, tuple[str, dict[str, str]]] = {
    "ffcv_once": ("ffcv", {"ffcv_decode": "once"}),
    "dali_fused": ("dali", {"dali_jitter": "fused"}),
    "dali_twice": ("dali", {"dali_decode": "twice"}),  # a cropped decode per view (the default: once)
    # DALI decodes, crops, resizes and flips; the device finishes the views (torch ops, or triton_aug's)
    "dali_device": ("dali", {"dali_jitter": "device"}),
    "dali_triton": ("dali", {"dali_jitter": "device", "aug_kernel": "triton"}),
    # four DALI pipelines side by side, a quarter of every batch each (data.dali_pipelines)
    "dali_x4": ("dali", {"dali_pipelines": "4"}),
    "dali_fused_x4": ("dali", {"dali_jitter": "fused", "dali_pipelines": "4"}),
    "dali_triton_x4": ("dali", {"dali_jitter": "device", "aug_kernel": "triton", "dali_pipelines": "4"}),
    "cache_in_loader": ("cache", {"aug_in_step": "false"}),
    "cache_graphed": ("cache", {}),  # loaders: the views replayed from a CUDA graph (GPU only)
    "cache_compiled": ("cache", {"compile_aug": "true"}),  # ... and their pixel work torch.compiled
    # ... with the colour matrices and the blur spelled elementwise for Inductor (gpu_aug.COMPILED_FORM)
    "cache_compiled_pointwise": ("cache", {"compile_aug": "true"}),
    "ffcv_compiled": ("ffcv", {"compile_aug": "true"}),  # ffcv's device finishing ops torch.compiled
    # the pixel work by fastvpd.data.triton_aug's kernels (cache: replayed from a CUDA graph, as in the step)
    "cache_triton": ("cache", {"aug_kernel": "triton"}),
    "ffcv_triton": ("ffcv", {"aug_kernel": "triton"}),
}
COMPILED_ROWS = ("cache_compiled", "cache_compiled_pointwise", "ffcv_compiled")  # need --compile
GRAPHED_ROWS = ("cache_graphed", "cache_compiled", "cache_compiled_pointwise", "cache_triton")
# skipped without a CUDA GPU
GPU_ROWS = (*GRAPHED_ROWS, *COMPILED_ROWS, "ffcv_triton", "dali_triton", "dali_triton_x4")
# end to end, `cache` renders the views inside the training step (its CUDA graph on a GPU, the default);
# `cache_in_loader` renders them in the loader, as the loaders section's `cache` row times it
E2E_BACKENDS = (
    *(b for b in LOADER_BACKENDS if b not in GPU_ROWS),  # --compile compiles them all
    "cache_in_loader",
    "cache_triton",
    "dali_triton",
    "dali_triton_x4",
)


def _loader_variant(name: str) -> tuple[str, dict[str, str]]:
    """(data.backend, the data.* settings it overrides) of a loader row. A row that names no
    `aug_kernel` is the torch form (`data.aug_kernel` defaults to auto, i.e. Triton on a GPU), so each
    row times what its name says on every device."""
    backend, settings = LOADER_VARIANTS.get(name, (name, {}))
    return backend, {"aug_kernel": "torch", **settings}


SECTIONS = ("loaders", "steps", "e2e")
DISTILL_CLASSES = 1000  # ImageNet / VIPriors subset


class Skip(Exception):
    """A section or row cannot run here (missing package, module, GPU): its message is the reason shown."""


def skipped(name: str, reason: str, status: str = "skipped") -> dict[str, Any]:
    return {"name": name, "status": status, "reason": reason}


def log(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__


def _require(module: str, what: str) -> Any:
    """Import `module` or raise Skip naming it (the package's rooms may not have landed on this checkout)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise Skip(f"{what} unavailable ({_first_line(e)})") from None


# ---------------------------------------------------------------------------------------------- options
@dataclass
class Options:
    """Sizes of every section; `resolve` picks the defaults for quick / CPU / GPU."""

    quick: bool = False
    sections: tuple[str, ...] = SECTIONS
    device: str = "auto"
    arch: str = ""
    res: int = 0
    batch: int = 0
    queue: int = 0
    warmup: int = 0
    repeats: int = 0
    images: int = 0
    loader_batches: int = 0
    loader_workers: int = 0
    e2e_steps: int = 0
    e2e_backends: tuple[str, ...] = E2E_BACKENDS
    loader_backends: tuple[str, ...] = LOADER_BACKENDS
    amp: str = "bf16"
    threads: int = 0
    compile: bool = False
    inductor_variants: bool = False  # with --compile: the MoCo step under each INDUCTOR_VARIANTS setting too
    rungs: str = ""  # regex: only the ladder rungs it matches run (each ladder's baseline always runs)
    profile: bool = False
    distill: bool = True
    data_dir: str = ""
    out: str = ""

    def resolve(self, device: torch.device) -> Options:
        gpu = device.type == "cuda"
        # (arch, res, batch, queue, warmup, repeats, images, loader_batches, e2e_steps)
        if self.quick:
            d = (
                ("resnet18", 32, 32, 256, 1, 2, 256, 4, 8)
                if not gpu
                else ("resnet50", 128, 128, 4096, 3, 10, 1024, 6, 20)
            )
        elif gpu:
            # at least 6144 images = 24 batches of 256 (2048 made the baseline time its worker restarts);
            # raised below to two whole rounds of torchvision workers (see loader_schedule)
            d = ("resnet50", 224, 256, 4096, 5, 20, 6144, 8, 30)
        else:
            d = ("resnet18", 96, 64, 4096, 2, 5, 1024, 8, 20)
        names = (
            "arch",
            "res",
            "batch",
            "queue",
            "warmup",
            "repeats",
            "images",
            "loader_batches",
            "e2e_steps",
        )
        images_given = bool(self.images)
        for name, default in zip(names, d):
            if not getattr(self, name):
                setattr(self, name, default)
        if self.queue < self.batch or self.queue % self.batch:
            self.queue = max(self.queue // self.batch, 1) * self.batch
        if not self.loader_workers:
            self.loader_workers = usable_cores()
        if gpu and not self.quick and not images_given:  # first batch + 2 rounds, the torchvision timing
            self.images = max(self.images, self.batch * (2 * self.loader_workers + 1))
        if not self.threads:
            self.threads = usable_cores()
        if not self.data_dir:
            cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
            self.data_dir = str(cache / "fastvpd-bench" / f"synthetic-{self.images}")
        return self


# ---------------------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> dict[str, float]:
    """Median / p10 / p90 ms per call after `warmup` calls.

    GPU: a CUDA event pair around each call, read after one final sync (no sync between calls, so the host
    can queue ahead exactly as in training; a step that syncs by itself pays for it). CPU: perf_counter.
    """
    for _ in range(warmup):
        step()
    sync(device)
    ms: list[float] = []
    if device.type == "cuda":
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(repeats)
        ]
        t0 = time.perf_counter()
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
        ms = [s.elapsed_time(e) for s, e in events]
    else:
        t0 = time.perf_counter()
        for _ in range(repeats):
            t = time.perf_counter()
            step()
            ms.append(1000.0 * (time.perf_counter() - t))
        wall = time.perf_counter() - t0
    ms.sort()
    q = statistics.quantiles(ms, n=10) if len(ms) >= 2 else [ms[0]] * 9
    return {
        "ms_per_step": statistics.median(ms),
        "ms_p10": q[0],
        "ms_p90": q[-1],
        "wall_ms_per_step": 1000.0 * wall / repeats,
        "repeats": repeats,
    }


def count_flops(step: Callable[[], Any]) -> float:
    """FLOPs of one call (matmuls and convolutions, forward + backward) with FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float | None]]:
    """Peak allocated GiB over the block (CUDA only; None on CPU, where no allocator tracks it)."""
    out: dict[str, float | None] = {"peak_mem_gib": None}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    try:
        yield out
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            out["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- step ladder
@dataclass
class Rung:
    """One rung of a ladder: `build()` returns a zero-argument step over device-resident inputs."""

    name: str
    build: Callable[[], Callable[[], Any]] | None
    skip_reason: str = ""
    warmup_extra: int = 0  # GraphedStep needs its own warm-up + capture before timing
    # build(rows) instead: the rows measured so far in this ladder (a rung that picks from earlier ones;
    # it raises Skip when there is nothing to pick), and the row's note, set by build
    uses_rows: bool = False
    note: str = ""


def synthetic_views(
    batch: int, res: int, device: torch.device, dtype: torch.dtype, channels_last: bool, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two normalised-looking views, as a loader hands them (N×3×H×W, on device)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(2, batch, 3, res, res, generator=g).to(device=device, dtype=dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return v[0].contiguous(memory_format=fmt), v[1].contiguous(memory_format=fmt)


def _moco_model(opts: Options, device: torch.device, split_bn: str = "blocks") -> nn.Module:
    from fastvpd.config import MocoConfig

    moco_mod = _require("fastvpd.moco", "fastvpd.moco")
    mc = MocoConfig()
    torch.manual_seed(0)
    model = moco_mod.MoCo(
        opts.arch,
        dim=mc.dim,
        mlp_hidden=mc.mlp_hidden,
        queue_size=opts.queue,
        momentum=mc.momentum,
        temperature=mc.temperature,
        margin=mc.margin,
        bn_splits=mc.bn_splits if opts.batch % mc.bn_splits == 0 else 1,
        small_stem=opts.res <= 32,
        split_bn=split_bn,
    )
    return model.to(device).train()


def _lr(opts: Options) -> float:
    from fastvpd.config import OptimConfig

    oc = OptimConfig()
    return oc.lr * opts.batch / oc.lr_batch


def _reference_rung(
    opts: Options, device: torch.device, channels_last: bool, bf16: bool
) -> Callable[[], Any]:
    from benchmarks.reference_moco import ReferenceMoCo, build_optimizer, reference_step
    from fastvpd.config import MocoConfig, OptimConfig

    mc, oc = MocoConfig(), OptimConfig()
    ref = ReferenceMoCo.from_moco(_moco_model(opts, device), mc.momentum, mc.temperature, mc.margin).to(
        device
    )
    if channels_last:
        ref = ref.to(memory_format=torch.channels_last)
    opt = build_optimizer(ref, _lr(opts), oc.momentum, oc.weight_decay)
    crit = nn.CrossEntropyLoss().to(device)
    v1, v2 = synthetic_views(opts.batch, opts.res, device, torch.float32, channels_last)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def step() -> Any:
        with amp:
            return reference_step(ref, opt, crit, v1, v2)

    return step


# (model.stem_channels, model.stem_impl) of the plain 3-channel cuDNN stem: the MoCo step's own rungs
PLAIN_STEM: tuple[int, str] = (3, "direct")


def _package_rung(
    opts: Options,
    device: torch.device,
    graphed: bool,
    compiled: bool,
    split_bn: str = "blocks",
    precision: Any = None,
    inductor: dict[str, Any] | None = None,
    overlap: bool = False,
    stem: tuple[int, str] = PLAIN_STEM,
) -> Callable[[], Any]:
    """The package's MoCo step; `inductor`: torch._inductor.config settings its compile runs under;
    `overlap`: the key encoder on a second CUDA stream (moco.overlap_key); `stem`: the stem's input
    channels and form (model.stem_channels, model.stem_impl)."""
    step_mod = _require("fastvpd.step", "fastvpd.step")
    from fastvpd.config import OptimConfig
    from fastvpd.optim import build_sgd

    oc = OptimConfig()
    model = _moco_model(opts, device, split_bn)
    _require("fastvpd.models", "fastvpd.models").adapt_stem(model, *stem)
    model = model.to(memory_format=torch.channels_last)
    if compiled:
        # Dynamo would reuse an earlier rung's compiled code for these new modules (it does not guard on
        # Inductor's settings); Inductor's on-disk cache still makes an unchanged compile quick
        torch._dynamo.reset()
        model.encoder_q = torch.compile(model.encoder_q)
        model.encoder_k = torch.compile(model.encoder_k)
    lr = torch.tensor(_lr(opts), dtype=torch.float32, device=device)  # as fastvpd.pretrain: a device lr
    opt = build_sgd(model.encoder_q.parameters(), oc, lr)
    step_mod.pin_lr(opt, lr)
    if precision is None:  # (benchmarks/traffic.py passes a CPU bf16 one to model a GPU step's bytes)
        precision = step_mod.Precision(opts.amp if device.type == "cuda" else "none", device)
    meters = step_mod.DeviceMeters(step_mod.MOCO_METRICS, device)
    dtype = precision.dtype or torch.float32
    v1, v2 = synthetic_views(opts.batch, opts.res, device, dtype, True)

    side = torch.cuda.Stream(device) if overlap and device.type == "cuda" else None

    def fn(a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
        return step_mod.moco_step(model, opt, precision, meters, a, b, key_stream=side)

    if inductor:  # compiling is lazy: the settings must hold on the calls that compile (the first)
        plain = fn

        def fn(a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
            with torch._inductor.config.patch(inductor):
                return plain(a, b)

    if graphed:
        g = step_mod.GraphedStep(fn, enabled=True, warmup=3, log=log)
        return lambda: g(v1, v2)
    return lambda: fn(v1, v2)


def moco_ladder(opts: Options, device: torch.device) -> list[Rung]:
    gpu = device.type == "cuda"
    no_gpu = "needs a CUDA GPU"
    rungs = [
        Rung("reference fp32 NCHW", lambda: _reference_rung(opts, device, False, False)),
        Rung("+ channels-last", lambda: _reference_rung(opts, device, True, False)),
        Rung(
            "+ bf16 autocast",
            (lambda: _reference_rung(opts, device, True, True)) if gpu else None,
            "" if gpu else "bf16 autocast is GPU-only (CPU trains fp32)",
        ),
        Rung("+ fused enqueue/foreach momentum", lambda: _package_rung(opts, device, False, False)),
        Rung(
            "+ CUDA graph",
            (lambda: _package_rung(opts, device, True, False)) if gpu else None,
            "" if gpu else no_gpu,
            warmup_extra=4,
        ),
        Rung(
            EAGER_2ND,
            (lambda: _package_rung(opts, device, True, False, overlap=True)) if gpu else None,
            "" if gpu else no_gpu,
            warmup_extra=4,
        ),
    ]
    # the stem computed other ways (model.stem_channels / stem_impl): cuDNN pads 3 channels to 8 itself and
    # ran the 7x7 stem with an Ampere-era kernel, 1.5 ms a forward on an H100 (run 4). Eager rungs are
    # cheap; the stem is an extern kernel in the compiled step too, so they say which to compile
    for label, stem in STEMS:
        rungs.append(
            Rung(
                eager_stem_rung(label),
                (lambda stem=stem: _package_rung(opts, device, True, False, overlap=True, stem=stem))
                if gpu
                else None,
                "" if gpu else no_gpu,
                warmup_extra=4,
            )
        )
    # split-BN's other eager implementation (all groups' statistics in two reductions): graphed on a GPU
    rungs.append(
        Rung(
            "+ split-BN fused statistics",
            lambda: _package_rung(opts, device, gpu, False, "fused"),
            warmup_extra=4 if gpu else 0,
        )
    )
    if opts.compile:
        rungs.append(
            Rung(
                "+ torch.compile (eager step)",
                lambda: _package_rung(opts, device, False, True),
                warmup_extra=2,
            )
        )
        if gpu:
            rungs.append(
                Rung(
                    COMPILED,
                    lambda: _package_rung(opts, device, True, True),
                    warmup_extra=4,
                )
            )
            rungs.append(
                Rung(
                    COMPILED_2ND,
                    lambda: _package_rung(opts, device, True, True, overlap=True),
                    warmup_extra=4,
                )
            )
            for label, stem in STEMS:
                rungs.append(
                    Rung(
                        compiled_stem_rung(label),
                        lambda stem=stem: _package_rung(opts, device, True, True, overlap=True, stem=stem),
                        warmup_extra=4,
                    )
                )
            fastest = Rung(compiled_stem_rung(FASTEST_STEM), None, uses_rows=True)

            def build_fastest(rows: list[dict[str, Any]]) -> Callable[[], Any]:
                label, stem, why = fastest_eager_stem(rows)
                fastest.note = why
                log(f"{fastest.name}: {why}")
                if stem is None:
                    raise Skip(why)
                return _package_rung(opts, device, True, True, overlap=True, stem=stem)

            fastest.build = build_fastest
            rungs.append(fastest)
            for label, settings in INDUCTOR_VARIANTS if opts.inductor_variants else ():  # a compile each
                rungs.append(
                    Rung(
                        f"+ torch.compile + CUDA graph, {label}",
                        lambda settings=settings: _package_rung(opts, device, True, True, inductor=settings),
                        warmup_extra=4,
                    )
                )
    return rungs


# (label, (model.stem_channels, model.stem_impl)) the ladder times besides PLAIN_STEM
STEMS: tuple[tuple[str, tuple[int, str]], ...] = (
    ("stem input padded to 4 channels", (4, "direct")),
    ("stem input padded to 8 channels", (8, "direct")),
    ("stem as space-to-depth", (3, "s2d")),
    ("stem as space-to-depth on 4 channels", (4, "s2d")),
    ("stem as im2col + GEMM", (3, "im2col")),
)
FASTEST_STEM = "the eager rungs' fastest stem"
# the rung names the stem pickers below (fastest_eager_stem, profiled_form) read back from the rows
COMPILED = "+ torch.compile + CUDA graph"
EAGER_2ND = "+ CUDA graph, key encoder on a 2nd stream"
COMPILED_2ND = "+ torch.compile + CUDA graph, key encoder on a 2nd stream"


def eager_stem_rung(label: str) -> str:
    return f"+ CUDA graph, 2nd stream, {label}"


def compiled_stem_rung(label: str) -> str:
    return f"+ torch.compile + CUDA graph, 2nd stream, {label}"


def _measured_rates(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """rung name -> samples/s of the rows this run measured (skipped and failed rows left out)."""
    return {r["name"]: r["samples_s"] for r in rows if r.get("status") == "ok"}


def fastest_eager_stem(rows: Sequence[dict[str, Any]]) -> tuple[str, tuple[int, str] | None, str]:
    """(label, stem, why): the stem whose eager captured rung beat the plain stem's (the 2nd-stream rung,
    same run) by the most, or stem None when none was measured or none beat it (nothing worth a compile)."""
    ok = _measured_rates(rows)
    base = ok.get(EAGER_2ND)
    if base is None:
        return "", None, f"'{EAGER_2ND}' was not measured in this run: no eager baseline to beat"
    timed = [
        (ok[eager_stem_rung(label)], label, stem) for label, stem in STEMS if eager_stem_rung(label) in ok
    ]
    if not timed:
        return "", None, "no eager stem rung was measured in this run"
    best, label, stem = max(timed)
    if best <= base:
        return (
            "",
            None,
            f"no eager stem rung beat the plain stem ({base:.1f} samples/s; best {label}, {best:.1f})",
        )
    return (
        label,
        stem,
        f"{label}: {best:.1f} against {base:.1f} samples/s eager (+{100 * (best / base - 1):.1f} %)",
    )


# Inductor settings the compiled, captured MoCo step is also timed with (GPU, --compile): issue #4's step
# ran at 3909 samples/s against 4000 in H100 run 3. 1x1 convolutions (half of ResNet-50's) lowered to
# GEMMs; Triton kernels (BN's reductions, the fused elementwise chains) tuned by coordinate descent.
INDUCTOR_VARIANTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("1x1 convs as GEMMs", {"conv_1x1_as_mm": True}),
    ("coordinate-descent tuning", {"coordinate_descent_tuning": True}),
)


RowHook = Callable[[list[dict[str, Any]]], None]


def run_ladder(
    rungs: Sequence[Rung],
    opts: Options,
    device: torch.device,
    peak_tflops: float | None,
    flops_from: int = 0,
    on_row: RowHook | None = None,
) -> dict[str, Any]:
    """Measure each rung; FLOPs counted once on rung `flops_from` (same maths on every rung).

    `opts.rungs` (a regex) skips the rungs it does not match, except the first: the baseline of every
    speed-up. `on_row(rows)` runs after each measured rung, so a run cut short keeps what it measured."""
    rows: list[dict[str, Any]] = []
    flops: float | None = None
    hw_rows: dict[str, Any] = {}
    for i, rung in enumerate(rungs):
        if i and opts.rungs and not re.search(opts.rungs, rung.name):
            rows.append(skipped(rung.name, f"not selected by --rungs {opts.rungs!r}"))
            continue
        if rung.build is None:
            rows.append(skipped(rung.name, rung.skip_reason))
            log(f"{rung.name}: skipped ({rung.skip_reason})")
            continue
        log(f"{rung.name}: measuring")
        started = time.perf_counter()  # the rung's whole cost (build, compile, warm-up): for GPU budgets
        free_memory(device)
        try:
            with peak_memory(device) as mem, HwMonitor(device) as hw:
                step = rung.build(rows) if rung.uses_rows else rung.build()
                warmup = opts.warmup + rung.warmup_extra
                if flops is None and i >= flops_from:
                    flops = count_flops(step)  # a real step: it counts as one of the warm-up calls
                    warmup = max(warmup - 1, 0)
                t = time_steps(step, device, warmup, opts.repeats)
            del step
        except Skip as e:
            row = skipped(rung.name, str(e))
        except Exception as e:  # one rung failing must not sink the report
            traceback.print_exc()
            row = skipped(rung.name, _first_line(e), status="failed")
        else:
            row = {"name": rung.name, "status": "ok", **t, **mem}
            if rung.note:
                row["note"] = rung.note
            row["samples_s"] = opts.batch / (t["ms_per_step"] / 1000.0)
            if flops:
                achieved = flops / (t["ms_per_step"] / 1000.0)
                row["gflops"] = achieved / 1e9
                if peak_tflops:
                    row["mfu_pct"] = 100.0 * achieved / (peak_tflops * 1e12)
            hw_rows[rung.name] = hw.result
            row["wall_s"] = time.perf_counter() - started
            log(
                f"{rung.name}: {row['ms_per_step']:.2f} ms/step, {row['samples_s']:.1f} samples/s "
                f"({row['wall_s']:.0f} s in all)"
            )
        finally:
            free_memory(device)
        rows.append(row)
        if on_row is not None and i < len(rungs) - 1:  # the section's own report follows the last rung
            on_row(rows)
    base = next((r for r in rows if r["status"] == "ok"), None)
    for r in rows:
        if r["status"] == "ok" and base is not None:
            r["speedup"] = base["ms_per_step"] / r["ms_per_step"]
    return {"rows": rows, "flops_per_step": flops, "hw": hw_rows}


# ---------------------------------------------------------------------------------------------- loaders
def _backend_available(backend: str) -> str:
    """'' when the backend's package imports here, else the reason it cannot run."""
    backend = _loader_variant(backend)[0]
    mod = {"ffcv": "ffcv", "dali": "nvidia.dali", "torchvision": "torchvision", "cache": "numpy"}[backend]
    try:
        from fastvpd.data import torch_threads_kept

        with torch_threads_kept():  # importing ffcv would leave torch on one thread
            __import__(mod)
    except Exception as e:  # ImportError, or a broken native library
        return f"{mod} not installed ({_first_line(e)})"
    return ""


def prepare_data(opts: Options) -> Path:
    """A synthetic ImageNet-like set, converted into every format whose package is present (cached on disk).

    Returns the converted root (holding manifest.json). Conversion skips formats that are up to date.
    """
    synth = _require("data_tools.make_synthetic", "data_tools.make_synthetic")
    conv = _require("data_tools.convert", "data_tools.convert")
    base = Path(opts.data_dir)
    src, out = base / "src", base / "converted"
    if not (src / ".complete").is_file():
        classes = 10
        log(f"making {opts.images} synthetic ImageNet-like JPEGs ({classes} classes) in {src}")
        if src.exists():
            shutil.rmtree(src)
        synth.make_synthetic(
            src,
            classes,
            max(1, opts.images // classes),
            seed=0,
            splits=("train",),
            workers=opts.loader_workers,
            progress=False,
        )
        (src / ".complete").write_text("ok\n")
    formats = [f for f in ("ffcv", "dali", "cache") if not _backend_available(f)]
    log(f"converting ({', '.join(formats) or 'files only'}) into {out}")
    conv.convert(src, out, formats=formats or ["cache"], workers=opts.loader_workers, progress=False)
    return out


def device_events(call: Callable[[], Any], device: torch.device, reps: int) -> Any:
    """torch.profiler's key averages (CUDA activity) over `reps` calls of `call`, after one untimed call
    (which fills a pipeline or compiles)."""
    from torch.profiler import ProfilerActivity, profile

    call()
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            call()
        sync(device)
    return prof.key_averages()


def _device_ms_per_batch(
    loader: Any, device: torch.device, batches: int
) -> tuple[float, list[dict[str, Any]]] | None:
    """Device kernel time per batch (torch.profiler CUDA activity) for backends that work on the GPU, and
    the kernels that take it (top_ops)."""
    if device.type != "cuda":
        return None
    it = iter(loader)
    events = device_events(lambda: next(it), device, batches)
    total_us = sum(_self_us(e, on_device=True) for e in events)
    return total_us / 1000.0 / batches, top_ops(events, batches, on_device=True, top=8)


def _cycle(loader: Any) -> Iterator[Any]:
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


class GraphedViews:
    """The cache loader with its views rendered as the training step renders them (data.aug_in_step):
    index-only batches, the generator seeded on the host, the augmentation replayed from one CUDA graph.
    The views are the graph's static outputs (valid until the next batch), as inside the step."""

    def __init__(self, loader: Any) -> None:
        step_mod = _require("fastvpd.step", "fastvpd.step")
        why = loader.defer_views()
        if why:
            raise Skip(f"views cannot be rendered in a graph: {why}")
        self.loader = loader

        def render(indices: torch.Tensor) -> dict[str, torch.Tensor]:
            return {str(i): v for i, v in enumerate(loader.augment(indices))}

        gens = loader.generators
        self.step = step_mod.GraphedStep(render, enabled=True, warmup=2, log=log, generators=gens)

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.loader.set_epoch(epoch, start_step)

    def __iter__(self) -> Iterator[Any]:
        for b in self.loader:
            self.loader.seed_views(b)
            out = self.step(b.indices)
            yield type(b)([out[str(i)] for i in range(len(out))], b.labels, b.indices)


def loader_schedule(per_epoch: int, wanted: int, workers: int = 1, warm_min: int = 1) -> tuple[int, int, str]:
    """(warm-up, timed, note): how many batches to draw after the first, then to time, inside one epoch.

    A DataLoader with `workers` processes hands batch i to worker i % workers, and each builds a whole
    batch, so batches come in rounds of `workers`: a round's batches all arrive about one batch-build time
    after the previous round's. Timing part of a round charges the whole round's time to that part (run 3
    timed 8 batches of a 16-worker round and halved the torchvision baseline), and timing across the
    epoch's end adds the idle restart. So: warm up for at least `warm_min` batches after the first, on to
    the end of a round, time whole rounds (at least `wanted` batches, fewer whole rounds if the epoch is
    short), and say so when not even one round fits. Thread-pool loaders are `workers=1`. `note` is ""
    when the timing is clean.
    """
    warm = -(-(warm_min + 1) // workers) * workers - 1  # batch `warm` ends a round
    timed = -(-wanted // workers) * workers
    room = per_epoch - 1 - warm
    if timed <= room:
        return warm, timed, ""
    if room >= workers:
        return warm, room // workers * workers, ""
    warm = max(1, min(warm, per_epoch - 1 - wanted))
    return (
        warm,
        wanted,
        (
            f"epoch of {per_epoch} batches < {1 + warm} warm-up + {timed} timed (whole rounds of "
            f"{workers} workers): the timing includes idle workers or an epoch restart (use --images to "
            "lengthen the epoch)"
        ),
    )


def measure_one_loader(name: str, root: Path, opts: Options, device: torch.device) -> dict[str, Any]:
    from omegaconf import OmegaConf

    data_mod = _require("fastvpd.data", "fastvpd.data")
    from fastvpd.config import DataConfig

    backend, settings = _loader_variant(name)
    cfg = OmegaConf.structured(
        DataConfig(root=str(root), backend=backend, workers=opts.loader_workers, verify="off", **settings)
    )
    dtype = torch.bfloat16 if device.type == "cuda" and opts.amp == "bf16" else torch.float32
    spec = data_mod.moco_v2(opts.res)
    t0 = time.perf_counter()
    if name in GPU_ROWS and device.type != "cuda":
        raise Skip(f"needs a CUDA GPU (on CPU it is the {backend} row)")
    loader = data_mod.build_loader(cfg, spec, "train", opts.batch, device, dtype, seed=0)
    if name in GRAPHED_ROWS:
        loader = GraphedViews(loader)
    it = _cycle(loader)
    first = next(it)
    assert len(first.views) == 2 and first.views[0].shape[-1] == opts.res, "loader broke the contract"
    sync(device)
    first_s = time.perf_counter() - t0
    per_epoch = len(loader)
    workers = max(1, getattr(loader, "workers", 1)) if backend == "torchvision" else 1
    # two eager warm-up renders (the first compiles, for cache_compiled), then the capture
    warm, timed, note = loader_schedule(
        per_epoch, opts.loader_batches, workers, 3 if name in GRAPHED_ROWS else 1
    )
    for _ in range(warm):
        next(it)
    sync(device)
    with HwMonitor(device) as hw:
        t = time.perf_counter()
        for _ in range(timed):
            next(it)
        sync(device)
        dt = time.perf_counter() - t
    row: dict[str, Any] = {
        "name": name,
        "status": "ok",
        "samples_s": timed * opts.batch / dt,
        "ms_per_batch": 1000.0 * dt / timed,
        "first_batch_s": first_s,
        "cpu_util_pct": hw.result.get("cpu_util_pct"),
        "cpu_util_per_core_pct": hw.result.get("cpu_util_per_core_pct"),
        "process_cpu_s": hw.result.get("process_cpu_s"),
        "gpu": hw.result.get("gpu"),
        "batches": timed,
        "warmup_batches": 1 + warm,
    }
    if note:
        row["note"] = note
        log(f"loader {name}: {note}")
    if backend in ("cache", "ffcv", "dali"):
        try:
            dev = _device_ms_per_batch(loader, device, min(3, opts.loader_batches))
            if dev is not None:
                row["device_ms_per_batch"], row["device_top"] = dev
        except Exception as e:  # the profiler is a nice-to-have
            row["device_ms_note"] = _first_line(e)
    getattr(loader, "close", lambda: None)()  # torchvision: its persistent workers go now
    del it, loader
    return row


@contextlib.contextmanager
def patched(module: Any, **values: Any) -> Iterator[None]:
    """The module's attributes set to `values` inside, restored after (also when the body raises)."""
    prev = {k: getattr(module, k) for k in values}
    for k, v in values.items():
        setattr(module, k, v)
    try:
        yield
    finally:
        for k, v in prev.items():
            setattr(module, k, v)


def _compiled_form(form: str | None) -> contextlib.AbstractContextManager[None]:
    """gpu_aug.COMPILED_FORM set to `form` inside (None: as it is), restored after."""
    from fastvpd.data import gpu_aug

    return patched(gpu_aug, COMPILED_FORM=form) if form is not None else contextlib.nullcontext()


def section_loaders(opts: Options, device: torch.device) -> dict[str, Any]:
    root = prepare_data(opts)
    rows = []
    for backend in LOADER_BACKENDS:
        if backend not in opts.loader_backends:
            rows.append(skipped(backend, "not in --loader-backends"))
            continue
        if backend in COMPILED_ROWS and not opts.compile:
            rows.append(skipped(backend, "needs --compile (Inductor's first compile takes a while)"))
            continue
        why = _backend_available(backend)
        if why:
            rows.append(skipped(backend, why))
            continue
        log(f"loader {backend}: measuring {opts.loader_batches} batches of {opts.batch}")
        try:
            with _compiled_form("pointwise" if backend == "cache_compiled_pointwise" else None):
                rows.append(measure_one_loader(backend, root, opts, device))
            log(f"loader {backend}: {rows[-1]['samples_s']:.1f} samples/s")
        except Skip as e:
            rows.append(skipped(backend, str(e)))
        except (UserError, ConfigError) as e:
            rows.append(skipped(backend, str(e).splitlines()[0][:160]))
        except Exception as e:
            traceback.print_exc()
            rows.append(skipped(backend, _first_line(e), status="failed"))
        free_memory(device)
    base = next((r for r in rows if r["name"] == "torchvision" and r["status"] == "ok"), None)
    for r in rows:
        if base is not None and r["status"] == "ok":
            r["speedup"] = r["samples_s"] / base["samples_s"]
    notes = [
        f"{opts.images} synthetic ImageNet-like JPEGs, {opts.loader_workers} worker(s), "
        f"batch {opts.batch}, {opts.res} px views; speed-up vs torchvision",
    ]
    notes += [f"{r['name']}: {r['note']}" for r in rows if r.get("note")]
    ok = [r for r in rows if r["status"] == "ok" and r.get("speedup")]
    if ok:
        best = max(ok, key=lambda r: r["samples_s"])
        notes.append(f"best: {best['name']} at {best['speedup']:.2f}x torchvision")
    from benchmarks.decode import section_decode  # here: benchmarks.decode imports this module

    decode = section_decode(root, opts, device)  # JPEG decode alone, same files (never raises)
    out = {"rows": rows, "data_root": str(root), "notes": notes, "decode": decode}
    if "cache_triton" in opts.loader_backends and device.type == "cuda":
        from benchmarks.aug_tune import section_triton_tuning  # imports this module too

        out["triton_tuning"] = section_triton_tuning(root, opts, device)  # never raises
    return out


# ---------------------------------------------------------------------------------------------- steps
_PEAK_CACHE: dict[str, tuple[float | None, str]] = {}


def device_peak(device: torch.device) -> tuple[float | None, str]:
    """(dense bf16 TFLOP/s, where it came from) for MFU; (None, '') on CPU. Measured once if unknown."""
    if device.type != "cuda":
        return None, ""
    name = torch.cuda.get_device_name(device)
    if name not in _PEAK_CACHE:
        peak = peak_bf16_tflops(name)
        _PEAK_CACHE[name] = (
            (peak, "data sheet (dense bf16)")
            if peak
            else (measure_matmul_tflops(device), "measured bf16 matmul")
        )
    return _PEAK_CACHE[name]


def section_steps(opts: Options, device: torch.device, on_row: RowHook | None = None) -> dict[str, Any]:
    peak, peak_source = device_peak(device)
    res = run_ladder(moco_ladder(opts, device), opts, device, peak, on_row=on_row)
    notes = [
        f"{opts.arch} at {opts.res} px, batch {opts.batch}, queue {opts.queue}; speed-up vs the reference"
    ]
    if res["flops_per_step"]:
        notes.append(f"{res['flops_per_step'] / 1e9:.1f} GFLOP per step (FlopCounterMode, fwd+bwd)")
    if peak:
        notes.append(f"MFU against {peak:.0f} TFLOP/s ({peak_source})")
    elif device.type == "cpu":
        notes.append("CPU: achieved GFLOP/s instead of MFU")
    res.update(notes=notes, peak_tflops=peak, peak_source=peak_source)
    if opts.profile:
        res["profile"] = profile_step(opts, device, *profiled_form(res["rows"], device))
    return res


def profiled_form(rows: Sequence[dict[str, Any]], device: torch.device) -> tuple[bool, tuple[int, str]]:
    """(key encoder on a 2nd stream, stem) of the fastest compiled captured rung this run measured, so the
    profile shows the step that is the figure; the plain compiled step when none of them ran."""
    plain: tuple[bool, tuple[int, str]] = (False, PLAIN_STEM)
    if device.type != "cuda":
        return plain
    # (rung, its form): the compiled rungs, in the ladder's order (the first of equal rates wins)
    candidates = [(COMPILED, plain), (COMPILED_2ND, (True, PLAIN_STEM))]
    candidates += [(compiled_stem_rung(label), (True, stem)) for label, stem in STEMS]
    picked = fastest_eager_stem(rows)[1]
    if picked is not None:
        candidates.append((compiled_stem_rung(FASTEST_STEM), (True, picked)))
    ok = _measured_rates(rows)
    forms = [(ok[name], form) for name, form in candidates if name in ok]
    return max(forms, key=lambda f: f[0])[1] if forms else plain


# ---------------------------------------------------------------------------------------------- distillation
def _distill_rung(
    opts: Options,
    device: torch.device,
    channels_last: bool,
    amp: str,
    graphed: bool,
    compiled: bool = False,
    precision: Any = None,
) -> Callable[[], Any]:
    """The package's distillation step (OFD): frozen teacher forward, student forward/backward, connectors."""
    classifier = _require("fastvpd.classifier", "fastvpd.classifier (distillation step)")
    step_mod = _require("fastvpd.step", "fastvpd.step")
    from fastvpd.config import DistillConfig, OptimConfig
    from fastvpd.optim import build_sgd

    dc, oc = DistillConfig(), OptimConfig(lr=0.1, nesterov=True, schedule="step")
    small = opts.res <= 32
    torch.manual_seed(0)
    student = classifier.Classifier(opts.arch, DISTILL_CLASSES, small)
    teacher = classifier.build_teacher(student.backbone.state_dict(), opts.arch, small)  # self-distillation
    net = classifier.DistillNet(student, teacher, "ofd", dc.teacher_bn, list(dc.stage_weights)).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    if compiled:
        torch._dynamo.reset()  # (as in _package_rung)
        net.compile()  # as fastvpd.distill with train.compile=true
    lr = torch.tensor(oc.lr * opts.batch / oc.lr_batch, dtype=torch.float32, device=device)
    opt = build_sgd(net.trainable(), oc, lr)
    step_mod.pin_lr(opt, lr)
    if precision is None:  # (as in _package_rung)
        precision = step_mod.Precision(amp, device)
    meters = step_mod.DeviceMeters(classifier.DISTILL_METRICS, device)
    x, _ = synthetic_views(opts.batch, opts.res, device, precision.dtype or torch.float32, channels_last)
    y = torch.randint(0, DISTILL_CLASSES, (opts.batch,), generator=torch.Generator().manual_seed(0)).to(
        device
    )

    def fn(a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
        return classifier.distill_step(
            net, opt, precision, meters, a, b, lam=dc.lam, smoothing=dc.label_smoothing, distill_on=True
        )

    if graphed:
        g = step_mod.GraphedStep(fn, enabled=True, warmup=3, log=log)
        return lambda: g(x, y)
    return lambda: fn(x, y)


def section_distill(opts: Options, device: torch.device, on_row: RowHook | None = None) -> dict[str, Any]:
    _require("fastvpd.classifier", "fastvpd.classifier (distillation step)")
    gpu = device.type == "cuda"
    amp = opts.amp if gpu else "none"
    rungs = [
        Rung("eager fp32 NCHW", lambda: _distill_rung(opts, device, False, "none", False)),
        Rung("+ channels-last", lambda: _distill_rung(opts, device, True, "none", False)),
        Rung(
            "+ bf16 autocast",
            (lambda: _distill_rung(opts, device, True, amp, False)) if gpu else None,
            "" if gpu else "bf16 autocast is GPU-only (CPU trains fp32)",
        ),
        Rung(
            "+ CUDA graph",
            (lambda: _distill_rung(opts, device, True, amp, True)) if gpu else None,
            "" if gpu else "needs a CUDA GPU",
            warmup_extra=4,
        ),
    ]
    if opts.compile and gpu:
        rungs.append(
            Rung(
                "+ torch.compile + CUDA graph",
                lambda: _distill_rung(opts, device, True, amp, True, compiled=True),
                warmup_extra=4,
            )
        )
    peak, _ = device_peak(device)
    res = run_ladder(rungs, opts, device, peak, on_row=on_row)
    res["notes"] = [
        f"student = teacher = {opts.arch} ({DISTILL_CLASSES} classes), OFD on 4 stages, {opts.res} px, "
        f"batch {opts.batch}; speed-up vs eager fp32 NCHW (the package's step, no separate reference)"
    ]
    if res["flops_per_step"]:
        res["notes"].append(f"{res['flops_per_step'] / 1e9:.1f} GFLOP per step (FlopCounterMode, fwd+bwd)")
    return res


# ---------------------------------------------------------------------------------------------- report
# (section key, title, [(column title, row key, format)]) — the order the report shows them in.
Column = tuple[str, str, str]
STEP_COLUMNS: tuple[Column, ...] = (  # the MoCo and the distillation ladders share their columns
    ("rung", "name", "s"),
    ("samples/s", "samples_s", ".1f"),
    ("ms/step", "ms_per_step", ".2f"),
    ("speed-up", "speedup", ".2fx"),
    ("peak GiB", "peak_mem_gib", ".2f"),
    ("MFU %", "mfu_pct", ".1f"),
    ("GFLOP/s", "gflops", ".1f"),
)
TABLES: tuple[tuple[str, str, tuple[Column, ...]], ...] = (
    (
        "loaders",
        "Loaders: two-view moco_v2 batches",
        (
            ("backend", "name", "s"),
            ("samples/s", "samples_s", ".1f"),
            ("speed-up", "speedup", ".2fx"),
            ("ms/batch", "ms_per_batch", ".1f"),
            ("CPU %", "cpu_util_pct", ".0f"),
            ("dev ms/batch", "device_ms_per_batch", ".2f"),
            ("first batch s", "first_batch_s", ".1f"),
        ),
    ),
    (
        "steps",
        "MoCo step ladder (device-resident inputs)",
        STEP_COLUMNS,
    ),
    (
        "distill",
        "Distillation step ladder (teacher fwd + student fwd/bwd + connectors)",
        STEP_COLUMNS,
    ),
    (
        "e2e",
        "End to end: fastvpd.pretrain over each loader",
        (
            ("backend", "name", "s"),
            ("samples/s", "samples_s", ".1f"),
            ("speed-up", "speedup", ".2fx"),
            ("data stall %", "stall_pct", ".1f"),
            ("steps", "steps", "d"),
            ("wall s", "wall_s", ".1f"),
            ("CPU %", "cpu_util_pct", ".0f"),
            ("GPU SM %", "gpu_sm_util_pct", ".0f"),
        ),
    ),
)


# the loaders section's sub-table: results["loaders"]["decode"] (benchmarks/decode.py)
DECODE_TITLE = "JPEG decode alone: full-size uint8 RGB, encoded bytes in memory"
DECODE_COLUMNS: tuple[Column, ...] = (
    ("decoder", "name", "s"),
    ("images/s", "images_per_s", ".1f"),
    ("speed-up", "speedup", ".2fx"),
    ("ms/batch", "ms_per_batch", ".1f"),
)

# ... and results["loaders"]["triton_tuning"] (benchmarks/aug_tune.py)
TUNING_TITLE = "Triton augmentation launch shapes: GPU time per two-view batch"
TUNING_COLUMNS: tuple[Column, ...] = (
    ("pixels per program x warps", "name", "s"),
    ("GPU ms/batch", "device_ms_per_batch", ".2f"),
    ("Triton kernels ms", "triton_ms_per_batch", ".2f"),
    ("samples/s", "samples_s", ".0f"),
)
SUBTABLES = (("decode", DECODE_TITLE, DECODE_COLUMNS), ("triton_tuning", TUNING_TITLE, TUNING_COLUMNS))

PROFILE_TITLE = "Where the step's time goes: top ops by self time"
PROFILE_COLUMNS: tuple[Column, ...] = (
    ("op (GPU: kernel)", "name", "s"),
    ("ms/step", "ms_per_step", ".2f"),
    ("share %", "pct", ".1f"),
    ("calls/step", "calls_per_step", ".0f"),
)


def _top_tables(sec: dict[str, Any]) -> list[tuple[str, list[dict[str, Any]]]]:
    """(title, rows) of a section's top-ops tables: the step profile's, and the kernels of the fastest
    loader that works on the GPU (per batch)."""
    out = []
    prof = sec.get("profile") or {}
    if prof.get("top"):
        out.append((f"{PROFILE_TITLE} ({prof.get('what', 'step')}, {prof.get('steps')} steps)", prof["top"]))
    gpu_rows = [r for r in sec.get("rows", []) if r.get("status") == "ok" and r.get("device_top")]
    if gpu_rows:
        best = max(gpu_rows, key=lambda r: r.get("samples_s") or 0.0)
        out.append((f"GPU kernels of loader '{best['name']}' (ms/step = per batch)", best["device_top"]))
    return out


def fmt_value(value: Any, fmt: str) -> str:
    """One table cell: '-' for missing, 'x' suffix for ratios, plain str for text."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if fmt == "s":
        return str(value)
    if fmt.endswith("x"):
        return f"{value:{fmt[:-1]}}x"
    if fmt == "d":
        return str(int(value))
    return f"{value:{fmt}}"


def _cells(rows: Sequence[dict[str, Any]], cols: Sequence[Column]) -> list[list[str]]:
    out = []
    for row in rows:
        if row.get("status", "ok") != "ok":
            reason = f"{row.get('status', 'skipped')}: {row.get('reason', '')}"
            out.append([str(row.get("name", "?")), reason] + [""] * (len(cols) - 2))
        else:
            out.append([fmt_value(row.get(key), f) for _, key, f in cols])
    return out


def text_table(rows: Sequence[dict[str, Any]], cols: Sequence[Column]) -> str:
    """Fixed-width table; a skipped row prints its reason across the figure columns."""
    head = [c[0] for c in cols]
    body = _cells(rows, cols)
    widths = [len(h) for h in head]
    for r, row in zip(body, rows):
        for i, cell in enumerate(r):
            if row.get("status", "ok") != "ok" and i == 1:
                continue  # the reason spans the columns; it must not widen one
            widths[i] = max(widths[i], len(cell))
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for r, row in zip(body, rows):
        if row.get("status", "ok") != "ok":
            lines.append(r[0].ljust(widths[0]) + "  " + r[1])
        else:
            lines.append(
                "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
            )
    return "\n".join(lines)


def md_table(rows: Sequence[dict[str, Any]], cols: Sequence[Column]) -> str:
    head = [c[0] for c in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(cols) - 1)) + "|"]
    for r in _cells(rows, cols):
        lines.append("| " + " | ".join(c.replace("|", "/") for c in r) + " |")
    return "\n".join(lines)


def _meta_lines(meta: dict[str, Any]) -> list[str]:
    keys = (
        "device_name",
        "gpu_memory_gib",
        "driver",
        "torch",
        "cuda_runtime",
        "cudnn",
        "torchvision",
        "python",
        "cpu_model",
        "cpu_cores",
        "git_commit",
        "date",
    )
    return [f"{k}: {meta[k]}" for k in keys if meta.get(k) is not None]


def _notes(section: dict[str, Any]) -> list[str]:
    return [str(n) for n in section.get("notes", [])]


def _projection_lines(proj: dict[str, Any]) -> list[str]:
    if not proj:
        return []
    if proj.get("status", "ok") != "ok":
        return [f"projection skipped: {proj.get('reason', '')}"]
    lines = []
    for part in ("pretrain", "distill"):
        p = proj.get(part)
        if p:
            lines.append(
                f"{part}: {p['epochs']} epochs x {p['images']} images at {p['samples_s']:.1f} samples/s "
                f"({p['source']}) = {p['hours']:.2f} h"
            )
    if proj.get("total_hours") is not None:
        lines.append(f"total: {proj['total_hours']:.2f} h")
    return lines


def render_text(results: dict[str, Any]) -> str:
    """The whole report as terminal text."""
    out = ["fastvpd throughput benchmark", *("  " + m for m in _meta_lines(results.get("meta", {})))]
    for key, title, cols in TABLES:
        sec = results.get(key)
        if not sec:
            continue
        out += ["", title]
        if sec.get("status", "ok") != "ok":
            out.append(f"  {sec.get('status')}: {sec.get('reason', '')}")
            continue
        out.append(text_table(sec.get("rows", []), cols))
        out += ["  " + n for n in _notes(sec)]
        for title, top in _top_tables(sec):
            out += ["", title, text_table(top, PROFILE_COLUMNS)]
        for sub_key, sub_title, sub_cols in SUBTABLES:
            dec = sec.get(sub_key)
            if not dec:
                continue
            out += ["", sub_title]
            if dec.get("status", "ok") != "ok":
                out.append(f"  {dec.get('status')}: {dec.get('reason', '')}")
            else:
                out += [text_table(dec.get("rows", []), sub_cols), *("  " + n for n in _notes(dec))]
    proj = _projection_lines(results.get("projection", {}))
    if proj:
        out += ["", "Projection: full recipe (800 pretrain + 100 distill epochs)", *("  " + p for p in proj)]
    return "\n".join(out)


def render_markdown(results: dict[str, Any]) -> str:
    out = ["# fastvpd throughput benchmark", "", *("- " + m for m in _meta_lines(results.get("meta", {})))]
    opts = results.get("options")
    if opts:
        out += ["", "Options: " + ", ".join(f"`{k}={v}`" for k, v in opts.items())]
    for key, title, cols in TABLES:
        sec = results.get(key)
        if not sec:
            continue
        out += ["", f"## {title}", ""]
        if sec.get("status", "ok") != "ok":
            out.append(f"{sec.get('status')}: {sec.get('reason', '')}")
            continue
        out.append(md_table(sec.get("rows", []), cols))
        notes = _notes(sec)
        if notes:
            out += ["", *("- " + n for n in notes)]
        for title, top in _top_tables(sec):
            out += ["", f"### {title}", "", md_table(top, PROFILE_COLUMNS)]
        for sub_key, sub_title, sub_cols in SUBTABLES:
            dec = sec.get(sub_key)
            if not dec:
                continue
            out += ["", f"### {sub_title}", ""]
            if dec.get("status", "ok") != "ok":
                out.append(f"{dec.get('status')}: {dec.get('reason', '')}")
            else:
                out += [md_table(dec.get("rows", []), sub_cols), "", *("- " + n for n in _notes(dec))]
    proj = _projection_lines(results.get("projection", {}))
    if proj:
        out += ["", "## Projection: full recipe", "", *("- " + p for p in proj)]
    if results.get("chart"):
        out += ["", f"![chart]({results['chart']})"]
    return "\n".join(out) + "\n"


def _bars(ax: Any, rows: Sequence[dict[str, Any]], title: str, ylabel: str) -> bool:
    ok = [r for r in rows if r.get("status", "ok") == "ok" and r.get("samples_s")]
    if not ok:
        ax.set_axis_off()
        ax.set_title(f"{title}: nothing measured", fontsize=9)
        return False
    names = [str(r["name"]) for r in ok]
    vals = [float(r["samples_s"]) for r in ok]
    bars = ax.bar(range(len(ok)), vals, color="#4C72B0")
    for b, r in zip(bars, ok):
        if r.get("speedup") is not None:
            ax.annotate(
                f"{r['speedup']:.2f}x",
                (b.get_x() + b.get_width() / 2, b.get_height()),
                ha="center",
                va="bottom",
                fontsize=8,
            )
    ax.set_xticks(range(len(ok)))
    ax.set_xticklabels(names, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    return True


def write_chart(results: dict[str, Any], path: Path) -> bool:
    """PNG with one bar panel per measured section (samples/s, speed-up on top); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = [(k, t) for k, t, _ in TABLES if results.get(k, {}).get("rows")]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        _bars(ax, results[key]["rows"], title.split(":")[0].split(" (")[0], "samples/s")
    device = results.get("meta", {}).get("device_name", "")
    fig.suptitle(f"fastvpd throughput — {device}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def write_report(results: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write results.json, results.md and chart.png (when matplotlib is present) into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    chart = out_dir / "chart.png"
    if write_chart(results, chart):
        paths["png"] = chart
        results = {**results, "chart": chart.name}
    js = out_dir / "results.json"
    tmp = js.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_jsonable(results), indent=2) + "\n")
    tmp.replace(js)
    paths["json"] = js
    md = out_dir / "results.md"
    md.write_text(render_markdown(results))
    paths["md"] = md
    return paths


def _self_us(e: Any, on_device: bool) -> float:
    """A profiler event's self time in µs: on the device (named self_cuda_time_total before torch 2.4), or on
    the CPU."""
    if on_device:
        return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)) or 0.0)
    return float(getattr(e, "self_cpu_time_total", 0.0) or 0.0)


def top_ops(events: Any, steps: int, on_device: bool, top: int = 12) -> list[dict[str, Any]]:
    """The ops (GPU: kernels) with the most self time in a profile, per step and as a share of all of it,
    so a report says where the step's time goes without opening the trace."""
    timed = [(e.key, _self_us(e, on_device), int(getattr(e, "count", 0) or 0)) for e in events]
    timed = [t for t in timed if t[1] > 0]
    total = sum(t[1] for t in timed)
    timed.sort(key=lambda t: -t[1])
    return [
        {
            "name": k[:80],
            "ms_per_step": us / 1000.0 / steps,
            "pct": 100.0 * us / total,
            "calls_per_step": n / steps,
        }
        for k, us, n in timed[:top]
    ]


def profile_step(
    opts: Options, device: torch.device, overlap: bool = False, stem: tuple[int, str] = PLAIN_STEM
) -> dict[str, Any]:
    """torch.profiler trace (Chrome format, gzipped) of a few steps of the package's fastest step (compiled
    with --compile; `overlap`, `stem`: see _package_rung), and its top ops by self time."""
    from torch.profiler import ProfilerActivity, profile

    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "trace.json.gz"
    gpu = device.type == "cuda"
    steps = 3
    try:
        step = _package_rung(opts, device, gpu, opts.compile, overlap=overlap, stem=stem)
        for _ in range(opts.warmup + 4):
            step()
        sync(device)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
        with profile(activities=acts) as prof:
            for _ in range(steps):
                step()
            sync(device)
        prof.export_chrome_trace(str(path))
        top = top_ops(prof.key_averages(), steps, gpu)
    except Exception as e:
        return {"status": "failed", "reason": _first_line(e)}
    finally:
        free_memory(device)
    log(f"profile: wrote {path} (open in chrome://tracing or ui.perfetto.dev)")
    what = ("compiled " if opts.compile else "") + ("captured step" if gpu else "eager step")
    if overlap:
        what += ", key encoder on a 2nd stream"
    if stem != PLAIN_STEM:
        what += f", stem {stem[1]} on {stem[0]} channels"
    return {"status": "ok", "trace": path.name, "steps": steps, "what": what, "top": top}


# ---------------------------------------------------------------------------------------------- end to end
class _TimedLoader:
    """Wraps a loader; records when each batch was asked for and handed over (host clock)."""

    def __init__(self, inner: Any, record: list[tuple[float, float]]) -> None:
        self._inner, self._record = inner, record

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __len__(self) -> int:
        return len(self._inner)

    def __iter__(self) -> Iterator[Any]:
        it = iter(self._inner)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self._record.append((t0, time.perf_counter()))
            yield batch


@contextlib.contextmanager
def _record_train_batches(record: list[tuple[float, float]]) -> Iterator[None]:
    """Wrap every train loader built while the block runs (pretrain's own code stays untouched)."""
    import fastvpd.data as data_mod

    patched: list[tuple[Any, str, Any]] = []
    original = data_mod.build_loader

    def timed_build_loader(*a: Any, **kw: Any) -> Any:
        loader = original(*a, **kw)
        train = kw.get("train", a[9] if len(a) > 9 else True)
        return _TimedLoader(loader, record) if train else loader

    for mod in [m for name, m in list(sys.modules.items()) if name.startswith("fastvpd") and m is not None]:
        if getattr(mod, "build_loader", None) is original:
            mod.build_loader = timed_build_loader
            patched.append((mod, "build_loader", original))
    try:
        yield
    finally:
        for mod, name, fn in patched:
            setattr(mod, name, fn)


def e2e_window(n: int, workers: int = 1) -> tuple[int, int]:
    """(first, last): the timed span of an end-to-end run's n batch arrivals, from first to last.

    The first steps build kernels and capture the graph, so up to 5 are left out. With a DataLoader of
    `workers` processes the span also starts at a round's end and covers whole rounds (`loader_schedule`,
    the n batches as its epoch); a run too short for one round keeps the plain window.
    """
    warm_min = min(5, n // 3)
    warm, timed, note = loader_schedule(n, n, workers, warm_min)
    return (warm_min, n - 1) if note else (warm, warm + timed)


def run_pretrain(
    backend: str, root: Path, opts: Options, device: torch.device, workdir: Path
) -> dict[str, Any]:
    pretrain = _require("fastvpd.pretrain", "fastvpd.pretrain")
    data_backend, settings = _loader_variant(backend)
    # torchvision's workers build whole batches in rounds (see loader_schedule): run two rounds + one
    workers = max(1, opts.loader_workers) if data_backend == "torchvision" else 1
    steps = opts.e2e_steps if workers == 1 else max(opts.e2e_steps, 2 * workers + 1)
    log(f"e2e {backend}: pretrain for {steps} steps")
    argv = [
        f"data.root={root}",
        f"data.backend={data_backend}",
        *(f"data.{k}={v}" for k, v in settings.items()),
        f"data.workers={opts.loader_workers}",
        "data.verify='off'",  # quoted: YAML reads a bare off as False
        f"model.arch={opts.arch}",
        f"aug.res={opts.res}",
        f"train.batch_size={opts.batch}",
        f"moco.queue_size={opts.queue}",
        f"train.device={device.type}",
        f"train.amp={opts.amp if device.type == 'cuda' else 'none'}",
        f"train.max_steps={steps}",
        # --compile: the trainer as the GPU recipes run it (configs/vipriors_*.yaml), encoders and the
        # loader's device pixel work compiled; the first steps compile and are left out of the timing below
        *(["train.compile=true"] if opts.compile else []),
        *(
            ["data.compile_aug=true"]
            if opts.compile and data_backend in ("cache", "ffcv") and device.type == "cuda"
            else []
        ),
        f"train.out_dir={workdir / backend}",
        "train.resume=never",
        f"log.every={max(1, opts.e2e_steps // 4)}",
        "log.tensorboard=false",
        "log.progress=false",
        "eval.knn_every=0",
        "ckpt.every=100000",
    ]
    record: list[tuple[float, float]] = []
    with _record_train_batches(record), HwMonitor(device) as hw:
        t0 = time.perf_counter()
        result = pretrain.run(argv)
        if result.interrupted:  # fit turned a SIGTERM (the suite's timeout) into a checkpoint: stop as asked
            signal.raise_signal(getattr(signal, result.stopped))
        sync(device)
        wall = time.perf_counter() - t0
    n = len(record)
    if n < 4:
        raise RuntimeError(f"pretrain consumed only {n} batches (expected {steps})")
    warm, last = e2e_window(n, workers)
    span = record[last][1] - record[warm][1]
    waits = sum(b - a for a, b in record[warm + 1 : last + 1])
    gpu = hw.result.get("gpu") or {}
    return {
        "name": backend,
        "status": "ok",
        "samples_s": (last - warm) * opts.batch / span if span > 0 else None,
        "stall_pct": 100.0 * waits / span if span > 0 else None,
        "steps": n,
        "timed_steps": last - warm,
        "wall_s": wall,
        "startup_s": record[0][1] - t0,
        "cpu_util_pct": hw.result.get("cpu_util_pct"),
        "cpu_util_per_core_pct": hw.result.get("cpu_util_per_core_pct"),
        "gpu_sm_util_pct": (gpu.get("sm_util_pct") or {}).get("mean"),
        "gpu": hw.result.get("gpu"),
    }


def section_e2e(
    opts: Options, device: torch.device, root: Path | None, loaders: dict[str, Any] | None = None
) -> dict[str, Any]:
    _require("fastvpd.pretrain", "fastvpd.pretrain")
    root = root or prepare_data(opts)
    rows = []
    backends = list(opts.e2e_backends)
    best = _best(loaders)
    if opts.quick and best is not None:  # --quick: the baseline and the fastest loader only
        backends = [b for b in backends if b in ("torchvision", best["name"])]
    with tempfile.TemporaryDirectory(prefix="fastvpd-e2e-") as tmp:
        for backend in opts.e2e_backends:
            if backend not in backends:
                rows.append(skipped(backend, "--quick runs the torchvision baseline and the fastest loader"))
                continue
            why = _backend_available(backend)
            if backend in GPU_ROWS and device.type != "cuda":
                why = f"needs a CUDA GPU (on CPU it is the {_loader_variant(backend)[0]} row)"
            if why:
                rows.append(skipped(backend, why))
                continue
            try:
                rows.append(run_pretrain(backend, root, opts, device, Path(tmp)))
                r = rows[-1]
                log(f"e2e {backend}: {r['samples_s']:.1f} samples/s, data stall {r['stall_pct']:.1f}%")
            except SystemExit as e:  # main_guard turns user errors into exit 2 after printing them
                rows.append(skipped(backend, f"pretrain exited with code {e.code}", status="failed"))
            except Skip as e:
                rows.append(skipped(backend, str(e)))
            except Exception as e:
                traceback.print_exc()
                rows.append(skipped(backend, _first_line(e), status="failed"))
            free_memory(device)
    base = next((r for r in rows if r["name"] == "torchvision" and r["status"] == "ok"), None)
    for r in rows:
        if base is not None and r["status"] == "ok" and r.get("samples_s") and base.get("samples_s"):
            r["speedup"] = r["samples_s"] / base["samples_s"]
    notes = [
        f"steady state after the first steps; data stall = host time waiting for the next batch / wall; "
        f"{opts.e2e_steps} steps of {opts.batch} (torchvision: at least two rounds of its workers' "
        "batches, timed from the end of the first)",
        "cache: views rendered inside the training step (captured in its CUDA graph on a GPU); "
        "cache_in_loader: rendered by the loader before the step; cache_triton: cache with "
        "data.aug_kernel=triton (the pixel work by fastvpd.data.triton_aug's kernels)",
    ]
    return {"rows": rows, "notes": notes}


# ---------------------------------------------------------------------------------------------- projection
def _best(section: dict[str, Any] | None) -> dict[str, Any] | None:
    rows = [r for r in (section or {}).get("rows", []) if r.get("status") == "ok" and r.get("samples_s")]
    return max(rows, key=lambda r: r["samples_s"]) if rows else None


def fed_rate(step_rate: float, loader: dict[str, Any], batch: int, device_share: float = 1.0) -> float:
    """Samples/s of a training step fed by a loader. The loader's GPU work (its `dev ms/batch`) runs on the
    step's GPU, so its time adds to the step's; its host work runs beside the step, so its own rate only
    caps the result. (On the H100, 2026-11-26 run 3, this gives 1,846 and 1,892 samples/s for the eager
    step fed by `cache` and `ffcv`, against 1,822 and 1,839 measured end to end.) `device_share` scales the
    GPU work: 0.5 for a one-view batch priced from the two-view loader rows."""
    dev = loader.get("device_ms_per_batch")
    rate = step_rate
    if dev and batch > 0:
        rate = 1.0 / (1.0 / step_rate + device_share * dev / 1000.0 / batch)
    return min(rate, loader["samples_s"])


def _best_fed(
    step: dict[str, Any], loaders: dict[str, Any] | None, batch: int, device_share: float = 1.0
) -> tuple[float, str]:
    """The loader that feeds `step` fastest (fed_rate), and how the figure was made."""
    rows = [r for r in (loaders or {}).get("rows", []) if r.get("status") == "ok" and r.get("samples_s")]
    if not rows:
        return step["samples_s"], f"step '{step['name']}' only (no loader measured)"
    rate, row = max(
        ((fed_rate(step["samples_s"], r, batch, device_share), r) for r in rows), key=lambda t: t[0]
    )
    how = "step + loader GPU time" if row.get("device_ms_per_batch") else "min(step, loader)"
    return rate, f"{how}: step '{step['name']}', loader '{row['name']}'"


def projection(results: dict[str, Any]) -> dict[str, Any]:
    """Hours for the full recipe from the measured rates: end to end if measured, else the best step fed
    by the best loader (fed_rate)."""
    e2e, step = _best(results.get("e2e")), _best(results.get("steps"))
    batch = int((results.get("options") or {}).get("batch") or 0)
    if e2e:
        rate, source = e2e["samples_s"], f"end to end, {e2e['name']}"
    elif step:
        rate, source = _best_fed(step, results.get("loaders"), batch)
    else:
        return {"status": "skipped", "reason": "no pretraining rate was measured"}
    out: dict[str, Any] = {"status": "ok"}

    def part(epochs: int, r: float, src: str) -> dict[str, Any]:
        hours = epochs * RECIPE_IMAGES / r / 3600.0
        return {"epochs": epochs, "images": RECIPE_IMAGES, "samples_s": r, "source": src, "hours": hours}

    out["pretrain"] = part(RECIPE_PRETRAIN_EPOCHS, rate, source)
    dist_best = _best(results.get("distill"))
    if dist_best:
        # one supervised view per sample: half a two-view loader row's GPU work, its host rate as a cap
        r, src = _best_fed(dist_best, results.get("loaders"), batch, device_share=0.5)
        out["distill"] = part(RECIPE_DISTILL_EPOCHS, r, "distill " + src)
        out["total_hours"] = out["pretrain"]["hours"] + out["distill"]["hours"]
    else:
        out["total_hours"] = None
        out["distill_note"] = "distillation step not measured"
    return out


# ---------------------------------------------------------------------------------------------- main
def _backend_list(
    flag: str, text: str, allow_empty: bool, allowed: tuple[str, ...] = LOADER_BACKENDS
) -> tuple[str, ...]:
    """A comma-separated list of loader rows; a name not in `allowed` is a ConfigError."""
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    if (not names and not allow_empty) or any(b not in allowed for b in names):
        raise ConfigError(f"{flag} {text!r}: choose from {','.join(allowed)}")
    return names


def parse_args(argv: Sequence[str] | None) -> tuple[Options, argparse.Namespace]:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="small sizes: under 2 minutes on a 2-core CPU")
    p.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}"
    )
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--arch", default="", help="backbone (default: resnet50 on GPU, resnet18 on CPU)")
    p.add_argument("--res", type=int, default=0, help="view resolution in px")
    p.add_argument("--batch", type=int, default=0, help="batch size for loaders, steps and e2e")
    p.add_argument(
        "--queue", type=int, default=0, help="MoCo queue size (rounded to a multiple of the batch)"
    )
    p.add_argument("--warmup", type=int, default=0, help="untimed steps before each rung")
    p.add_argument("--repeats", type=int, default=0, help="timed steps per rung (median reported)")
    p.add_argument("--images", type=int, default=0, help="synthetic images for the loader/e2e sections")
    p.add_argument("--loader-batches", type=int, default=0, help="timed batches per loader backend")
    p.add_argument("--workers", type=int, default=0, help="loader workers (default: all usable cores)")
    p.add_argument(
        "--e2e-steps", type=int, default=0, help="pretraining steps per backend in the e2e section"
    )
    p.add_argument("--e2e-backends", default=",".join(E2E_BACKENDS), help="backends for the e2e section")
    p.add_argument(
        "--loader-backends", default=",".join(LOADER_BACKENDS), help="backends for the loaders section"
    )
    p.add_argument(
        "--amp", default="bf16", choices=("bf16", "none"), help="autocast of the package's step (GPU)"
    )
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: usable cores)")
    p.add_argument("--compile", action="store_true", help="add a torch.compile rung")
    p.add_argument(
        "--no-distill", action="store_true", help="skip the distillation step ladder (with --sections steps)"
    )
    p.add_argument(
        "--inductor-variants",
        action="store_true",
        help="with --compile on a GPU: also time the compiled MoCo step under each INDUCTOR_VARIANTS setting",
    )
    p.add_argument(
        "--rungs", default="", help="regex: run only the ladder rungs it matches (and each ladder's baseline)"
    )
    p.add_argument("--profile", action="store_true", help="write a torch.profiler trace of a few steps")
    p.add_argument("--data-dir", default="", help="where the synthetic set and its conversions are cached")
    p.add_argument("--out", default="", help="output folder (default benchmarks/results/<device>-<date>/)")
    a = p.parse_args(argv)
    sections = tuple(s.strip() for s in a.sections.split(",") if s.strip())
    bad = [s for s in sections if s not in SECTIONS]
    if bad or not sections:
        raise ConfigError(f"--sections {a.sections!r}: choose from {','.join(SECTIONS)}")
    try:
        re.compile(a.rungs)
    except re.error as e:
        raise ConfigError(f"--rungs {a.rungs!r} is not a regular expression ({e})") from None
    backends = _backend_list("--e2e-backends", a.e2e_backends, allow_empty=True, allowed=E2E_BACKENDS)
    loader_backends = _backend_list("--loader-backends", a.loader_backends, allow_empty=False)
    for name in (
        "res",
        "batch",
        "queue",
        "warmup",
        "repeats",
        "images",
        "loader_batches",
        "workers",
        "e2e_steps",
    ):
        if getattr(a, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0")
    opts = Options(
        quick=a.quick,
        sections=sections,
        device=a.device,
        arch=a.arch,
        res=a.res,
        batch=a.batch,
        queue=a.queue,
        warmup=a.warmup,
        repeats=a.repeats,
        images=a.images,
        loader_batches=a.loader_batches,
        loader_workers=a.workers,
        e2e_steps=a.e2e_steps,
        e2e_backends=backends,
        loader_backends=loader_backends,
        amp=a.amp,
        threads=a.threads,
        compile=a.compile,
        inductor_variants=a.inductor_variants,
        distill=not a.no_distill,
        rungs=a.rungs,
        profile=a.profile,
        data_dir=a.data_dir,
        out=a.out,
    )
    return opts, a


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def run(opts: Options) -> dict[str, Any]:
    """Run the selected sections and return the results dict (also written to opts.out)."""
    from fastvpd.models import ARCHS

    device = pick_device(opts.device)
    opts.resolve(device)
    if opts.arch not in ARCHS:
        raise ConfigError(f"--arch {opts.arch!r} is not one of {', '.join(ARCHS)}")
    facts = device_facts(device)
    if not opts.out:
        opts.out = str(ROOT / "benchmarks" / "results" / f"{device_slug(facts)}-{facts['date'][:10]}")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.set_num_threads(opts.threads)
    log(
        f"device {facts['device_name']}, {facts['cpu_cores']} cores; sections {','.join(opts.sections)}; "
        f"{opts.arch} {opts.res}px batch {opts.batch}; out {opts.out}"
    )
    results: dict[str, Any] = {"meta": facts, "options": asdict(opts)}
    t_all = time.perf_counter()
    data_root: Path | None = None

    def guarded(key: str, fn: Callable[[], dict[str, Any]]) -> None:
        t = time.perf_counter()
        try:
            results[key] = fn()
        except Skip as e:
            results[key] = {"status": "skipped", "reason": str(e), "rows": []}
        except (UserError, ConfigError) as e:
            results[key] = {"status": "skipped", "reason": str(e).splitlines()[0][:200], "rows": []}
        except Exception as e:
            traceback.print_exc()
            results[key] = {"status": "failed", "reason": _first_line(e), "rows": []}
        results[key]["seconds"] = round(time.perf_counter() - t, 1)
        if results[key].get("status", "ok") != "ok":
            log(f"{key}: {results[key]['status']} ({results[key]['reason']})")
        # A partial report after every section: a run killed by a time limit still leaves its figures.
        write_report({**results, "projection": projection(results)}, opts.out)

    # The step ladders first: they hold the headline figures, and a run cut short by a time limit (the
    # GPU suite's) should lose loader or end-to-end rows rather than them.
    def partial(key: str) -> RowHook:
        def write(rows: list[dict[str, Any]]) -> None:
            part = {"rows": rows, "notes": [f"cut short: the report as of rung {len(rows)}"]}
            write_report({**results, key: part, "projection": projection(results)}, opts.out)

        return write

    if "steps" in opts.sections:
        guarded("steps", lambda: section_steps(opts, device, partial("steps")))
        if opts.distill:
            guarded("distill", lambda: section_distill(opts, device, partial("distill")))
    if "loaders" in opts.sections:
        guarded("loaders", lambda: section_loaders(opts, device))
        if results["loaders"].get("data_root"):
            data_root = Path(results["loaders"]["data_root"])
    if "e2e" in opts.sections:
        guarded("e2e", lambda: section_e2e(opts, device, data_root, results.get("loaders")))
    results["projection"] = projection(results)
    results["seconds"] = round(time.perf_counter() - t_all, 1)
    return results


@main_guard
def main(argv: Sequence[str] | None = None) -> int:
    opts, _ = parse_args(argv)
    results = run(opts)
    print()
    print(render_text(results))
    paths = write_report(results, opts.out)
    print(f"\nwrote {', '.join(str(p) for p in paths.values())} in {results['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

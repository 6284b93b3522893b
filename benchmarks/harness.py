"""What every benchmark section shares: the options, skips, timing, FLOP and memory counters, the profiler's
top ops, and synthetic device-resident inputs."""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.hw import measure_matmul_tflops, peak_bf16_tflops, usable_cores

SECTIONS = ("loaders", "steps", "e2e")


class Skip(Exception):
    """A section or row cannot run here (missing package, module, GPU): its message is the reason shown."""


def skipped(name: str, reason: str, status: str = "skipped") -> dict[str, Any]:
    return {"name": name, "status": status, "reason": reason}


def against_baseline(rows: list[dict[str, Any]], baseline: str = "torchvision") -> None:
    """Each measured row's `speedup`: its samples/s over the baseline row's (when that one ran)."""
    base = next((r for r in rows if r["name"] == baseline and r["status"] == "ok"), None)
    for r in rows:
        if base is not None and r["status"] == "ok" and r.get("samples_s") and base.get("samples_s"):
            r["speedup"] = r["samples_s"] / base["samples_s"]


def log(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__


def require(module: str, what: str) -> Any:
    """Import `module` or raise Skip naming it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise Skip(f"{what} unavailable ({first_line(e)})") from None


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
    e2e_backends: tuple[str, ...] = ()  # loader rows run end to end; () = the default rows
    loader_backends: tuple[str, ...] = ()  # loader rows timed; () = the default rows
    amp: str = "bf16"
    threads: int = 0
    compile: bool = False
    experiments: bool = False  # also the variants no GPU run has decided yet (benchmarks/experiments/)
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
            # raised below to two whole rounds of torchvision workers (see loaders.loader_schedule)
            d = ("resnet50", 224, 256, 4096, 5, 20, 6144, 8, 30)
        else:
            d = ("resnet18", 96, 64, 4096, 2, 5, 1024, 8, 20)
        names = ("arch", "res", "batch", "queue", "warmup", "repeats", "images", "loader_batches")
        names += ("e2e_steps",)
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
        if not self.loader_backends or not self.e2e_backends:
            from benchmarks.loaders import default_rows

            self.loader_backends = self.loader_backends or default_rows(self.experiments, e2e=False)
            self.e2e_backends = self.e2e_backends or default_rows(self.experiments, e2e=True)
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


def synthetic_views(
    batch: int, res: int, device: torch.device, dtype: torch.dtype, channels_last: bool, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two normalised-looking views, as a loader hands them (N×3×H×W, on device)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(2, batch, 3, res, res, generator=g).to(device=device, dtype=dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return v[0].contiguous(memory_format=fmt), v[1].contiguous(memory_format=fmt)


# ---------------------------------------------------------------------------------------------- profiler
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


def self_us(e: Any, on_device: bool) -> float:
    """A profiler event's self time in µs: on the device (named self_cuda_time_total before torch 2.4), or on
    the CPU."""
    if on_device:
        return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)) or 0.0)
    return float(getattr(e, "self_cpu_time_total", 0.0) or 0.0)


def top_ops(events: Any, steps: int, on_device: bool, top: int = 12) -> list[dict[str, Any]]:
    """The ops (GPU: kernels) with the most self time in a profile, per step and as a share of all of it,
    so a report says where the step's time goes without opening the trace."""
    timed = [(e.key, self_us(e, on_device), int(getattr(e, "count", 0) or 0)) for e in events]
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

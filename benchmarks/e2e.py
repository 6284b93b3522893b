"""The end-to-end section: `fastvpd.pretrain` over each loader row for a fixed number of steps, timed in
its steady state from the host's view of the training loop (when each batch was asked for and handed
over), with the data stall and hardware use."""

from __future__ import annotations

import contextlib
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from benchmarks.dataset import describe_data, prepare_data
from benchmarks.harness import (
    Options,
    Skip,
    against_baseline,
    first_line,
    free_memory,
    log,
    require,
    skipped,
    sync,
)
from benchmarks.hw import HwMonitor
from benchmarks.loaders import LoaderRow, find_row, formats_for, loader_schedule, why_not
from benchmarks.projection import best


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
def _record_train_batches(record: list[tuple[float, float]], row: LoaderRow) -> Iterator[None]:
    """Every train loader built while the block runs gets the row's hooks and is timed (pretrain's own code
    stays untouched)."""
    import fastvpd.data as data_mod

    patched: list[tuple[Any, str, Any]] = []
    original = data_mod.build_loader

    def timed_build_loader(*a: Any, **kw: Any) -> Any:
        train = kw.get("train", a[9] if len(a) > 9 else True)
        if not train:
            return original(*a, **kw)
        return _TimedLoader(original(*a, **{**kw, **dict(row.hooks)}), record)

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


def pretrain_argv(
    row: LoaderRow, root: Path, opts: Options, device: torch.device, steps: int, out: Path
) -> list[str]:
    """fastvpd.pretrain's overrides for one row: the user's keys only (hooks go to the constructor)."""
    return [
        f"data.root={root}",
        f"data.backend={row.backend}",
        *(f"data.{k}={v}" for k, v in row.settings),
        f"data.workers={opts.loader_workers}",
        "data.verify='off'",  # quoted: YAML reads a bare off as False
        f"model.arch={opts.arch}",
        f"aug.res={opts.res}",
        f"train.batch_size={opts.batch}",
        f"moco.queue_size={opts.queue}",
        f"train.device={device.type}",
        f"train.amp={opts.amp if device.type == 'cuda' else 'none'}",
        f"train.max_steps={steps}",
        # --compile: the trainer as the GPU recipes run it; the first steps compile and are left out of
        # the timing below
        *(["train.compile=true"] if opts.compile else []),
        f"train.out_dir={out}",
        "train.resume=never",
        f"log.every={max(1, opts.e2e_steps // 4)}",
        "log.tensorboard=false",
        "log.progress=false",
        "eval.knn_every=0",
        "ckpt.every=100000",
    ]


def run_pretrain(name: str, root: Path, opts: Options, device: torch.device, workdir: Path) -> dict[str, Any]:
    pretrain = require("fastvpd.pretrain", "fastvpd.pretrain")
    row = find_row(name)
    # torchvision's workers build whole batches in rounds (see loader_schedule): run two rounds + one
    workers = max(1, opts.loader_workers) if row.backend == "torchvision" else 1
    steps = opts.e2e_steps if workers == 1 else max(opts.e2e_steps, 2 * workers + 1)
    log(f"e2e {name}: pretrain for {steps} steps")
    argv = pretrain_argv(row, root, opts, device, steps, workdir / name)
    record: list[tuple[float, float]] = []
    with _record_train_batches(record, row), HwMonitor(device) as hw:
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
        "name": name,
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
    require("fastvpd.pretrain", "fastvpd.pretrain")
    root = root or prepare_data(opts, formats_for(opts.e2e_backends))
    rows = []
    chosen = list(opts.e2e_backends)
    fastest = best(loaders)
    if opts.quick and fastest is not None:  # --quick: the baseline and the fastest loader only
        chosen = [b for b in chosen if b in ("torchvision", fastest["name"])]
    with tempfile.TemporaryDirectory(prefix="fastvpd-e2e-") as tmp:
        for name in opts.e2e_backends:
            if name not in chosen:
                rows.append(skipped(name, "--quick runs the torchvision baseline and the fastest loader"))
                continue
            why = why_not(find_row(name), device)
            if why:
                rows.append(skipped(name, why))
                continue
            try:
                rows.append(run_pretrain(name, root, opts, device, Path(tmp)))
                r = rows[-1]
                log(f"e2e {name}: {r['samples_s']:.1f} samples/s, data stall {r['stall_pct']:.1f}%")
            except SystemExit as e:  # main_guard turns user errors into exit 2 after printing them
                rows.append(skipped(name, f"pretrain exited with code {e.code}", status="failed"))
            except Skip as e:
                rows.append(skipped(name, str(e)))
            except Exception as e:
                traceback.print_exc()
                rows.append(skipped(name, first_line(e), status="failed"))
            free_memory(device)
    against_baseline(rows)
    notes = [
        f"{describe_data(root)}; steady state after the first steps; data stall = host time waiting for "
        f"the next batch / wall; {opts.e2e_steps} steps of {opts.batch} (torchvision: at least two rounds "
        "of its workers' batches, timed from the end of the first)",
        "cache: views rendered inside the training step (captured in its CUDA graph on a GPU)",
    ]
    return {"rows": rows, "notes": notes}

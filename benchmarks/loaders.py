"""The loaders section: each loader row's two-view `moco_v2` samples/s against the torchvision backend, on
the same converted images, cores and batch size; with the JPEG decode alone (benchmarks/decode.py) and,
on a GPU, the Triton augmentation's launch shapes (benchmarks/aug_tune.py) as sub-tables.

A row is a small table of settings (LoaderRow): the backend, the user's data.* settings it sets, and the
loader constructor arguments that are not config keys (`hooks`, for benchmarks/experiments/)."""

from __future__ import annotations

import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.dataset import describe_data, prepare_data
from benchmarks.harness import (
    Options,
    Skip,
    against_baseline,
    device_events,
    first_line,
    free_memory,
    log,
    require,
    self_us,
    skipped,
    sync,
    top_ops,
)
from benchmarks.hw import HwMonitor
from fastvpd.config import ConfigError, UserError


@dataclass(frozen=True)
class LoaderRow:
    """One loader row: what it builds and where it runs."""

    name: str
    backend: str  # data.backend
    settings: tuple[tuple[str, str], ...] = ()  # the user's data.* keys it sets: (key, value)
    hooks: tuple[tuple[str, Any], ...] = ()  # build_loader's hooks: constructor arguments, not config keys
    graphed: bool = False  # views replayed from one CUDA graph, as the training step renders them
    gpu: bool = False  # needs a CUDA device
    e2e: bool = True  # also run end to end (fastvpd.pretrain over it)
    about: str = ""


LOADER_ROWS: tuple[LoaderRow, ...] = (
    LoaderRow("torchvision", "torchvision", about="the reference MoCo loader: PIL, DataLoader workers"),
    LoaderRow("ffcv", "ffcv", about="one JPEG decode per view (data.ffcv_decode=twice)"),
    LoaderRow("ffcv_once", "ffcv", (("ffcv_decode", "once"),), about="one decode per sample for both views"),
    LoaderRow("dali", "dali", about="DALI decodes, crops and flips; the device finishes the views"),
    LoaderRow("cache", "cache", about="uint8 cache; views rendered by the loader (numba on a CPU)"),
    LoaderRow(
        "cache_graphed",
        "cache",
        graphed=True,
        gpu=True,
        e2e=False,
        about="the views replayed from one CUDA graph, as the training step renders them",
    ),
)
BACKEND_MODULES = {"ffcv": "ffcv", "dali": "nvidia.dali", "torchvision": "torchvision", "cache": "numpy"}


def all_rows() -> tuple[LoaderRow, ...]:
    from benchmarks.experiments import LOADER_ROWS as EXPERIMENT_ROWS

    return LOADER_ROWS + EXPERIMENT_ROWS


def find_row(name: str) -> LoaderRow:
    for row in all_rows():
        if row.name == name:
            return row
    raise ConfigError(f"no loader row {name!r}: choose from {','.join(r.name for r in all_rows())}")


def default_rows(experiments: bool, e2e: bool) -> tuple[str, ...]:
    rows = all_rows() if experiments else LOADER_ROWS
    return tuple(r.name for r in rows if r.e2e or not e2e)


def backend_available(backend: str) -> str:
    """'' when the backend's package imports here, else the reason it cannot run."""
    mod = BACKEND_MODULES[backend]
    try:
        from fastvpd.data import torch_threads_kept

        with torch_threads_kept():  # importing ffcv would leave torch on one thread
            __import__(mod)
    except Exception as e:  # ImportError, or a broken native library
        return f"{mod} not installed ({first_line(e)})"
    return ""


def why_not(row: LoaderRow, device: torch.device) -> str:
    """'' when the row can run here, else why not."""
    if row.gpu and device.type != "cuda":
        return f"needs a CUDA GPU (on CPU it is the {row.backend} row)"
    return backend_available(row.backend)


def _cycle(loader: Any) -> Iterator[Any]:
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


class GraphedViews:
    """The cache loader with its views rendered as the training step renders them: index-only batches,
    the generator seeded on the host, the augmentation replayed from one CUDA graph. The views are the
    graph's static outputs (valid until the next batch), as inside the step."""

    def __init__(self, loader: Any) -> None:
        step_mod = require("fastvpd.step", "fastvpd.step")
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
    after the previous round's. Timing part of a round charges the whole round's time to that part, and
    timing across the epoch's end adds the idle restart. So: warm up for at least `warm_min` batches
    after the first, on to the end of a round, time whole rounds (at least `wanted` batches, fewer whole
    rounds if the epoch is short), and say so when not even one round fits. Thread-pool loaders are
    `workers=1`. `note` is "" when the timing is clean.
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


def _device_ms_per_batch(
    loader: Any, device: torch.device, batches: int
) -> tuple[float, list[dict[str, Any]]] | None:
    """Device kernel time per batch (torch.profiler CUDA activity) for backends that work on the GPU, and
    the kernels that take it (top_ops)."""
    if device.type != "cuda":
        return None
    it = iter(loader)
    events = device_events(lambda: next(it), device, batches)
    total_us = sum(self_us(e, on_device=True) for e in events)
    return total_us / 1000.0 / batches, top_ops(events, batches, on_device=True, top=8)


def build_row_loader(row: LoaderRow, root: Path, opts: Options, device: torch.device) -> Any:
    """The row's training loader of two-view moco_v2 batches."""
    data_mod = require("fastvpd.data", "fastvpd.data")
    from fastvpd.config import DataConfig

    cfg = DataConfig(
        root=str(root), backend=row.backend, workers=opts.loader_workers, verify="off", **dict(row.settings)
    )
    dtype = torch.bfloat16 if device.type == "cuda" and opts.amp == "bf16" else torch.float32
    spec = data_mod.moco_v2(opts.res)
    loader = data_mod.build_loader(cfg, spec, "train", opts.batch, device, dtype, **dict(row.hooks))
    return GraphedViews(loader) if row.graphed else loader


def measure_one_loader(name: str, root: Path, opts: Options, device: torch.device) -> dict[str, Any]:
    row = find_row(name)
    t0 = time.perf_counter()
    if row.gpu and device.type != "cuda":
        raise Skip(why_not(row, device))
    loader = build_row_loader(row, root, opts, device)
    it = _cycle(loader)
    first = next(it)
    assert len(first.views) == 2 and first.views[0].shape[-1] == opts.res, "loader broke the contract"
    sync(device)
    first_s = time.perf_counter() - t0
    per_epoch = len(loader)
    workers = max(1, getattr(loader, "workers", 1)) if row.backend == "torchvision" else 1
    # a graphed row: two eager warm-up renders, then the capture
    warm, timed, note = loader_schedule(per_epoch, opts.loader_batches, workers, 3 if row.graphed else 1)
    for _ in range(warm):
        next(it)
    sync(device)
    with HwMonitor(device) as hw:
        t = time.perf_counter()
        for _ in range(timed):
            next(it)
        sync(device)
        dt = time.perf_counter() - t
    out: dict[str, Any] = {
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
        out["note"] = note
        log(f"loader {name}: {note}")
    if row.backend in ("cache", "ffcv", "dali"):
        try:
            dev = _device_ms_per_batch(loader, device, min(3, opts.loader_batches))
            if dev is not None:
                out["device_ms_per_batch"], out["device_top"] = dev
        except Exception as e:  # the profiler is a nice-to-have
            out["device_ms_note"] = first_line(e)
    getattr(loader, "close", lambda: None)()  # torchvision: its persistent workers go now
    del it, loader
    return out


def formats_for(names: tuple[str, ...]) -> list[str]:
    """The converted formats the named rows read and whose package is present."""
    backends = {find_row(n).backend for n in names}
    return [f for f in ("ffcv", "dali", "cache") if f in backends and not backend_available(f)]


def section_loaders(opts: Options, device: torch.device) -> dict[str, Any]:
    root = prepare_data(opts, formats_for(opts.loader_backends + opts.e2e_backends))
    rows = []
    for name in opts.loader_backends:
        why = why_not(find_row(name), device)
        if why:
            rows.append(skipped(name, why))
            continue
        log(f"loader {name}: measuring {opts.loader_batches} batches of {opts.batch}")
        try:
            rows.append(measure_one_loader(name, root, opts, device))
            log(f"loader {name}: {rows[-1]['samples_s']:.1f} samples/s")
        except Skip as e:
            rows.append(skipped(name, str(e)))
        except (UserError, ConfigError) as e:
            rows.append(skipped(name, str(e).splitlines()[0][:160]))
        except Exception as e:
            traceback.print_exc()
            rows.append(skipped(name, first_line(e), status="failed"))
        free_memory(device)
    against_baseline(rows)
    notes = [
        f"{describe_data(root)}, {opts.loader_workers} worker(s), batch {opts.batch}, {opts.res} px views; "
        "speed-up vs torchvision",
    ]
    notes += [f"{r['name']}: {r['note']}" for r in rows if r.get("note")]
    ok = [r for r in rows if r["status"] == "ok" and r.get("speedup")]
    if ok:
        best = max(ok, key=lambda r: r["samples_s"])
        notes.append(f"best: {best['name']} at {best['speedup']:.2f}x torchvision")
    from benchmarks.decode import section_decode

    decode = section_decode(root, opts, device)  # JPEG decode alone, same files (never raises)
    out = {"rows": rows, "data_root": str(root), "notes": notes, "decode": decode}
    if device.type == "cuda" and any(find_row(n).backend == "cache" for n in opts.loader_backends):
        from benchmarks.aug_tune import section_triton_tuning

        out["triton_tuning"] = section_triton_tuning(root, opts, device)  # never raises
    return out

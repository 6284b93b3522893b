"""JPEG decode sub-benchmark of the loaders section: full-size decode to uint8, nothing else.

The loader rows time whole two-view pipelines; these rows isolate the step every one of them starts with,
on the same JPEG files, with the encoded bytes already in memory (disk and augmentation are not measured):
- `PIL` — Image.open + convert("RGB") + np.asarray, one image at a time, one thread: the per-image decode
  of the reference torchvision loader, and the baseline of the speed-ups;
- `torchvision.io.decode_jpeg (CPU)` — libjpeg on a list of tensors (torchvision's batched API);
- `torchvision.io.decode_jpeg (cuda, nvJPEG)` — the same list decoded on the GPU (nvJPEG batched);
- `DALI fn.decoders.image (mixed)` — nvJPEG / the hardware JPEG engine behind DALI's GPU loader;
- `DALI fn.decoders.image (cpu)` — libjpeg-turbo on DALI's CPU worker threads.
Both DALI rows are fed the encoded bytes by `fn.external_source`, so no reader or file access is timed.
Every row decodes one warm-up batch first (nvJPEG handles, DALI pipeline build, allocator) and checks that
its images have the sizes PIL reports; a row that fails is reported as failed, never sinks the run.
"""

from __future__ import annotations

import io
import random
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.harness import Options, first_line, log, skipped, sync
from benchmarks.loaders import backend_available

NO_GPU = "needs a CUDA GPU"
JPEG_SOI = b"\xff\xd8"

PIL_ROW = "PIL"
TV_CPU_ROW = "torchvision.io.decode_jpeg (CPU)"
TV_CUDA_ROW = "torchvision.io.decode_jpeg (cuda, nvJPEG)"
DALI_MIXED_ROW = "DALI fn.decoders.image (mixed)"
DALI_CPU_ROW = "DALI fn.decoders.image (cpu)"
ROW_NAMES = (PIL_ROW, TV_CPU_ROW, TV_CUDA_ROW, DALI_MIXED_ROW, DALI_CPU_ROW)

# A decoder: one batch of encoded JPEGs in, the (height, width) of each decoded image out. It must return
# only once its images exist where it put them (the timer synchronises CUDA after the loop as well).
Decoder = Callable[[int], list[tuple[int, int]]]


# ---------------------------------------------------------------------------------------------- inputs
def jpeg_files(root: Path) -> list[Path]:
    """The source JPEGs of the converted set at `root` (its manifest's train split, else its first split)."""
    from fastvpd.data.manifest import Manifest

    manifest = Manifest.load(root)
    if manifest.src is None:
        raise RuntimeError(f"{root}/manifest.json records no source folder")
    split = "train" if "train" in manifest.splits else manifest.splits[0]
    return [manifest.src / s["path"] for s in manifest.sources(split)]


def load_batches(files: Sequence[Path], batch: int, count: int, seed: int = 0) -> list[list[bytes]]:
    """`count` batches of `batch` encoded JPEGs read into memory (a fixed-seed draw across classes; files
    reused when there are fewer than batch * count). Non-JPEG files (PNG in a real tree) are left out."""
    data = [b for b in (Path(f).read_bytes() for f in files) if b[:2] == JPEG_SOI]
    if not data:
        raise RuntimeError(f"none of the {len(files)} source files is a JPEG")
    rng = random.Random(seed)
    need = batch * count
    order: list[int] = []
    while len(order) < need:
        order += rng.sample(range(len(data)), len(data))
    return [[data[i] for i in order[k * batch : (k + 1) * batch]] for k in range(count)]


def jpeg_sizes(batches: Sequence[Sequence[bytes]]) -> list[list[tuple[int, int]]]:
    """(height, width) of every image from its JPEG header (PIL reads no pixels for this)."""
    from PIL import Image

    out = []
    for b in batches:
        sizes = []
        for data in b:
            with Image.open(io.BytesIO(data)) as im:
                sizes.append((im.height, im.width))
        out.append(sizes)
    return out


# ---------------------------------------------------------------------------------------------- decoders
def decode_pil(data: bytes) -> np.ndarray:
    """HWC uint8 RGB, as the torchvision loader's dataset decodes a file (Image.open + convert)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def pil_decoder(batches: Sequence[Sequence[bytes]]) -> Decoder:
    def run(k: int) -> list[tuple[int, int]]:
        return [decode_pil(d).shape[:2] for d in batches[k]]

    return run


def _tensors(batches: Sequence[Sequence[bytes]]) -> list[list[torch.Tensor]]:
    """The encoded bytes as 1-D uint8 CPU tensors, made once before timing (decode_jpeg's input)."""
    return [[torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in b] for b in batches]


@contextmanager
def _quiet_torchvision_io() -> Iterator[None]:
    """torchvision 0.29 deprecates its image I/O (DeprecationWarning on every call): keep the log clean."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def decode_torchvision(tensors: list[torch.Tensor], device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """CHW uint8 RGB tensors on `device` (nvJPEG's batched decode when that is a CUDA device)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with _quiet_torchvision_io():
        out = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
    return out if isinstance(out, list) else [out]


def torchvision_decoder(batches: Sequence[Sequence[bytes]], device: torch.device) -> Decoder:
    tensors = _tensors(batches)

    def run(k: int) -> list[tuple[int, int]]:
        return [tuple(t.shape[-2:]) for t in decode_torchvision(tensors[k], device)]  # type: ignore[misc]

    return run


class _Cycle:
    """external_source callback: hands DALI the prepared batches in order, round and round (DALI asks
    ahead of `run()` by its prefetch depth, so the k-th output is still the k-th batch)."""

    def __init__(self, batches: Sequence[Sequence[bytes]]) -> None:
        self.batches = [[np.frombuffer(d, dtype=np.uint8) for d in b] for b in batches]
        self.i = 0

    def __call__(self) -> list[np.ndarray]:
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        return b


def dali_pipeline(
    batches: Sequence[Sequence[bytes]], dali_device: str, threads: int, device_id: int | None
) -> Any:
    """A built DALI pipeline: external_source(encoded bytes) -> decoders.image(RGB, HWC uint8)."""
    from fastvpd.data import torch_threads_kept

    with torch_threads_kept():
        from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=len(batches[0]), num_threads=threads, device_id=device_id, seed=0)
    def pipe() -> Any:
        jpegs = fn.external_source(source=_Cycle(batches), batch=True, dtype=types.UINT8, ndim=1)
        return fn.decoders.image(jpegs, device=dali_device, output_type=types.RGB)

    p = pipe()
    p.build()
    return p


def decode_dali(pipe: Any) -> Any:
    """One batch out of the pipeline: a DALI TensorList (CPU or GPU) of HWC uint8 images."""
    (out,) = pipe.run()
    return out


def dali_decoder(
    batches: Sequence[Sequence[bytes]], mixed: bool, threads: int, device: torch.device
) -> Decoder:
    device_id = (device.index if device.index is not None else torch.cuda.current_device()) if mixed else None
    pipe = dali_pipeline(batches, "mixed" if mixed else "cpu", threads, device_id)

    def run(k: int) -> list[tuple[int, int]]:
        out = decode_dali(pipe)
        return [tuple(s[:2]) for s in out.shape()]  # type: ignore[misc]

    return run


# ---------------------------------------------------------------------------------------------- timing
def time_decoder(
    name: str, decoder: Decoder, sizes: Sequence[Sequence[tuple[int, int]]], device: torch.device
) -> dict[str, Any]:
    """Decode batch 0 (warm-up, checked against the JPEG headers), then time batches 1.. (host wall clock,
    CUDA synchronised before and after)."""
    got = [tuple(hw) for hw in decoder(0)]
    want = [tuple(hw) for hw in sizes[0]]
    if got != want:
        bad = [i for i, (a, b) in enumerate(zip(got, want)) if a != b]
        raise RuntimeError(
            f"decoded {len(got)} images for {len(want)} JPEGs; sizes differ from the headers at {bad[:4]} "
            f"({[got[i] for i in bad[:2]]} vs {[want[i] for i in bad[:2]]})"
        )
    sync(device)  # device-wide: also waits for DALI's and nvJPEG's own streams
    timed = len(sizes) - 1
    t = time.perf_counter()
    for k in range(1, len(sizes)):
        decoder(k)
    sync(device)
    dt = time.perf_counter() - t
    n = sum(len(s) for s in sizes[1:])
    return {
        "name": name,
        "status": "ok",
        "images_per_s": n / dt,
        "ms_per_batch": 1000.0 * dt / timed,
        "batches": timed,
    }


def decoders(
    batches: Sequence[Sequence[bytes]], device: torch.device, threads: int
) -> list[tuple[str, Callable[[], Decoder] | None, str]]:
    """(row name, factory of its decoder or None, why it is skipped) in report order."""
    cuda = device.type == "cuda" and torch.cuda.is_available()
    no_dali = backend_available("dali")  # "" when nvidia.dali imports here, else why not
    return [
        (PIL_ROW, lambda: pil_decoder(batches), ""),
        (TV_CPU_ROW, lambda: torchvision_decoder(batches, torch.device("cpu")), ""),
        (
            TV_CUDA_ROW,
            (lambda: torchvision_decoder(batches, device)) if cuda else None,
            "" if cuda else NO_GPU,
        ),
        (
            DALI_MIXED_ROW,
            (lambda: dali_decoder(batches, True, threads, device)) if cuda and not no_dali else None,
            no_dali or ("" if cuda else NO_GPU),
        ),
        (
            DALI_CPU_ROW,
            (lambda: dali_decoder(batches, False, threads, device)) if not no_dali else None,
            no_dali,
        ),
    ]


def measure_decoders(
    batches: Sequence[Sequence[bytes]],
    device: torch.device,
    threads: int,
    sizes: Sequence[Sequence[tuple[int, int]]] | None = None,
) -> list[dict[str, Any]]:
    """One row per decoder (ok, skipped or failed); speed-up against the PIL row. `sizes`: the batches'
    `jpeg_sizes`, when the caller already has them."""
    sizes = jpeg_sizes(batches) if sizes is None else sizes
    rows: list[dict[str, Any]] = []
    for name, factory, why in decoders(batches, device, threads):
        if factory is None:
            rows.append(skipped(name, why))
            log(f"decode {name}: skipped ({why})")
            continue
        decoder: Decoder | None = None
        try:
            decoder = factory()
            rows.append(time_decoder(name, decoder, sizes, device))
            log(f"decode {name}: {rows[-1]['images_per_s']:.0f} images/s")
        except Exception as e:  # one decoder failing must not sink the report
            traceback.print_exc()
            rows.append(skipped(name, first_line(e), status="failed"))  # shown as "failed: ..."
        finally:
            del decoder
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.empty_cache()
    base = next((r for r in rows if r["name"] == PIL_ROW and r["status"] == "ok"), None)
    for r in rows:
        if base is not None and r["status"] == "ok":
            r["speedup"] = r["images_per_s"] / base["images_per_s"]
    return rows


def section_decode(root: Path, opts: Options, device: torch.device) -> dict[str, Any]:
    """The decode table of the loaders section: {rows, notes}, or {status, reason, rows: []} when there is
    nothing to decode or the harness itself fails (it never raises: the loader figures must survive)."""
    t0 = time.perf_counter()
    count = 1 + max(1, opts.loader_batches)  # one warm-up batch, then the loaders' number of timed batches
    try:
        files = jpeg_files(root)
        batches = load_batches(files, opts.batch, count)
        sizes = jpeg_sizes(batches)
    except Exception as e:
        return {"status": "failed", "reason": f"no JPEGs to decode ({first_line(e)})", "rows": []}
    log(f"decode: {count - 1} timed batches of {opts.batch} JPEGs (+1 warm-up), bytes in memory")
    try:
        rows = measure_decoders(batches, device, opts.loader_workers, sizes)
    except Exception as e:
        traceback.print_exc()
        return {"status": "failed", "reason": first_line(e), "rows": []}
    px = [h * w for b in sizes for h, w in b]
    kb = [len(d) / 1e3 for b in batches for d in b]
    notes = [
        f"{opts.batch} images per batch, {count - 1} timed after 1 warm-up, drawn from the {len(files)} "
        f"source JPEGs (~{sum(kb) / len(kb):.0f} KB, ~{sum(px) / len(px) / 1e3:.0f} kpx each); "
        "speed-up vs PIL",
        f"full-size uint8 RGB, encoded bytes in memory; PIL and torchvision CPU on 1 thread, DALI cpu on "
        f"{opts.loader_workers} thread(s); GPU rows timed host-side with CUDA synchronised",
    ]
    return {"rows": rows, "notes": notes, "seconds": round(time.perf_counter() - t0, 1)}

"""Convert an ImageFolder tree into the fast formats the loaders read: FFCV .beton, WebDataset tar shards
with DALI index files, and a decoded uint8 pixel cache (layout: ARCHITECTURE.md).

Every source is hashed, then decoded and validated once in a process pool; unreadable, truncated, bomb
or otherwise bad files are skipped with a reason (never a crash) and listed in manifest.json. Outputs are
written under temporary names and renamed when complete; the manifest is written last, so a reader never
accepts a partial conversion. Re-running with the same options and unchanged sources skips formats that
are up to date; --force rebuilds.

    python data_tools/convert.py SRC OUT [--formats ffcv,dali,cache] [--workers N] ...
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import io
import json
import multiprocessing as mp
import os
import queue
import sys
import tarfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps
from tqdm import tqdm

if __package__ in (None, ""):  # run as a script: make `fastvpd` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastvpd.config import UserError, main_guard
from fastvpd.data.manifest import MANIFEST_NAME, MANIFEST_VERSION, Manifest, check_file, file_record

FORMATS = ("ffcv", "dali", "cache")
SPLIT_NAMES = ("train", "val", "test")
IMG_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
MAX_SIDE = 30000  # longer sides are refused (FFCV stores uint16 sizes; such images are not training data)
WRITE_MODES = ("jpg", "proportion", "raw")
TMP = ".tmp"


class StrictError(UserError):
    """--strict and some source files were skipped; `skipped` lists every one ({path, reason})."""

    def __init__(self, msg: str, skipped: list[dict[str, str]]) -> None:
        super().__init__(msg)
        self.skipped = skipped


# ------------------------------------------------------------------------------------------------ decoding
def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: alpha composited on white, 16/32-bit integer scaled to 8 bit."""
    if im.mode == "RGB":
        return im
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im).convert("RGB")
    if im.mode.startswith("I"):  # I;16, I;16B, I;16L, I (32-bit int: 16-bit PNGs on older Pillow)
        arr = np.asarray(im).astype(np.float64)
        peak = 65535.0 if (im.mode.startswith("I;16") or arr.max(initial=0) > 255) else 255.0
        arr = np.clip(np.round(arr * (255.0 / peak)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if im.mode == "F":
        arr = np.asarray(im).astype(np.float64)
        scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
        return Image.fromarray(np.clip(np.round(arr * scale), 0, 255).astype(np.uint8), mode="L").convert(
            "RGB"
        )
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def load_rgb(path: str | Path | bytes) -> Image.Image:
    """Decode an image file (or its bytes) the way every format sees it: EXIF orientation applied, RGB."""
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error here, whatever a caller set
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        src = io.BytesIO(path) if isinstance(path, bytes) else path
        with Image.open(src) as im:
            w, h = im.size
            if max(w, h) > MAX_SIDE:
                raise ValueError(f"image too large ({w}x{h}; longest side limit {MAX_SIDE})")
            im.load()
            out = ImageOps.exif_transpose(im)
            out = _to_rgb(out)
            if out is im:
                out = im.copy()
    return out


def cache_size(height: int, width: int, cache_res: int) -> tuple[int, int]:
    """(h, w) of an image in the pixel cache: short side resized to cache_res, never upscaled."""
    short = min(height, width)
    if cache_res <= 0 or short <= cache_res:
        return height, width
    s = cache_res / short
    if height <= width:
        return cache_res, max(1, round(width * s))
    return max(1, round(height * s)), cache_res


# ------------------------------------------------------------------------------------ pool worker functions
def _hash_job(path: str) -> tuple[int, str] | str:
    """(bytes, sha1) of a file, or the reason it cannot be read."""
    try:
        if os.path.isdir(path):
            return (
                "symlink loop (links to its own or a parent folder)" if os.path.islink(path) else "not a file"
            )
        if os.path.islink(path) and not os.path.exists(path):
            try:
                os.stat(path)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    return "symlink loop"
            return "broken symlink"
        h = hashlib.sha1()
        n = 0
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
                n += len(chunk)
        return n, h.hexdigest()
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symlink loop"
        if isinstance(e, PermissionError):
            return "unreadable: permission denied"
        if isinstance(e, IsADirectoryError):
            return "not a file"
        return f"unreadable: {e.strerror or e}"


def _scan_job(path: str) -> dict[str, Any]:
    """Decode one file fully; report its oriented size and whether its bytes can go into a tar as-is."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        if not data:
            return {"ok": False, "reason": "empty file (0 bytes)"}
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                w, h = probe.size
                if max(w, h) > MAX_SIDE:  # before getexif(), which decodes PNGs in full
                    return {
                        "ok": False,
                        "reason": f"image too large ({w}x{h}; longest side limit {MAX_SIDE})",
                    }
                fmt, mode, info = probe.format, probe.mode, dict(probe.info)
                orientation = probe.getexif().get(0x0112, 1)
        img = load_rgb(data)
        copy_ok = (
            fmt == "JPEG"
            and mode == "RGB"
            and orientation in (0, 1)
            and not info.get("progressive")
            and not info.get("progression")
        )
        return {"ok": True, "height": img.height, "width": img.width, "copy": bool(copy_ok)}
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return {"ok": False, "reason": f"decompression bomb refused ({str(e).split('.')[0]})"}
    except Image.UnidentifiedImageError:
        return {"ok": False, "reason": "not an image (unidentified format)"}
    except OSError as e:
        msg = str(e) or type(e).__name__
        if "truncated" in msg.lower():
            return {"ok": False, "reason": f"truncated or corrupt: {msg}"}
        return {"ok": False, "reason": f"corrupt or unreadable: {msg}"}
    except Exception as e:  # noqa: BLE001 - any decoder failure is a bad file, never a crash
        return {"ok": False, "reason": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}


def _wds_job(args: tuple[str, bool, int]) -> bytes:
    """JPEG bytes for the tar: the original file when it is a baseline RGB JPEG, else a re-encode."""
    path, copy, quality = args
    with open(path, "rb") as f:
        data = f.read()
    if copy:
        return data
    buf = io.BytesIO()
    load_rgb(data).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _cache_job(args: tuple[str, int, int]) -> np.ndarray:
    """HWC uint8 pixels resized (bilinear, antialiased) to the cache size computed at scan time."""
    path, h, w = args
    img = load_rgb(path)
    if (img.height, img.width) != (h, w):
        img = img.resize((w, h), Image.BILINEAR, reducing_gap=3.0)
    arr = np.asarray(img, dtype=np.uint8)
    if arr.shape != (h, w, 3):
        raise RuntimeError(
            f"{path}: decoded to {arr.shape}, expected {(h, w, 3)} (file changed during convert?)"
        )
    return arr


def _pool_init() -> None:
    ImageFile.LOAD_TRUNCATED_IMAGES = False


def _imap(
    fn: Callable[[Any], Any], items: Sequence[Any], workers: int, desc: str, progress: bool
) -> Iterator[Any]:
    """Ordered parallel map with a progress bar (in-process when workers <= 1)."""
    bar = tqdm(total=len(items), desc=desc, unit="img", disable=not progress, leave=False, dynamic_ncols=True)
    try:
        if workers <= 1 or len(items) < 2:
            for it in items:
                yield fn(it)
                bar.update(1)
            return
        chunk = max(1, min(32, len(items) // (workers * 8)))
        with mp.get_context().Pool(workers, initializer=_pool_init) as pool:
            for r in pool.imap(fn, items, chunksize=chunk):
                yield r
                bar.update(1)
    finally:
        bar.close()


# ---------------------------------------------------------------------------------------------- discovery
@dataclass
class Source:
    rel: str  # path relative to SRC (posix)
    abspath: str
    label: int
    bytes: int = 0
    sha1: str = ""
    height: int = 0
    width: int = 0
    copy: bool = False


@dataclass
class Split:
    name: str
    candidates: list[Source] = field(default_factory=list)
    good: list[Source] = field(default_factory=list)


def _walk_files(folder: Path) -> list[Path]:
    """Every non-hidden file below `folder` (following directory links, each real directory once)."""
    seen: set[str] = set()
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        keep = []
        for d in sorted(d for d in dirnames if not d.startswith(".")):
            full = os.path.join(dirpath, d)
            target = os.path.realpath(full)
            if os.path.islink(full) and (target == real or real.startswith(target + os.sep)):
                out.append(Path(full))  # a link to this folder or an ancestor: reported, never walked
            else:
                keep.append(d)
        dirnames[:] = keep
        out.extend(Path(dirpath) / f for f in filenames if not f.startswith("."))
    return out


def discover(src: Path) -> tuple[list[str], list[Split]]:
    """Class names (sorted, from the first split) and each split's candidate files in sample order."""
    if not src.exists():
        raise UserError(f"source folder {src} does not exist")
    if not src.is_dir():
        raise UserError(f"source {src} is not a folder (expected an ImageFolder root)")
    subdirs = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    split_dirs = [src / s for s in SPLIT_NAMES if (src / s).is_dir()]
    if not split_dirs:  # class folders directly under SRC: one split, "train"
        split_dirs = [src]
    classes: list[str] | None = None
    splits: list[Split] = []
    for sd in split_dirs:
        name = sd.name if sd != src else "train"
        cdirs = sorted(
            (p for p in sd.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name
        )
        if not cdirs:
            where = sd if sd != src else src
            raise UserError(f"no class folders in {where}: expected {where}/<class>/<image files>")
        names = [p.name for p in cdirs]
        if classes is None:
            classes = names
        else:
            extra = sorted(set(names) - set(classes))
            if extra:
                raise UserError(
                    f"{sd} has class folders {extra[:5]} that {split_dirs[0]} lacks: "
                    f"every split must use the classes of {split_dirs[0].name}"
                )
        label_of = {c: i for i, c in enumerate(classes)}
        sp = Split(name)
        for cd in cdirs:
            files = _walk_files(cd)
            if not files:
                raise UserError(f"class folder {cd} is empty: remove it or add images")
            items = sorted((f.relative_to(src).as_posix(), f) for f in files)
            sp.candidates.extend(Source(rel, str(f), label_of[cd.name]) for rel, f in items)
        splits.append(sp)
    if len(split_dirs) > 1 or split_dirs[0] != src:
        others = [p.name for p in subdirs if p.name not in SPLIT_NAMES]
        if others:
            print(f"[convert] ignoring folders that are not splits ({', '.join(SPLIT_NAMES)}): {others}")
    assert classes is not None
    return classes, splits


# ---------------------------------------------------------------------------------------------- utilities
def _sha1_str(s: str) -> str:
    return hashlib.sha1(s.encode()).hexdigest()


def _fmt_options(fmt: str, o: dict[str, Any]) -> dict[str, Any]:
    """The options a format's bytes depend on (what makes an existing output stale)."""
    if fmt == "ffcv":
        return {"max_res": o["max_res"], "write_mode": o["write_mode"], "jpeg_quality": o["jpeg_quality"]}
    if fmt == "dali":
        return {"shard_size": o["shard_size"], "jpeg_quality": o["jpeg_quality"]}
    return {"cache_res": o["cache_res"]}


def _replace(tmp: Path, final: Path) -> None:
    os.replace(tmp, final)


def _commit(o: dict[str, Any], fmt: str) -> None:
    """Tell `convert` that `fmt`'s first finished file is about to replace an old one."""
    hook = o.get("commit")
    if hook is not None:
        hook(fmt)


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + TMP)


def _cleanup_tmp(folder: Path) -> None:
    if folder.is_dir():
        for p in folder.rglob(f"*{TMP}"):
            if p.is_file():
                p.unlink()


def _write_atomic(path: Path, data: bytes) -> None:
    """Write a small file under its temp name, fsync it, rename it into place."""
    tmp = _tmp(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_json(path: Path, obj: Any) -> None:
    _write_atomic(path, json.dumps(obj, indent=1).encode())


# --------------------------------------------------------------------------------------------------- writers
def write_files_txt(split_dir: Path, sp: Split) -> list[Path]:
    path = split_dir / "files.txt"
    _write_atomic(path, "".join(f"{s.rel} {s.label}\n" for s in sp.good).encode())
    return [path]


def write_dali(split_dir: Path, sp: Split, o: dict[str, Any]) -> list[Path]:
    """WebDataset shards (<key>.jpg, <key>.cls; key = zero-padded sample index, members in a fixed random
    order) + DALI v1.2 index files.

    Old shards stay untouched until every new shard is written (a failed rebuild leaves them usable)."""
    wds = split_dir / "wds"
    wds.mkdir(parents=True, exist_ok=True)
    old_files = set(wds.glob("*.tar")) | set(wds.glob("*.idx"))
    n, size = len(sp.good), o["shard_size"]
    # Members in a fixed random order, not class-sorted: DALI's buffer shuffle (initial_fill) then mixes
    # classes on a large set too. Keys stay the sample indices, so readers lose nothing.
    order = np.random.default_rng(0).permutation(n)
    jobs = [(sp.good[j].abspath, sp.good[j].copy, o["jpeg_quality"]) for j in order]
    payloads = _imap(_wds_job, jobs, o["workers"], f"dali {sp.name}", o["progress"])
    written: list[tuple[Path, Path]] = []
    try:
        for shard, start in enumerate(range(0, n, size)):
            stop = min(n, start + size)
            tar_path = wds / f"{sp.name}-{shard:05d}.tar"
            idx_path = tar_path.with_suffix(".idx")
            written.append((tar_path, idx_path))
            lines: list[str] = []
            with (
                open(_tmp(tar_path), "wb") as f,
                tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar,
            ):
                for i in (int(j) for j in order[start:stop]):
                    key = f"{i:08d}"
                    parts = []
                    for ext, data in (("jpg", next(payloads)), ("cls", str(sp.good[i].label).encode())):
                        info = tarfile.TarInfo(f"{key}.{ext}")
                        info.size, info.mode, info.mtime, info.uname, info.gname = len(data), 0o444, 0, "", ""
                        tar.addfile(info, io.BytesIO(data))
                        data_off = tar.offset - ((len(data) + 511) // 512) * 512
                        parts.append(f"{ext} {data_off} {len(data)} {key}.{ext}")
                    lines.append(" ".join(parts))
            with open(_tmp(idx_path), "w") as f:
                f.write(f"v1.2 {len(lines)}\n" + "".join(line + "\n" for line in lines))
        _commit(o, "dali")
        for tar_path, idx_path in written:
            _replace(_tmp(tar_path), tar_path)
            _replace(_tmp(idx_path), idx_path)
    finally:
        payloads.close()
    new = [p for pair in written for p in pair]
    for stale in old_files - set(new):  # shards of a larger previous conversion
        stale.unlink(missing_ok=True)
    return new


def write_cache(split_dir: Path, sp: Split, o: dict[str, Any]) -> list[Path]:
    """pixels.npy (uint8 [P,3], filled through a memmap) + meta.npz (offsets, heights, widths, labels)."""
    cache = split_dir / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    sizes = np.array(
        [cache_size(s.height, s.width, o["cache_res"]) for s in sp.good], dtype=np.int64
    ).reshape(-1, 2)
    counts = sizes[:, 0] * sizes[:, 1]
    offsets = np.zeros(len(sp.good), dtype=np.int64)
    if len(counts) > 1:
        offsets[1:] = np.cumsum(counts)[:-1]
    total = int(counts.sum())
    pix_path, meta_path = cache / "pixels.npy", cache / "meta.npz"
    pixels = np.lib.format.open_memmap(_tmp(pix_path), mode="w+", dtype=np.uint8, shape=(total, 3))
    jobs = [(s.abspath, int(h), int(w)) for s, (h, w) in zip(sp.good, sizes)]
    for i, arr in enumerate(_imap(_cache_job, jobs, o["workers"], f"cache {sp.name}", o["progress"])):
        pixels[offsets[i] : offsets[i] + counts[i]] = arr.reshape(-1, 3)
    pixels.flush()
    del pixels
    with open(_tmp(meta_path), "wb") as f:
        np.savez(
            f,
            offsets=offsets,
            heights=sizes[:, 0].astype(np.int32),
            widths=sizes[:, 1].astype(np.int32),
            labels=np.array([s.label for s in sp.good], dtype=np.int64),
        )
    _commit(o, "cache")
    _replace(_tmp(pix_path), pix_path)
    _replace(_tmp(meta_path), meta_path)
    return [pix_path, meta_path]


class FFCVSource:
    """Indexed dataset FFCV's writer workers read: (uint8 HWC RGB image, label, sample index)."""

    def __init__(self, sources: list[Source]) -> None:
        self.paths = [s.abspath for s in sources]
        self.labels = [s.label for s in sources]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int, int]:
        return np.asarray(load_rgb(self.paths[i]), dtype=np.uint8), self.labels[i], i


def _ffcv_writer_cls() -> type:
    """FFCV's DatasetWriter, with our progress bar and a check for dead workers (FFCV itself would wait
    forever for a worker that raised)."""
    from ffcv.writer import DatasetWriter  # under write_ffcv's torch_threads_kept

    class SafeDatasetWriter(DatasetWriter):
        progress: bool = True
        desc: str = "ffcv"

        def _write_common(self, num_samples, queue_content, work_fn, extra_worker_args):  # type: ignore[no-untyped-def]
            import ctypes
            from multiprocessing import Process, Queue, Value

            from ffcv.memory_allocator import MemoryAllocator

            self.num_samples = num_samples
            self.prepare()
            workqueue: Queue = Queue()
            for todo in queue_content:
                workqueue.put(todo)
            allocations_queue: Queue = Queue()
            for _ in range(self.num_workers):
                workqueue.put(None)
            done_number = Value(ctypes.c_uint64, 0)
            allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
            worker_args = (
                workqueue,
                self.metadata_sm,
                self.metadata_type,
                self.fields,
                allocator,
                done_number,
                allocations_queue,
                *extra_worker_args,
            )
            processes = [Process(target=work_fn, args=worker_args) for _ in range(self.num_workers)]
            bar = tqdm(total=num_samples, desc=self.desc, unit="img", disable=not self.progress, leave=False)
            try:
                for p in processes:
                    p.start()
                previous = 0
                while True:
                    # exit states first, then the counter: when every worker has exited the count is final
                    dead = [p for p in processes if p.exitcode not in (None, 0)]
                    exited = all(p.exitcode is not None for p in processes)
                    val = done_number.value
                    if val > previous:
                        bar.update(val - previous)
                        previous = val
                    if previous == num_samples:
                        break
                    if dead or exited:
                        code = dead[0].exitcode if dead else 0
                        raise RuntimeError(
                            f"FFCV writer worker failed (exit code {code}) "
                            f"after {previous}/{num_samples} samples"
                        )
                    time.sleep(0.02)
                allocation_list = []
                for _ in processes:
                    while True:
                        try:
                            allocation_list.extend(allocations_queue.get(timeout=1.0))
                            break
                        except queue.Empty:
                            if any(p.exitcode not in (None, 0) for p in processes):
                                raise RuntimeError("FFCV writer worker failed while finishing") from None
                for p in processes:
                    p.join()
                self.finalize(allocation_list)
            finally:
                bar.close()
                for p in processes:
                    if p.is_alive():
                        p.terminate()
                        p.join()
                self.metadata_sm.close()
                self.metadata_sm.unlink()

    return SafeDatasetWriter


def write_ffcv(split_dir: Path, sp: Split, o: dict[str, Any]) -> list[Path]:
    """<split>.beton with fields image (RGBImageField), label (IntField), index (IntField).

    FFCV's import and its writer set torch's thread count (to 1): it is put back afterwards, else every
    later model step in this process (the demo) runs on one core.
    """
    from fastvpd.data import torch_threads_kept

    with torch_threads_kept():
        return _write_ffcv(split_dir, sp, o)


def _write_ffcv(split_dir: Path, sp: Split, o: dict[str, Any]) -> list[Path]:
    from ffcv.fields import IntField, RGBImageField

    path = split_dir / f"{sp.name}.beton"
    fields = {
        "image": RGBImageField(
            write_mode=o["write_mode"], max_resolution=o["max_res"] or None, jpeg_quality=o["jpeg_quality"]
        ),
        "label": IntField(),
        "index": IntField(),
    }
    # FFCV pages must hold the largest sample; small sets get small pages so the file is not mostly padding
    from ffcv.writer import MIN_PAGE_SIZE

    longest = max(max(s.height, s.width) for s in sp.good)
    scale = min(1.0, o["max_res"] / longest) if o["max_res"] else 1.0
    biggest = max(s.height * s.width for s in sp.good) * 3 * scale * scale
    page = MIN_PAGE_SIZE if len(sp.good) < 5000 else 4 * MIN_PAGE_SIZE
    while page < biggest + (1 << 16):
        page *= 2
    writer = _ffcv_writer_cls()(str(_tmp(path)), fields, page_size=page, num_workers=max(1, o["workers"]))
    writer.progress, writer.desc = o["progress"], f"ffcv {sp.name}"
    writer.from_indexed_dataset(
        FFCVSource(sp.good), chunksize=max(1, min(100, len(sp.good) // o["workers"] or 1))
    )
    _commit(o, "ffcv")
    _replace(_tmp(path), path)
    return [path]


WRITERS: dict[str, Callable[[Path, Split, dict[str, Any]], list[Path]]] = {
    "ffcv": write_ffcv,
    "dali": write_dali,
    "cache": write_cache,
}


# ---------------------------------------------------------------------------------------------------- main
def _check_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test{TMP}"
        with open(probe, "wb") as f:
            f.write(b"\0")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to output folder {out}: {e.strerror or e}") from None


def _load_old(out: Path) -> dict[str, Any] | None:
    try:
        return Manifest.load(out).data
    except UserError:
        return None


def _fresh(old: dict[str, Any] | None, fmt: str, digest: str, o: dict[str, Any], out: Path) -> bool:
    """Is `fmt` in the old manifest, built from the same sources with the same options, and intact?"""
    if not old or old.get("source_digest") != digest:
        return False
    if old.get("format_options", {}).get(fmt) != _fmt_options(fmt, o):
        return False
    for sp in old["splits"].values():
        recs = sp.get("outputs", {}).get(fmt)
        if not recs or any(check_file(out, r, "fast") for r in recs):
            return False
    return True


def convert(
    src: str | Path,
    out: str | Path,
    formats: Iterable[str] = ("ffcv", "dali", "cache"),
    workers: int | None = None,
    max_res: int = 256,
    write_mode: str = "jpg",
    jpeg_quality: int = 90,
    cache_res: int = 256,
    shard_size: int = 1000,
    strict: bool = False,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Convert the ImageFolder tree `src` into `out`; return a summary dict (see `_summary`).

    Raises UserError for user mistakes (missing SRC, no/empty class folders, unwritable OUT, bad options,
    and skipped files when strict=True).
    """
    t_start = time.perf_counter()
    formats = list(dict.fromkeys(formats))
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise UserError(f"unknown format(s) {bad or formats}: choose from {','.join(FORMATS)}")
    if write_mode not in WRITE_MODES:
        raise UserError(f"--write-mode must be one of {', '.join(WRITE_MODES)} (got {write_mode!r})")
    if not 1 <= jpeg_quality <= 100:
        raise UserError(f"--jpeg-quality must be in 1..100 (got {jpeg_quality})")
    if shard_size < 1 or max_res < 0 or cache_res < 0:
        raise UserError("--shard-size must be >= 1 and --max-res/--cache-res >= 0")
    if "ffcv" in formats:
        from fastvpd.data import torch_threads_kept

        try:
            with torch_threads_kept():  # FFCV's import sets torch's thread count to 1
                import ffcv.writer  # noqa: F401
        except Exception as e:  # noqa: BLE001 - missing package or its native libraries
            raise UserError(
                f"FFCV is not usable here ({type(e).__name__}: {e}): "
                "install the ffcv extra or drop ffcv from --formats"
            ) from None
    workers = int(workers) if workers else (os.cpu_count() or 1)
    src, out = Path(src).resolve(), Path(out).resolve()
    o = {
        "max_res": int(max_res),
        "write_mode": write_mode,
        "jpeg_quality": int(jpeg_quality),
        "cache_res": int(cache_res),
        "shard_size": int(shard_size),
        "workers": workers,
        "progress": progress,
    }
    classes, splits = discover(src)
    _check_out(out)
    log = print if progress else (lambda *a, **k: None)

    # 1. hash every candidate (cheap): identifies the sources for the up-to-date check
    t0 = time.perf_counter()
    all_c = [s for sp in splits for s in sp.candidates]
    skipped: list[dict[str, str]] = []
    bad_reason: dict[str, str] = {}
    for s, r in zip(all_c, _imap(_hash_job, [s.abspath for s in all_c], workers, "hash", progress)):
        if isinstance(r, str):
            bad_reason[s.rel] = r
        else:
            s.bytes, s.sha1 = r
    for s in all_c:
        if bad_reason.get(s.rel) is None and Path(s.rel).suffix.lower() not in IMG_EXTS:
            bad_reason[s.rel] = f"unsupported extension {Path(s.rel).suffix or '(none)'}"
    digest = _sha1_str(
        json.dumps(classes)
        + "".join(
            f"{sp.name}\t{s.rel}\t{s.label}\t{s.bytes}\t{s.sha1 or bad_reason.get(s.rel)}\n"
            for sp in splits
            for s in sp.candidates
        )
    )
    old = _load_old(out)
    fresh = {f: (not force) and _fresh(old, f, digest, o, out) for f in formats}
    t_hash = time.perf_counter() - t0

    # 2. decode + validate every hashed file once (skipped when everything requested is up to date)
    t0 = time.perf_counter()
    if all(fresh.values()) and old is not None:
        skipped = list(old.get("skipped", []))
        for sp in splits:
            by_rel = {r["path"]: r for r in old["splits"][sp.name]["sources"]}
            sp.good = [s for s in sp.candidates if s.rel in by_rel]
    else:
        todo = [s for s in all_c if s.rel not in bad_reason]
        for s, r in zip(todo, _imap(_scan_job, [s.abspath for s in todo], workers, "decode", progress)):
            if r["ok"]:
                s.height, s.width, s.copy = r["height"], r["width"], r["copy"]
            else:
                bad_reason[s.rel] = r["reason"]
        for sp in splits:
            sp.good = [s for s in sp.candidates if s.rel not in bad_reason]
        skipped = [{"path": s.rel, "reason": bad_reason[s.rel]} for s in all_c if s.rel in bad_reason]
    t_scan = time.perf_counter() - t0
    if strict and skipped:
        listing = "; ".join(f"{d['path']}: {d['reason']}" for d in skipped[:20])
        more = f" (+{len(skipped) - 20} more)" if len(skipped) > 20 else ""
        raise StrictError(f"--strict: {len(skipped)} source file(s) skipped: {listing}{more}", skipped)
    for sp in splits:
        if not sp.good:
            raise UserError(f"split {sp.name!r} has no readable images in {src}")

    # 3. the new manifest: starts from what the old one vouches for (same sources) and stays in step with
    # the disk: a format leaves it only when its first finished file is renamed over an old one (`commit`)
    keep_old = old is not None and old.get("source_digest") == digest
    manifest: dict[str, Any] = {
        "version": MANIFEST_VERSION,
        "src": str(src),
        "classes": classes,
        "source_digest": digest,
        "options": {k: v for k, v in o.items() if k not in ("workers", "progress")} | {"formats": formats},
        "format_options": {},
        "splits": {},
        "skipped": skipped,
    }
    for sp in splits:
        manifest["splits"][sp.name] = {
            "count": len(sp.good),
            "sources": [{"path": s.rel, "label": s.label, "bytes": s.bytes, "sha1": s.sha1} for s in sp.good],
            "outputs": {},
        }
    if keep_old:
        assert old is not None
        for fmt, fo in old.get("format_options", {}).items():
            if fmt in FORMATS:
                manifest["format_options"][fmt] = fo
        for name, old_sp in old["splits"].items():
            for fmt, recs in old_sp.get("outputs", {}).items():
                if fmt in FORMATS or fmt == "files":
                    manifest["splits"][name]["outputs"][fmt] = recs
    manifest["options"]["formats"] = sorted(manifest["format_options"])
    ondisk: dict[str, Any] = {"manifest": old, "rewritten": False}
    committed: set[str] = set()

    def write_manifest() -> None:
        manifest["options"]["formats"] = sorted(manifest["format_options"])
        _write_json(out / MANIFEST_NAME, manifest)
        ondisk["manifest"], ondisk["rewritten"] = json.loads(json.dumps(manifest)), True

    def commit(fmt: str) -> None:
        """Called right before the first finished file of `fmt` replaces an old one: from then on the
        manifest on disk must not vouch for `fmt` (nor, when the sources changed, for anything old)."""
        if fmt in committed:
            return
        committed.add(fmt)
        manifest["format_options"].pop(fmt, None)
        for spm in manifest["splits"].values():
            spm["outputs"].pop(fmt, None)
        disk = ondisk["manifest"]
        if disk is None:
            return
        stale_sources = not keep_old and not ondisk["rewritten"]
        if stale_sources or any(fmt in spm.get("outputs", {}) for spm in disk["splits"].values()):
            write_manifest()

    o["commit"] = commit

    # 4. write the formats: every byte goes to a temp file first, so a full disk, a read-only folder or a
    # crash leaves the previous outputs in place and manifest.json vouching only for complete files
    stats: dict[str, dict[str, Any]] = {}
    n_total = sum(len(sp.good) for sp in splits)
    try:
        for sp in splits:
            split_dir = out / sp.name
            split_dir.mkdir(parents=True, exist_ok=True)
            _cleanup_tmp(split_dir)
        for fmt in formats:
            if fresh[fmt]:
                nbytes = sum(r["bytes"] for spm in manifest["splits"].values() for r in spm["outputs"][fmt])
                stats[fmt] = {"status": "up to date", "images": n_total, "bytes": nbytes, "seconds": 0.0}
                continue
            t0 = time.perf_counter()
            nbytes = 0
            for sp in splits:
                paths = WRITERS[fmt](out / sp.name, sp, o)
                recs = [file_record(p, out) for p in paths]
                manifest["splits"][sp.name]["outputs"][fmt] = recs
                nbytes += sum(r["bytes"] for r in recs)
            manifest["format_options"][fmt] = _fmt_options(fmt, o)
            write_manifest()  # vouches for the formats finished so far
            stats[fmt] = {
                "status": "built",
                "images": n_total,
                "bytes": nbytes,
                "seconds": time.perf_counter() - t0,
            }
        for sp in splits:
            commit("files")
            paths = write_files_txt(out / sp.name, sp)
            manifest["splits"][sp.name]["outputs"]["files"] = [file_record(p, out) for p in paths]
        write_manifest()  # last: vouches for everything above
    except OSError as e:
        where = e.filename or out
        lost = sorted(f for f in committed if f not in manifest["format_options"] and f != "files")
        kept = (
            f"{', '.join(lost)} must be rebuilt, the rest of {out} is intact"
            if lost
            else f"the previous outputs in {out} are intact"
        )
        raise UserError(
            f"could not write {where} ({e.strerror or e}): free disk space or make {out} writable, then "
            f"re-run; {kept} (manifest.json vouches only for complete files)"
        ) from None
    finally:
        o.pop("commit", None)
        for sp in splits:
            _cleanup_tmp(out / sp.name)

    summary = {
        "out": str(out),
        "classes": len(classes),
        "splits": {sp.name: len(sp.good) for sp in splits},
        "skipped": skipped,
        "formats": stats,
        "hash_seconds": t_hash,
        "decode_seconds": t_scan,
        "seconds": time.perf_counter() - t_start,
    }
    log(format_summary(summary))
    return summary


def format_summary(s: dict[str, Any]) -> str:
    """Human-readable end-of-run table."""
    lines = [
        f"converted into {s['out']}: {s['classes']} classes, "
        + ", ".join(f"{k} {v}" for k, v in s["splits"].items())
        + f" (hash {s['hash_seconds']:.1f} s, decode/validate {s['decode_seconds']:.1f} s)",
        f"{'format':<8}{'status':>12}{'images':>9}{'MB':>10}{'seconds':>9}{'images/s':>10}",
    ]
    for fmt, st in s["formats"].items():
        rate = f"{st['images'] / st['seconds']:.0f}" if st["seconds"] > 0 else "-"
        lines.append(
            f"{fmt:<8}{st['status']:>12}{st['images']:>9}{st['bytes'] / 1e6:>10.1f}"
            f"{st['seconds']:>9.2f}{rate:>10}"
        )
    if s["skipped"]:
        lines.append(f"skipped {len(s['skipped'])} file(s):")
        lines.extend(f"  {d['path']}: {d['reason']}" for d in s["skipped"])
    return "\n".join(lines)


@main_guard
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "src", help="ImageFolder root: split folders train/ val/ [test/] of class folders, or class folders"
    )
    p.add_argument("out", help="output folder (gets manifest.json and one folder per split)")
    p.add_argument("--formats", default="ffcv,dali,cache", help="comma-separated subset of ffcv,dali,cache")
    p.add_argument("--workers", type=int, default=0, help="worker processes (0 = all cores)")
    p.add_argument("--max-res", type=int, default=256, help="FFCV: longest side stored (0 = native size)")
    p.add_argument("--write-mode", default="jpg", choices=WRITE_MODES, help="FFCV image storage")
    p.add_argument(
        "--jpeg-quality", type=int, default=90, help="JPEG quality for FFCV and for re-encoded tar members"
    )
    p.add_argument(
        "--cache-res", type=int, default=256, help="cache: short side (0 = native; never upscales)"
    )
    p.add_argument("--shard-size", type=int, default=1000, help="images per WebDataset tar shard")
    p.add_argument(
        "--strict", action="store_true", help="exit 1 naming every skipped source file (nothing written)"
    )
    p.add_argument("--force", action="store_true", help="rebuild formats even when they are up to date")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or summary table")
    a = p.parse_args(argv)
    try:
        convert(
            a.src,
            a.out,
            formats=[f.strip() for f in a.formats.split(",") if f.strip()],
            workers=a.workers or None,
            max_res=a.max_res,
            write_mode=a.write_mode,
            jpeg_quality=a.jpeg_quality,
            cache_res=a.cache_res,
            shard_size=a.shard_size,
            strict=a.strict,
            force=a.force,
            progress=not a.no_progress,
        )
    except StrictError as e:  # every skipped file on its own line, then the one-line summary
        for d in e.skipped:
            print(f"skipped: {d['path']}: {d['reason']}", file=sys.stderr)
        print(
            f"error: --strict: {len(e.skipped)} source file(s) skipped (listed above); nothing written",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

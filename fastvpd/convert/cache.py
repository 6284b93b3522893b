"""The decoded uint8 pixel cache: pixels.npy (uint8 [P, 3], every image's HWC pixels back to back) and
meta.npz (offsets, heights, widths, labels).

pixels.npy is written with ordinary sequential writes after reserving its full size: a memory-mapped
write would die of SIGBUS when the file system cannot back a page, where a write reports ENOSPC.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fastvpd.convert import files
from fastvpd.convert.decode import cache_size, imap, load_rgb
from fastvpd.convert.scan import Split


def cache_job(args: tuple[str, int, int]) -> np.ndarray:
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


def write_cache(split_dir: Path, sp: Split, o: dict[str, Any]) -> list[Path]:
    """pixels.npy + meta.npz of one split, under temp names until both are complete."""
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
    jobs = [(s.abspath, int(h), int(w)) for s, (h, w) in zip(sp.good, sizes)]
    with open(files.tmp(pix_path), "wb") as f:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False}
        np.lib.format.write_array_header_1_0(f, header | {"shape": (total, 3)})
        files.reserve(f, f.tell() + 3 * total, pix_path)
        for arr in imap(cache_job, jobs, o["workers"], f"cache {sp.name}", o["progress"]):
            f.write(np.ascontiguousarray(arr).data)  # images arrive in sample order: offsets are sequential
        f.flush()
    with open(files.tmp(meta_path), "wb") as f:
        np.savez(
            f,
            offsets=offsets,
            heights=sizes[:, 0].astype(np.int32),
            widths=sizes[:, 1].astype(np.int32),
            labels=np.array([s.label for s in sp.good], dtype=np.int64),
        )
    files.commit(o, "cache")
    files.replace(files.tmp(pix_path), pix_path)
    files.replace(files.tmp(meta_path), meta_path)
    return [pix_path, meta_path]

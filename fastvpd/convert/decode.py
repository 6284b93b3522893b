"""Reading and checking source images: the one decode every format sees (EXIF orientation, RGB), the
per-file check run in the pool (unreadable, truncated, bombs, too small, too elongated), and the pool map.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps
from tqdm import tqdm

MAX_SIDE = 30000  # longer sides are refused (FFCV stores uint16 sizes; such images are not training data)
MIN_SIDE = 8  # shorter sides are refused: every backend's crops and resizes need a few pixels per side
MAX_ASPECT = 32  # long side / short side above this is refused (a resize to a training size collapses it)


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


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def size_problem(width: int, height: int) -> str | None:
    """Why an image of this (oriented) size is not kept, or None."""
    if min(width, height) < MIN_SIDE:
        return f"image too small ({width}x{height}; smallest side limit {MIN_SIDE} px)"
    if max(width, height) > MAX_ASPECT * min(width, height):
        return f"image too elongated ({width}x{height}; aspect ratio limit {MAX_ASPECT}:1)"
    return None


def cache_size(height: int, width: int, cache_res: int) -> tuple[int, int]:
    """(h, w) of an image in the pixel cache: short side resized to cache_res, never upscaled."""
    short = min(height, width)
    if cache_res <= 0 or short <= cache_res:
        return height, width
    s = cache_res / short
    if height <= width:
        return cache_res, max(1, round(width * s))
    return max(1, round(height * s)), cache_res


def ffcv_size(height: int, width: int, max_res: int) -> tuple[int, int]:
    """(h, w) FFCV stores: longest side scaled down to max_res, truncated as FFCV's own resizer does."""
    ratio = max_res / max(height, width) if max_res else 1.0
    if ratio >= 1:
        return height, width
    return int(ratio * height), int(ratio * width)


def check_job(path: str) -> dict[str, Any]:
    """Decode one file fully; its oriented size and whether its bytes can go into a tar as-is, or why not."""
    try:
        data = read_bytes(path)
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
        why = size_problem(img.width, img.height)
        if why:
            return {"ok": False, "reason": why}
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
    except PermissionError:
        return {"ok": False, "reason": "unreadable: permission denied"}
    except OSError as e:
        msg = str(e) or type(e).__name__
        if "truncated" in msg.lower():
            return {"ok": False, "reason": f"truncated or corrupt: {msg}"}
        return {"ok": False, "reason": f"corrupt or unreadable: {msg}"}
    except Exception as e:  # noqa: BLE001 - any decoder failure is a bad file, never a crash
        return {"ok": False, "reason": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}


def _pool_init() -> None:
    ImageFile.LOAD_TRUNCATED_IMAGES = False


def imap(
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

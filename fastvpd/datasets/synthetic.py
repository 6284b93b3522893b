"""ImageNet-like JPEG trees for throughput work, built offline from real photographs.

The photographs are the two that scikit-learn ships (`load_sample_images()`: china.jpg, flower.jpg).
Each output image is a random crop of one of them (random scale and aspect), flipped, rotated, colour
shifted and resized to an ImageNet-like size (~500x375, random aspect), saved as JPEG at quality 75-95,
so file sizes and decode costs resemble ImageNet's (~100 KB). Deterministic given --seed.

    python -m fastvpd.datasets.synthetic OUT --classes 10 --per-class 40 [--seed 0] [--splits train,val]
    (in a checkout: python data_tools/make_synthetic.py, the same command)
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance
from tqdm import tqdm

from fastvpd.config import UserError, main_guard
from fastvpd.extras import require


@lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
    datasets = require("sklearn.datasets", "demo", "the sample photographs")
    return tuple(np.ascontiguousarray(im) for im in datasets.load_sample_images().images)


def class_name(c: int) -> str:
    """WordNet-id-like folder name, so sorting and parsing behave like ImageNet's."""
    return f"n{c:08d}"


def render(seed: int, split_id: int, c: int, i: int) -> tuple[bytes, int]:
    """JPEG bytes of image i of class c (deterministic in its arguments) and the quality used."""
    rng = np.random.default_rng([seed, split_id, c, i])
    photos = _photos()
    crng = np.random.default_rng([seed, 1_000_003, c])  # class identity: a photo and a colour cast
    src = Image.fromarray(photos[int(crng.integers(len(photos)))])
    tint = crng.uniform(0.8, 1.2, size=3)
    W, H = src.size
    area = W * H * rng.uniform(0.15, 1.0)
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    cw, ch = min(W, int(round(np.sqrt(area * aspect)))), min(H, int(round(np.sqrt(area / aspect))))
    x0, y0 = int(rng.integers(0, W - cw + 1)), int(rng.integers(0, H - ch + 1))
    img = src.crop((x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    angle = float(rng.uniform(-15, 15))
    img = img.rotate(
        angle, resample=Image.BILINEAR, expand=False, fillcolor=tuple(int(v) for v in rng.integers(0, 256, 3))
    )
    long_side = int(rng.integers(450, 501))
    out_aspect = float(rng.uniform(0.75, 1.5))
    w, h = (
        (long_side, int(long_side / out_aspect))
        if out_aspect >= 1
        else (int(long_side * out_aspect), long_side)
    )
    img = img.resize((w, h), Image.BICUBIC)
    img = ImageEnhance.Brightness(img).enhance(float(rng.uniform(0.7, 1.3)))
    img = ImageEnhance.Contrast(img).enhance(float(rng.uniform(0.7, 1.3)))
    img = ImageEnhance.Color(img).enhance(float(rng.uniform(0.5, 1.5)))
    arr = np.asarray(img).astype(np.float32) * tint
    arr += rng.standard_normal(arr.shape, dtype=np.float32) * np.float32(
        11.0
    )  # sensor-like noise: ImageNet-like JPEG sizes
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    quality = int(rng.integers(75, 96))
    from io import BytesIO

    buf = BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), quality


def _job(args: tuple[str, int, int, int, int]) -> int:
    path, seed, split_id, c, i = args
    data, _ = render(seed, split_id, c, i)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return len(data)


def make_synthetic(
    out: str | Path,
    classes: int,
    per_class: int,
    seed: int = 0,
    splits: tuple[str, ...] = ("train", "val"),
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, int]:
    """Write OUT/<split>/<class>/<split>_<c>_<i>.JPEG; return {split: images, 'bytes': total bytes}."""
    if classes < 1 or per_class < 1:
        raise UserError(f"--classes and --per-class must be >= 1 (got {classes}, {per_class})")
    if not splits:
        raise UserError("--splits needs at least one split name")
    _photos()  # a missing extra is one line here, not a traceback in each worker
    out = Path(out)
    jobs = []
    for s_id, split in enumerate(splits):
        for c in range(classes):
            d = out / split / class_name(c)
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UserError(f"cannot create {d}: {e.strerror}") from None
            jobs.extend((str(d / f"{split}_{c}_{i}.JPEG"), seed, s_id, c, i) for i in range(per_class))
    workers = workers or os.cpu_count() or 1
    total = 0
    with tqdm(total=len(jobs), desc="synthetic", unit="img", disable=not progress) as bar:
        if workers <= 1:
            for j in jobs:
                total += _job(j)
                bar.update(1)
        else:
            with mp.get_context().Pool(workers) as pool:
                for n in pool.imap_unordered(_job, jobs, chunksize=8):
                    total += n
                    bar.update(1)
    counts = {split: classes * per_class for split in splits}
    return counts | {"bytes": total}


@main_guard
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("out", help="output folder (created)")
    p.add_argument("--classes", type=int, required=True, help="number of class folders")
    p.add_argument("--per-class", type=int, required=True, help="images per class and split")
    p.add_argument("--seed", type=int, default=0, help="seed: same seed, same bytes")
    p.add_argument("--splits", default="train,val", help="comma-separated split folder names")
    p.add_argument("--workers", type=int, default=0, help="worker processes (0 = all cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    splits = tuple(s.strip() for s in a.splits.split(",") if s.strip())
    r = make_synthetic(a.out, a.classes, a.per_class, a.seed, splits, a.workers or None, not a.no_progress)
    n = sum(v for k, v in r.items() if k != "bytes")
    print(
        f"wrote {n} JPEGs to {a.out} ({r['bytes'] / 1e6:.1f} MB, {r['bytes'] / max(n, 1) / 1e3:.0f} KB each)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

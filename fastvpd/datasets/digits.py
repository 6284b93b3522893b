"""Embedded real data: scikit-learn's 1797 handwritten 8x8 digits as a VIPriors-style ImageFolder tree.

The project's demo and tests need real (not random) images that ship with an installed package, so they
run offline. Layout: OUT/{train,val,test}/<digit>/<id>.png, 50 per class in train and in val (disjoint,
chosen by seed), the rest in test; images upscaled to SIZE x SIZE RGB, white digit on black as in the
original data.

    python -m fastvpd.datasets.digits OUT [--seed 0] [--size 32] [--format png|jpg]
    (in a checkout: python data_tools/make_digits.py, the same command)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from fastvpd.config import UserError, main_guard
from fastvpd.extras import require

PER_CLASS = 50


def make_digits(
    out: str | Path, seed: int = 0, size: int = 32, fmt: str = "png", per_class: int = PER_CLASS
) -> dict[str, int]:
    """Write the digits tree under `out`; return the image count per split.

    Each class is shuffled with `seed`; the first `per_class` go to train, the next `per_class` to val,
    the rest to test, so the splits are disjoint and deterministic.
    """
    datasets = require("sklearn.datasets", "demo", "the embedded digits data")
    if fmt not in ("png", "jpg"):
        raise UserError(f"--format must be png or jpg (got {fmt!r})")
    if size < 8:
        raise UserError(f"--size must be >= 8 (got {size})")
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {out}: {e.strerror}") from None
    digits = datasets.load_digits()
    images = np.clip(digits.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)  # 0..16 -> 0..255
    targets = digits.target
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "val": 0, "test": 0}
    for c in range(10):
        idx = np.flatnonzero(targets == c)
        idx = idx[rng.permutation(len(idx))]
        if len(idx) < 2 * per_class:
            raise UserError(f"class {c} has {len(idx)} images, fewer than 2*per_class={2 * per_class}")
        parts = {
            "train": idx[:per_class],
            "val": idx[per_class : 2 * per_class],
            "test": idx[2 * per_class :],
        }
        for split, ids in parts.items():
            d = out / split / str(c)
            d.mkdir(parents=True, exist_ok=True)
            for i in ids:
                img = Image.fromarray(images[i], mode="L").resize((size, size), Image.BICUBIC).convert("RGB")
                if fmt == "png":
                    img.save(d / f"{i:04d}.png", optimize=False, compress_level=1)
                else:
                    img.save(d / f"{i:04d}.jpg", quality=95)
            counts[split] += len(ids)
    return counts


@main_guard
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="output folder (created); gets train/ val/ test/ class folders")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-class split (default 0)")
    p.add_argument("--size", type=int, default=32, help="output side in pixels, bicubic upscale (default 32)")
    p.add_argument("--format", default="png", choices=("png", "jpg"), help="image file format (default png)")
    a = p.parse_args(argv)
    counts = make_digits(a.out, seed=a.seed, size=a.size, fmt=a.format)
    print(f"wrote {a.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

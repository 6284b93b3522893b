"""VIPriors-style data-deficient ImageNet: train and val splits of --per-class images per class, both drawn
from the ImageNet *train* split (disjoint, deterministic given --seed), as symlinks (default) or copies.

The official ImageNet val set then serves as the test set, as in the VIPriors challenge.

    python -m fastvpd.datasets.vipriors IMAGENET_TRAIN_DIR OUT --per-class 50 --seed 0 [--copy]
    (in a checkout: python data_tools/vipriors_subset.py, the same command)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from fastvpd.config import UserError, main_guard
from fastvpd.convert import IMG_EXTS  # the files the converter reads are the files a subset keeps


def vipriors_subset(
    train_dir: str | Path, out: str | Path, per_class: int = 50, seed: int = 0, copy: bool = False
) -> dict[str, int]:
    """Write OUT/train/<class>/ and OUT/val/<class>/; return the image count per split.

    Per class, the sorted file list is permuted with a generator seeded by (seed, class index); the first
    per_class images go to train, the next per_class to val.
    """
    train_dir, out = Path(train_dir), Path(out)
    if not train_dir.is_dir():
        raise UserError(f"ImageNet train folder {train_dir} does not exist (expected <dir>/<wnid>/*.JPEG)")
    if per_class < 1:
        raise UserError(f"--per-class must be >= 1 (got {per_class})")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"no class folders in {train_dir} (expected {train_dir}/<wnid>/*.JPEG)")
    chosen: dict[str, tuple[list[Path], list[Path]]] = {}
    short = []
    for ci, c in enumerate(classes):
        files = sorted(
            p
            for p in (train_dir / c).iterdir()
            if p.is_file() and p.suffix.lower() in IMG_EXTS and p.name[0] != "."
        )
        if len(files) < 2 * per_class:
            short.append(f"{c} ({len(files)})")
            continue
        perm = np.random.default_rng([seed, ci]).permutation(len(files))
        chosen[c] = (
            [files[i] for i in perm[:per_class]],
            [files[i] for i in perm[per_class : 2 * per_class]],
        )
    if short:
        raise UserError(
            f"{len(short)} class(es) have fewer than 2*per-class={2 * per_class} images: "
            + ", ".join(short[:10])
            + (" ..." if len(short) > 10 else "")
            + "; lower --per-class"
        )
    counts = {"train": 0, "val": 0}
    for c, (tr, va) in chosen.items():
        for split, files in (("train", tr), ("val", va)):
            d = out / split / c
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UserError(f"cannot create {d}: {e.strerror}") from None
            for f in files:
                dst = d / f.name
                if dst.is_symlink() or dst.exists():
                    dst.unlink()
                if copy:
                    shutil.copy2(f, dst)
                else:
                    os.symlink(f.resolve(), dst)
            counts[split] += len(files)
    return counts


@main_guard
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("imagenet_train_dir", help="ImageNet train folder: <dir>/<wnid>/*.JPEG")
    p.add_argument("out", help="output folder: gets train/<wnid>/ and val/<wnid>/")
    p.add_argument("--per-class", type=int, default=50, help="images per class in each of train and val")
    p.add_argument("--seed", type=int, default=0, help="selection seed")
    p.add_argument("--copy", action="store_true", help="copy files instead of symlinking them")
    a = p.parse_args(argv)
    counts = vipriors_subset(a.imagenet_train_dir, a.out, a.per_class, a.seed, a.copy)
    print(
        f"wrote {a.out}: train {counts['train']}, val {counts['val']} ({'copies' if a.copy else 'symlinks'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

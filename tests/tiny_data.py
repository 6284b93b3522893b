"""A tiny labelled image tree converted to the cache: the data of the tests that train end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastvpd.convert import convert


def converted_tree(
    tmp_path_factory: pytest.TempPathFactory,
    name: str,
    per_class: dict[str, int],
    classes: int,
    size: int,
    tint: bool = False,
) -> Path:
    """`classes` class folders in each split (`per_class`: images per class, by split) of random
    size x size PNGs, converted to the cache; with `tint` each class brightens its own channel (learnable)."""
    src = tmp_path_factory.mktemp(f"{name}_src")
    rng = np.random.default_rng(0)
    for split, per in per_class.items():
        for c in range(classes):
            d = src / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(per):
                arr = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
                if tint:
                    arr[..., c % 3] = np.clip(arr[..., c % 3].astype(int) + 120, 0, 255)
                Image.fromarray(arr).save(d / f"{i}.png")
    out = tmp_path_factory.mktemp(f"{name}_conv")
    convert(src, out, formats=("cache",), workers=1, progress=False)
    return out

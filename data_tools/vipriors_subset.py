"""VIPriors-style data-deficient ImageNet: train and val splits of --per-class images per class, both drawn
from the ImageNet *train* split (disjoint, deterministic given --seed), as symlinks (default) or copies.

The checkout's entry point: `python data_tools/vipriors_subset.py --help`, the same command as
`python -m fastvpd.datasets.vipriors` (the logic
lives in fastvpd/datasets/vipriors.py, which ships in the wheel).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `fastvpd` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastvpd.datasets.vipriors import IMG_EXTS, main, vipriors_subset  # noqa: E402

__all__ = ["vipriors_subset", "main", "IMG_EXTS"]

if __name__ == "__main__":
    sys.exit(main())

"""Embedded real data: scikit-learn's 1797 handwritten 8x8 digits as a VIPriors-style ImageFolder tree.

The checkout's entry point: `python data_tools/make_digits.py --help`, the same command as
`python -m fastvpd.datasets.digits` (the logic
lives in fastvpd/datasets/digits.py, which ships in the wheel).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `fastvpd` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastvpd.datasets.digits import PER_CLASS, main, make_digits  # noqa: E402

__all__ = ["make_digits", "main", "PER_CLASS"]

if __name__ == "__main__":
    sys.exit(main())

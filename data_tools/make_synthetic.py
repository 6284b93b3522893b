"""ImageNet-like JPEG trees for throughput work, built offline from real photographs.

The checkout's entry point: `python data_tools/make_synthetic.py --help`, the same command as
`python -m fastvpd.datasets.synthetic` (the logic
lives in fastvpd/datasets/synthetic.py, which ships in the wheel).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `fastvpd` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastvpd.datasets.synthetic import class_name, main, make_synthetic, render  # noqa: E402

__all__ = ["make_synthetic", "main", "render", "class_name"]

if __name__ == "__main__":
    sys.exit(main())

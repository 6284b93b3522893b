"""The converter's entry point in a checkout: `python data_tools/convert.py SRC OUT [...]`, the same
command as `python -m fastvpd.convert` (the logic lives in fastvpd/convert/, which ships in the wheel).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `fastvpd` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastvpd.convert import (  # noqa: E402 - after the path set-up above
    FORMATS,
    IMG_EXTS,
    MAX_SIDE,
    MIN_SIDE,
    StrictError,
    cache_size,
    convert,
    format_summary,
    load_rgb,
    main,
)

__all__ = ["FORMATS", "IMG_EXTS", "MAX_SIDE", "MIN_SIDE", "StrictError", "cache_size", "convert",
           "format_summary", "load_rgb", "main"]  # fmt: skip

if __name__ == "__main__":
    sys.exit(main())

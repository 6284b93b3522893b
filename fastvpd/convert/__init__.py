"""Convert an image folder into the fast formats the loaders read: FFCV .beton, WebDataset tar shards
with DALI index files, and a decoded uint8 pixel cache (layout: ARCHITECTURE.md).

Every source is hashed, then decoded and checked once in a process pool; unreadable, truncated, bomb,
too small or otherwise bad files are skipped with a reason (never a crash) and listed in manifest.json.
Outputs are written under temporary names and renamed when complete; the manifest is written last, so a
reader never accepts a partial conversion. Re-running with the same options and unchanged sources skips
formats that are up to date; --force rebuilds.

    python -m fastvpd.convert SRC OUT [--formats ffcv,dali,cache] [--workers N] [--unlabelled] ...
    (in a checkout: python data_tools/convert.py, the same command)

Modules: scan (splits, classes, files, hashes), decode (reading and checking images), wds / cache / ffcv
(one writer per format), manifest (manifest.json), run (the phases of `convert`), cli (`main`).
"""

from fastvpd.convert.cli import main
from fastvpd.convert.decode import MAX_ASPECT, MAX_SIDE, MIN_SIDE, cache_size, load_rgb
from fastvpd.convert.run import FORMATS, WRITE_MODES, StrictError, convert, format_summary
from fastvpd.convert.scan import IMG_EXTS, SPLIT_NAMES, UNLABELLED

__all__ = [
    "FORMATS",
    "IMG_EXTS",
    "MAX_ASPECT",
    "MAX_SIDE",
    "MIN_SIDE",
    "SPLIT_NAMES",
    "UNLABELLED",
    "WRITE_MODES",
    "StrictError",
    "cache_size",
    "convert",
    "format_summary",
    "load_rgb",
    "main",
]

"""The converter's command line: `python -m fastvpd.convert` (or `python data_tools/convert.py` in a
checkout)."""

from __future__ import annotations

import argparse
import sys

from fastvpd.config import main_guard
from fastvpd.convert.decode import MAX_ASPECT, MIN_SIDE
from fastvpd.convert.run import WRITE_MODES, StrictError, convert

DESCRIPTION = """Convert an image folder into the fast formats the loaders read (FFCV .beton, WebDataset
tar shards + DALI index, uint8 pixel cache) and write OUT/manifest.json last.

SRC layouts:
  SRC/{train,val,test}/<class>/<images>   labelled splits (any depth below each class folder)
  SRC/<class>/<images>                    one labelled split, "train"
  SRC/<images> or SRC/train/<images>      a flat folder of images: an unlabelled split (label -1),
                                          detected automatically
  nested folders without classes          pass --unlabelled: every image below the train split (SRC/train,
                                          or SRC) is read without labels
Pretraining runs on an unlabelled train split; its kNN monitor needs a labelled val split.

Files are skipped with a reason (listed in the summary and manifest.json): unreadable, truncated,
not an image, decompression bombs, smallest side under MIN_SIDE px, aspect ratio over MAX_ASPECT:1. A
class whose files are all skipped is an error unless --allow-empty-classes.""".replace(
    "MIN_SIDE", str(MIN_SIDE)
).replace("MAX_ASPECT", str(MAX_ASPECT))


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each option; the description's layout kept."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastvpd.convert",
        description=DESCRIPTION,
        formatter_class=_Formatter,
    )
    p.add_argument("src", help="image folder: split folders train/ val/ [test/], class folders, or images")
    p.add_argument("out", help="output folder (gets manifest.json and one folder per split)")
    p.add_argument("--formats", default="ffcv,dali,cache", help="comma-separated subset of ffcv,dali,cache")
    p.add_argument("--workers", type=int, default=0, help="worker processes (0 = all cores)")
    p.add_argument("--max-res", type=int, default=256, help="FFCV: longest side stored (0 = native size)")
    p.add_argument("--write-mode", default="jpg", choices=WRITE_MODES, help="FFCV image storage")
    p.add_argument(
        "--jpeg-quality", type=int, default=90, help="JPEG quality for FFCV and for re-encoded tar members"
    )
    p.add_argument("--cache-res", type=int, default=256, help="cache: short side (0 = native; no upscale)")
    p.add_argument("--shard-size", type=int, default=1000, help="images per WebDataset tar shard")
    p.add_argument(
        "--unlabelled",
        action="store_true",
        help="read the train split (SRC/train, or SRC without split folders) without labels, whatever its "
        "folders: every image below it, at any depth",
    )
    p.add_argument(
        "--allow-empty-classes",
        action="store_true",
        help="keep a class whose files are all unreadable (with no images) instead of stopping",
    )
    p.add_argument(
        "--strict", action="store_true", help="exit 1 naming every skipped source file (nothing written)"
    )
    p.add_argument("--force", action="store_true", help="rebuild formats even when they are up to date")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or summary table")
    return p


@main_guard
def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    try:
        convert(
            a.src,
            a.out,
            formats=[f.strip() for f in a.formats.split(",") if f.strip()],
            workers=a.workers or None,
            max_res=a.max_res,
            write_mode=a.write_mode,
            jpeg_quality=a.jpeg_quality,
            cache_res=a.cache_res,
            shard_size=a.shard_size,
            strict=a.strict,
            force=a.force,
            progress=not a.no_progress,
            unlabelled=("train",) if a.unlabelled else (),
            allow_empty_classes=a.allow_empty_classes,
        )
    except StrictError as e:  # every skipped file on its own line, then the one-line summary
        for d in e.skipped:
            print(f"skipped: {d['path']}: {d['reason']}", file=sys.stderr)
        print(
            f"error: --strict: {len(e.skipped)} source file(s) skipped (listed above); nothing written",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

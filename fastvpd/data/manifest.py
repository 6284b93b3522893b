"""Reader for OUT/manifest.json, the record the converter (`python -m fastvpd.convert`) writes last.

Loaders check the converted files against it before training (sizes + hashes of the first MiB, or
whole-file hashes), so a stale, truncated or half-written output is a one-line UserError naming the fix
instead of a crash or silently wrong data hours later.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from fastvpd.config import UserError

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
HEAD_BYTES = 1 << 20  # fast verification hashes this many leading bytes of each output file
FORMATS = ("ffcv", "dali", "cache", "files")  # "files" = <split>/files.txt, always written
VERIFY_MODES = ("fast", "full", "off")


def sha1_file(path: str | Path, limit: int | None = None) -> str:
    """Hex sha1 of a file's bytes (only its first `limit` bytes when given)."""
    h = hashlib.sha1()
    left = limit
    with open(path, "rb") as f:
        while left is None or left > 0:
            chunk = f.read(1 << 20 if left is None else min(1 << 20, left))
            if not chunk:
                break
            h.update(chunk)
            if left is not None:
                left -= len(chunk)
    return h.hexdigest()


def file_record(path: str | Path, root: str | Path) -> dict[str, Any]:
    """Manifest entry of one output file: {file (relative to root), bytes, head_sha1, sha1}."""
    path = Path(path)
    return {
        "file": path.relative_to(root).as_posix(),
        "bytes": path.stat().st_size,
        "head_sha1": sha1_file(path, HEAD_BYTES),
        "sha1": sha1_file(path),
    }


def check_file(root: Path, rec: dict[str, Any], mode: str) -> str | None:
    """Why the file described by `rec` does not match (None when it does)."""
    path = root / rec["file"]
    if mode == "off":
        return None
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    if size != rec["bytes"]:
        return f"{path} has {size} bytes, the manifest says {rec['bytes']} (partial or stale)"
    if sha1_file(path, HEAD_BYTES) != rec["head_sha1"]:
        return f"{path} differs from the manifest (header hash mismatch)"
    if mode == "full" and sha1_file(path) != rec["sha1"]:
        return f"{path} differs from the manifest (content hash mismatch)"
    return None


class Manifest:
    """Parsed manifest.json of a converted dataset folder."""

    def __init__(self, root: str | Path, data: dict[str, Any]) -> None:
        self.root = Path(root)
        self.data = data

    @classmethod
    def load(cls, root: str | Path) -> Manifest:
        """Read ROOT/manifest.json; UserError (naming the fix) when it is missing or invalid."""
        root = Path(root)
        path = root / MANIFEST_NAME
        fix = f"run `python -m fastvpd.convert SRC {root}` first"
        if not path.is_file():
            raise UserError(f"no {MANIFEST_NAME} in {root}: {fix}")
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{path} is unreadable ({e}): {fix} (with --force)") from None
        if not isinstance(data, dict) or not {"version", "classes", "splits"} <= data.keys():
            raise UserError(f"{path} is not a fastvpd manifest: {fix} (with --force)")
        if data["version"] != MANIFEST_VERSION:
            raise UserError(
                f"{path} has version {data['version']}, this code reads version {MANIFEST_VERSION}: "
                f"{fix} (with --force)"
            )
        return cls(root, data)

    # ----------------------------------------------------------------------------------------------------
    @property
    def classes(self) -> list[str]:
        return list(self.data["classes"])

    @property
    def num_classes(self) -> int:
        return len(self.data["classes"])

    @property
    def splits(self) -> list[str]:
        return list(self.data["splits"])

    @property
    def src(self) -> Path | None:
        """Absolute path of the ImageFolder root that was converted (for the torchvision backend)."""
        s = self.data.get("src")
        return Path(s) if s else None

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.data.get("options", {}))

    @property
    def skipped(self) -> list[dict[str, str]]:
        return list(self.data.get("skipped", []))

    def _split(self, split: str) -> dict[str, Any]:
        if split not in self.data["splits"]:
            raise UserError(
                f"split {split!r} is not in {self.root / MANIFEST_NAME} (has: {', '.join(self.splits)}): "
                "pick one of those or convert a source tree that has it"
            )
        return self.data["splits"][split]

    def count(self, split: str) -> int:
        return int(self._split(split)["count"])

    def sources(self, split: str) -> list[dict[str, Any]]:
        """[{path (relative to src), label, bytes, sha1}] in sample order."""
        return list(self._split(split)["sources"])

    def labels(self, split: str) -> list[int]:
        return [int(s["label"]) for s in self._split(split)["sources"]]

    def labelled(self, split: str) -> bool:
        """False for a split converted from images without class folders (every label is -1)."""
        return bool(self._split(split).get("labelled", True))

    def formats(self, split: str) -> list[str]:
        """Formats with outputs recorded for this split."""
        return sorted(self._split(split).get("outputs", {}))

    def files(self, split: str, fmt: str) -> list[Path]:
        """Absolute paths of every output file of a format (tar and idx shards for dali)."""
        return [self.root / r["file"] for r in self._outputs(split, fmt)]

    def _outputs(self, split: str, fmt: str) -> list[dict[str, Any]]:
        if fmt not in FORMATS:
            raise UserError(f"unknown data format {fmt!r}: one of {', '.join(FORMATS)}")
        outs = self._split(split).get("outputs", {})
        if fmt not in outs:
            raise UserError(
                f"{self.root} has no {fmt} output for split {split!r}: run "
                f"`python -m fastvpd.convert SRC {self.root} --formats {fmt}`"
            )
        return outs[fmt]

    def path(self, split: str, fmt: str) -> Path:
        """Main path of a format: the .beton (ffcv), the wds/ folder (dali), the cache/ folder (cache),
        files.txt (files). Raises UserError when that format was not converted."""
        self._outputs(split, fmt)
        base = self.root / split
        return {
            "ffcv": base / f"{split}.beton",
            "dali": base / "wds",
            "cache": base / "cache",
            "files": base / "files.txt",
        }[fmt]

    def wds_shards(self, split: str) -> tuple[list[Path], list[Path]]:
        """(tar paths, DALI index paths), paired and in sample order."""
        files = self.files(split, "dali")
        tars = sorted(p for p in files if p.suffix == ".tar")
        return tars, [p.with_suffix(".idx") for p in tars]

    def verify(self, split: str, formats: str | list[str] | tuple[str, ...], mode: str = "fast") -> None:
        """Check the recorded outputs of `formats` for `split` against the files on disk.

        fast: sizes + sha1 of the first MiB; full: whole-file sha1; off: nothing. Raises UserError naming
        the first stale/partial file and the fix.
        """
        if mode not in VERIFY_MODES:
            raise UserError(f"verify mode must be one of {', '.join(VERIFY_MODES)} (got {mode!r})")
        if isinstance(formats, str):
            formats = [formats]
        for fmt in formats:
            recs = self._outputs(split, fmt)
            for rec in recs:
                why = check_file(self.root, rec, mode)
                if why:
                    raise UserError(
                        f"{why}: re-run `python -m fastvpd.convert SRC {self.root} --formats {fmt} --force`"
                    )

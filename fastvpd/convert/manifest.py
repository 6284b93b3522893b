"""Writing manifest.json (read by fastvpd.data.manifest): what the previous manifest still vouches for,
and a record that stays in step with the disk while formats are rebuilt."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastvpd.convert import files
from fastvpd.convert.scan import Split
from fastvpd.data.manifest import MANIFEST_NAME, MANIFEST_VERSION, check_file

FORMATS = ("ffcv", "dali", "cache")


def format_options(fmt: str, o: dict[str, Any]) -> dict[str, Any]:
    """The options a format's bytes depend on (what makes an existing output stale)."""
    if fmt == "ffcv":
        return {"max_res": o["max_res"], "write_mode": o["write_mode"], "jpeg_quality": o["jpeg_quality"]}
    if fmt == "dali":
        return {"shard_size": o["shard_size"], "jpeg_quality": o["jpeg_quality"]}
    return {"cache_res": o["cache_res"]}


def fresh(old: dict[str, Any] | None, fmt: str, digest: str, o: dict[str, Any], out: Path) -> bool:
    """Is `fmt` in the old manifest, built from the same sources with the same options, and intact?"""
    if not old or old.get("source_digest") != digest:
        return False
    if old.get("format_options", {}).get(fmt) != format_options(fmt, o):
        return False
    for sp in old["splits"].values():
        recs = sp.get("outputs", {}).get(fmt)
        if not recs or any(check_file(out, r, "fast") for r in recs):
            return False
    return True


class ManifestWriter:
    """The new manifest. It starts from what the old one vouches for (same sources) and stays in step with
    the disk: a format leaves it only when its first finished file is renamed over an old one (`commit`)."""

    def __init__(self, out: Path, src: Path, classes: list[str], digest: str, o: dict[str, Any],
                 formats: list[str], splits: list[Split], skipped: list[dict[str, str]],
                 old: dict[str, Any] | None) -> None:  # fmt: skip
        self.out = out
        self.keep_old = old is not None and old.get("source_digest") == digest
        self.data: dict[str, Any] = {
            "version": MANIFEST_VERSION,
            "src": str(src),
            "classes": classes,
            "source_digest": digest,
            "options": {k: v for k, v in o.items() if k not in ("workers", "progress", "commit")}
            | {"formats": formats},
            "format_options": {},
            "splits": {},
            "skipped": skipped,
        }
        for sp in splits:
            self.data["splits"][sp.name] = {
                "count": len(sp.good),
                "labelled": sp.labelled,
                "sources": [
                    {"path": s.rel, "label": s.label, "bytes": s.bytes, "sha1": s.sha1} for s in sp.good
                ],
                "outputs": {},
            }
        if self.keep_old:
            assert old is not None
            for fmt, fo in old.get("format_options", {}).items():
                if fmt in FORMATS:
                    self.data["format_options"][fmt] = fo
            for name, old_sp in old["splits"].items():
                for fmt, recs in old_sp.get("outputs", {}).items():
                    if fmt in FORMATS or fmt == "files":
                        self.data["splits"][name]["outputs"][fmt] = recs
        self.data["options"]["formats"] = sorted(self.data["format_options"])
        self.on_disk, self.rewritten = old, False
        self.committed: set[str] = set()

    def bytes_of(self, fmt: str) -> int:
        return sum(r["bytes"] for spm in self.data["splits"].values() for r in spm["outputs"][fmt])

    def record(self, split: str, fmt: str, recs: list[dict[str, Any]]) -> None:
        self.data["splits"][split]["outputs"][fmt] = recs

    def finish_format(self, fmt: str, o: dict[str, Any]) -> None:
        self.data["format_options"][fmt] = format_options(fmt, o)
        self.write()

    def write(self) -> None:
        self.data["options"]["formats"] = sorted(self.data["format_options"])
        files.write_json(self.out / MANIFEST_NAME, self.data)
        self.on_disk, self.rewritten = json.loads(json.dumps(self.data)), True

    def commit(self, fmt: str) -> None:
        """Called right before the first finished file of `fmt` replaces an old one: from then on the
        manifest on disk must not vouch for `fmt` (nor, when the sources changed, for anything old)."""
        if fmt in self.committed:
            return
        self.committed.add(fmt)
        self.data["format_options"].pop(fmt, None)
        for spm in self.data["splits"].values():
            spm["outputs"].pop(fmt, None)
        disk = self.on_disk
        if disk is None:
            return
        stale_sources = not self.keep_old and not self.rewritten
        if stale_sources or any(fmt in spm.get("outputs", {}) for spm in disk["splits"].values()):
            self.write()

    def failure(self, e: OSError) -> str:
        """The one-line message for a write that failed (full disk, read-only folder)."""
        lost = sorted(f for f in self.committed if f not in self.data["format_options"] and f != "files")
        kept = (
            f"{', '.join(lost)} must be rebuilt, the rest of {self.out} is intact"
            if lost
            else f"the previous outputs in {self.out} are intact"
        )
        return (
            f"could not write {e.filename or self.out} ({e.strerror or e}): free disk space or make "
            f"{self.out} writable, then re-run; {kept} (manifest.json vouches only for complete files)"
        )

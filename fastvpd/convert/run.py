"""`convert()`: the phases of one conversion, in order.

options -> scan (find splits, classes, files) -> hash (identify the sources; up-to-date check) ->
decode/check (every file once, in a pool) -> keep (refuse empty classes, --strict) -> write each format
(temp files renamed when complete) -> manifest (written last) -> tidy (stale split folders) -> summary.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from fastvpd.config import UserError
from fastvpd.convert import cache, files, wds
from fastvpd.convert import ffcv as ffcv_writer
from fastvpd.convert.decode import MIN_SIDE, check_job, ffcv_size, imap
from fastvpd.convert.manifest import ManifestWriter, fresh
from fastvpd.convert.scan import IMG_EXTS, Split, discover, hash_job
from fastvpd.data.manifest import Manifest, file_record
from fastvpd.extras import require_ffcv

FORMATS = ("ffcv", "dali", "cache")
WRITE_MODES = ("jpg", "proportion", "raw")
WRITERS: dict[str, Callable[[Path, Split, dict[str, Any]], list[Path]]] = {
    "ffcv": ffcv_writer.write_ffcv,
    "dali": wds.write_dali,
    "cache": cache.write_cache,
}


class StrictError(UserError):
    """--strict and some source files were skipped; `skipped` lists every one ({path, reason})."""

    def __init__(self, msg: str, skipped: list[dict[str, str]]) -> None:
        super().__init__(msg)
        self.skipped = skipped


def _options(formats: list[str], **o: Any) -> dict[str, Any]:
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise UserError(f"unknown format(s) {bad or formats}: choose from {','.join(FORMATS)}")
    if o["write_mode"] not in WRITE_MODES:
        raise UserError(f"--write-mode must be one of {', '.join(WRITE_MODES)} (got {o['write_mode']!r})")
    if not 1 <= o["jpeg_quality"] <= 100:
        raise UserError(f"--jpeg-quality must be in 1..100 (got {o['jpeg_quality']})")
    if o["shard_size"] < 1 or o["max_res"] < 0 or o["cache_res"] < 0:
        raise UserError("--shard-size must be >= 1 and --max-res/--cache-res >= 0")
    if "ffcv" in formats:
        require_ffcv("--formats ffcv", ("ffcv.writer",), "drop ffcv from --formats")
    for k in ("max_res", "jpeg_quality", "cache_res", "shard_size"):
        o[k] = int(o[k])
    o["workers"] = int(o["workers"]) if o["workers"] else (os.cpu_count() or 1)
    return o


def _hash(splits: list[Split], classes: list[str], o: dict[str, Any]) -> tuple[dict[str, str], str]:
    """Hash every candidate: {rel: reason} for the unreadable ones and the digest of all sources."""
    all_c = [s for sp in splits for s in sp.candidates]
    bad: dict[str, str] = {}
    for s, r in zip(all_c, imap(hash_job, [s.abspath for s in all_c], o["workers"], "hash", o["progress"])):
        if isinstance(r, str):
            bad[s.rel] = r
        else:
            s.bytes, s.sha1 = r
    for s in all_c:
        if bad.get(s.rel) is None and Path(s.rel).suffix.lower() not in IMG_EXTS:
            bad[s.rel] = f"unsupported extension {Path(s.rel).suffix or '(none)'}"
    lines = "".join(
        f"{sp.name}\t{s.rel}\t{s.label}\t{s.bytes}\t{s.sha1 or bad.get(s.rel)}\n"
        for sp in splits
        for s in sp.candidates
    )
    return bad, hashlib.sha1((json.dumps(classes) + lines).encode()).hexdigest()


def _decode(splits: list[Split], bad: dict[str, str], o: dict[str, Any]) -> list[dict[str, str]]:
    """Decode and check every hashed file once; fill each split's `good`; return the skipped list."""
    all_c = [s for sp in splits for s in sp.candidates]
    todo = [s for s in all_c if s.rel not in bad]
    for s, r in zip(todo, imap(check_job, [s.abspath for s in todo], o["workers"], "decode", o["progress"])):
        if r["ok"]:
            s.height, s.width, s.copy = r["height"], r["width"], r["copy"]
        else:
            bad[s.rel] = r["reason"]
    for sp in splits:
        sp.good = [s for s in sp.candidates if s.rel not in bad]
    return [{"path": s.rel, "reason": bad[s.rel]} for s in all_c if s.rel in bad]


def _check_kept(
    splits: list[Split],
    classes: list[str],
    skipped: list[dict[str, str]],
    src: Path,
    strict: bool,
    allow_empty_classes: bool,
) -> None:
    """Refuse a conversion that would silently lose something: --strict, classes or splits left empty."""
    if strict and skipped:
        listing = "; ".join(f"{d['path']}: {d['reason']}" for d in skipped[:20])
        more = f" (+{len(skipped) - 20} more)" if len(skipped) > 20 else ""
        raise StrictError(f"--strict: {len(skipped)} source file(s) skipped: {listing}{more}", skipped)
    reason = {d["path"]: d["reason"] for d in skipped}
    for sp in splits:
        kept = {s.label for s in sp.good}
        for label, folder in sp.class_dirs.items():
            if label in kept:
                continue
            lost = [s.rel for s in sp.candidates if s.label == label]
            what = f"class {classes[label]!r} ({folder}) has no readable images: its {len(lost)} file(s) "
            what += "were skipped"
            if not allow_empty_classes:
                raise UserError(
                    f"{what} (first: {lost[0]}: {reason.get(lost[0], '?')}); fix or remove them, or pass "
                    "--allow-empty-classes to keep the class with no images"
                )
            print(f"[convert] warning: {what}; kept with no images (--allow-empty-classes)")
        if not sp.good:
            raise UserError(f"split {sp.name!r} has no readable images in {src}")


def _check_ffcv_sizes(splits: list[Split], max_res: int) -> None:
    """FFCV scales the longest side down to --max-res: no kept image may end up under MIN_SIDE."""
    if not max_res:
        return
    small = [s for sp in splits for s in sp.good if min(ffcv_size(s.height, s.width, max_res)) < MIN_SIDE]
    if small:
        need = max(math.ceil((MIN_SIDE + 1) * max(s.height, s.width) / min(s.height, s.width)) for s in small)
        s = small[0]
        raise UserError(
            f"{len(small)} image(s) would be stored by FFCV with a side under {MIN_SIDE} px at --max-res "
            f"{max_res} (first: {s.rel}, {s.width}x{s.height}): use --max-res {need} or more, or 0 "
            "(native size)"
        )


def _write(out: Path, splits: list[Split], formats: list[str], fresh_: dict[str, bool], mw: ManifestWriter,
           o: dict[str, Any]) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Every requested format that is not up to date, then files.txt; the manifest after each format."""
    stats: dict[str, dict[str, Any]] = {}
    n_total = sum(len(sp.good) for sp in splits)
    for sp in splits:
        (out / sp.name).mkdir(parents=True, exist_ok=True)
        files.cleanup_tmp(out / sp.name)
    for fmt in formats:
        if fresh_[fmt]:
            stats[fmt] = {"status": "up to date", "images": n_total, "bytes": mw.bytes_of(fmt)}
            stats[fmt]["seconds"] = 0.0
            continue
        t0 = time.perf_counter()
        nbytes = 0
        for sp in splits:
            recs = [file_record(p, out) for p in WRITERS[fmt](out / sp.name, sp, o)]
            mw.record(sp.name, fmt, recs)
            nbytes += sum(r["bytes"] for r in recs)
        mw.finish_format(fmt, o)  # vouches for the formats finished so far
        stats[fmt] = {"status": "built", "images": n_total, "bytes": nbytes}
        stats[fmt]["seconds"] = time.perf_counter() - t0
    for sp in splits:
        mw.commit("files")
        path = out / sp.name / "files.txt"
        files.write_atomic(path, "".join(f"{s.rel} {s.label}\n" for s in sp.good).encode())
        mw.record(sp.name, "files", [file_record(path, out)])
    mw.write()  # last: vouches for everything above
    return stats


def _tidy(out: Path, src: Path, old: dict[str, Any] | None, names: list[str]) -> list[str]:
    """Folders in OUT that are not splits of this conversion: a split of the previous conversion that
    holds only the converter's own files is removed; anything else is named and left alone."""
    notes = []
    for d in sorted(p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if d.name in names:
            continue
        outputs = (old or {}).get("splits", {}).get(d.name, {}).get("outputs", {})
        ours = {out / r["file"] for recs in outputs.values() for r in recs}
        present = [p for p in d.rglob("*") if not p.is_dir()]
        if ours and all(p in ours or p.name.endswith(files.TMP) for p in present):
            shutil.rmtree(d)
            notes.append(f"removed {d}: split {d.name!r} of the previous conversion is not in {src} any more")
        else:
            notes.append(f"{d} is not a split of this conversion (not in manifest.json): left alone")
    return notes


def convert(
    src: str | Path,
    out: str | Path,
    formats: Iterable[str] = FORMATS,
    workers: int | None = None,
    max_res: int = 256,
    write_mode: str = "jpg",
    jpeg_quality: int = 90,
    cache_res: int = 256,
    shard_size: int = 1000,
    strict: bool = False,
    force: bool = False,
    progress: bool = True,
    unlabelled: Iterable[str] = (),
    allow_empty_classes: bool = False,
) -> dict[str, Any]:
    """Convert the image tree `src` into `out`; return a summary dict (see `format_summary`).

    `unlabelled` names splits read without labels whatever their folders (a flat folder of images is
    unlabelled anyway). Raises UserError for user mistakes (missing SRC, empty class folders, a class
    whose files are all unreadable, unwritable OUT, bad options, and skipped files when strict=True).
    """
    t_start = time.perf_counter()
    formats = list(dict.fromkeys(formats))
    o = _options(formats, max_res=max_res, write_mode=write_mode, jpeg_quality=jpeg_quality,
                 cache_res=cache_res, shard_size=shard_size, workers=workers, progress=progress)  # fmt: skip
    src, out = Path(src).resolve(), Path(out).resolve()
    classes, splits = discover(src, frozenset(unlabelled))
    files.check_out(out)

    t0 = time.perf_counter()
    bad, digest = _hash(splits, classes, o)
    try:
        old = Manifest.load(out).data
    except UserError:
        old = None
    fresh_ = {f: (not force) and fresh(old, f, digest, o, out) for f in formats}
    t_hash = time.perf_counter() - t0

    t0 = time.perf_counter()
    if all(fresh_.values()) and old is not None:  # nothing to write: the old manifest knows the outcome
        skipped = list(old.get("skipped", []))
        for sp in splits:
            kept = {r["path"] for r in old["splits"][sp.name]["sources"]}
            sp.good = [s for s in sp.candidates if s.rel in kept]
    else:
        skipped = _decode(splits, bad, o)
    t_scan = time.perf_counter() - t0
    _check_kept(splits, classes, skipped, src, strict, allow_empty_classes)
    if "ffcv" in formats and not fresh_["ffcv"]:
        _check_ffcv_sizes(splits, o["max_res"])

    mw = ManifestWriter(out, src, classes, digest, o, formats, splits, skipped, old)
    o["commit"] = mw.commit
    try:
        stats = _write(out, splits, formats, fresh_, mw, o)
    except OSError as e:
        raise UserError(mw.failure(e)) from None
    finally:
        o.pop("commit", None)
        for sp in splits:
            files.cleanup_tmp(out / sp.name)
    notes = _tidy(out, src, old, [sp.name for sp in splits])
    for n in notes:
        print(f"[convert] {n}")

    summary = {
        "out": str(out),
        "classes": len(classes),
        "splits": {sp.name: len(sp.good) for sp in splits},
        "unlabelled": [sp.name for sp in splits if not sp.labelled],
        "skipped": skipped,
        "formats": stats,
        "notes": notes,
        "hash_seconds": t_hash,
        "decode_seconds": t_scan,
        "seconds": time.perf_counter() - t_start,
    }
    if progress:
        print(format_summary(summary))
    return summary


def format_summary(s: dict[str, Any]) -> str:
    """Human-readable end-of-run table."""
    unl = set(s.get("unlabelled", []))
    lines = [
        f"converted into {s['out']}: {s['classes']} classes, "
        + ", ".join(f"{k} {v}" + (" (unlabelled)" if k in unl else "") for k, v in s["splits"].items())
        + f" (hash {s['hash_seconds']:.1f} s, decode/validate {s['decode_seconds']:.1f} s)",
        f"{'format':<8}{'status':>12}{'images':>9}{'MB':>10}{'seconds':>9}{'images/s':>10}",
    ]
    for fmt, st in s["formats"].items():
        rate = f"{st['images'] / st['seconds']:.0f}" if st["seconds"] > 0 else "-"
        lines.append(
            f"{fmt:<8}{st['status']:>12}{st['images']:>9}{st['bytes'] / 1e6:>10.1f}"
            f"{st['seconds']:>9.2f}{rate:>10}"
        )
    if s["skipped"]:
        lines.append(f"skipped {len(s['skipped'])} file(s):")
        lines.extend(f"  {d['path']}: {d['reason']}" for d in s["skipped"])
    return "\n".join(lines)

"""The images the loader and end-to-end sections read: DIR/src converted into DIR/converted.

DIR/src is a synthetic ImageNet-like set the benchmark makes (fastvpd.datasets.synthetic) unless the
folder is already there. The benchmark deletes only what it made: it writes CREATED_MARKER into DIR/src
before the first image and marks it complete after the last, so an unfinished set of its own is made
again, and a folder without its marker (the user's own images) is read as it is and never removed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from benchmarks.harness import Options, log, require

CREATED_MARKER = ".fastvpd-bench-created"  # JSON: {"images": N, "complete": bool}
SYNTH_CLASSES = 10


def created_by_benchmark(src: Path) -> dict[str, Any] | None:
    """The benchmark's own record of a folder it made, or None when it did not make it."""
    try:
        record = json.loads((src / CREATED_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _mark(src: Path, images: int, complete: bool) -> None:
    (src / CREATED_MARKER).write_text(json.dumps({"images": images, "complete": complete}) + "\n")


def make_source(src: Path, opts: Options) -> None:
    """DIR/src as the loaders read it: made when absent, made again when it is an unfinished set of the
    benchmark's own, left alone otherwise."""
    record = created_by_benchmark(src)
    if src.exists() and record is None:
        log(f"using the images in {src} as they are (not made by the benchmark)")
        return
    if record is not None and record.get("complete"):
        return
    synth = require("fastvpd.datasets.synthetic", "fastvpd.datasets.synthetic")
    if record is not None:  # an interrupted set of its own
        log(f"{src}: an unfinished synthetic set of the benchmark's own; making it again")
        shutil.rmtree(src)
    log(f"making {opts.images} synthetic ImageNet-like JPEGs ({SYNTH_CLASSES} classes) in {src}")
    src.mkdir(parents=True)
    _mark(src, opts.images, complete=False)  # before the first image: a crash leaves it marked as ours
    synth.make_synthetic(
        src,
        SYNTH_CLASSES,
        max(1, opts.images // SYNTH_CLASSES),
        seed=0,
        splits=("train",),
        workers=opts.loader_workers,
        progress=False,
    )
    _mark(src, opts.images, complete=True)


def prepare_data(opts: Options, formats: list[str]) -> Path:
    """DIR/src converted into `formats` (those whose package is present; files only when none) in
    DIR/converted, cached on disk: conversion skips formats that are up to date. Returns the converted
    root (holding manifest.json)."""
    conv = require("fastvpd.convert", "fastvpd.convert")
    base = Path(opts.data_dir)
    src, out = base / "src", base / "converted"
    make_source(src, opts)
    log(f"converting ({', '.join(formats) or 'files only'}) into {out}")
    conv.convert(src, out, formats=formats or ["cache"], workers=opts.loader_workers, progress=False)
    return out


def describe_data(root: Path, split: str = "train") -> str:
    """What the rows ran on, in words: the benchmark's synthetic set or someone's own images, and how many
    (the converted split's count, not the count asked for)."""
    from fastvpd.data.manifest import Manifest

    manifest = Manifest.load(root)
    n = manifest.count(split)
    src = manifest.src
    if src is not None and created_by_benchmark(Path(src)) is not None:
        return f"{n} synthetic ImageNet-like JPEGs ({split} split of {src})"
    return f"{n} images of the {split} split of {src or root} (not made by the benchmark)"

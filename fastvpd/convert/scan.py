"""Finding the source images: split folders, class folders or unlabelled folders, and each file's hash.

A split folder (SRC/train, SRC/val, SRC/test, or SRC itself when it has none of those) is read as:
- labelled: it holds class folders and no loose images; each class folder's files, at any depth, carry
  its label (classes sorted by name, taken from the first labelled split);
- unlabelled: it holds images directly and no sub-folders (a flat folder), or it is the train split and
  `--unlabelled` was given (any nesting: every image below it); its samples carry label -1.
A folder holding both loose images and sub-folders is ambiguous and refused, naming both ways out.
"""

from __future__ import annotations

import errno
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from fastvpd.config import UserError

SPLIT_NAMES = ("train", "val", "test")
IMG_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
UNLABELLED = -1  # the label of every sample of an unlabelled split


@dataclass
class Source:
    rel: str  # path relative to SRC (posix)
    abspath: str
    label: int
    bytes: int = 0
    sha1: str = ""
    height: int = 0
    width: int = 0
    copy: bool = False


@dataclass
class Split:
    name: str
    labelled: bool = True
    candidates: list[Source] = field(default_factory=list)
    good: list[Source] = field(default_factory=list)
    class_dirs: dict[int, str] = field(default_factory=dict)  # label -> class folder (labelled splits)


def walk_files(folder: Path) -> list[Path]:
    """Every non-hidden file below `folder` (following directory links, each real directory once)."""
    seen: set[str] = set()
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        keep = []
        for d in sorted(d for d in dirnames if not d.startswith(".")):
            full = os.path.join(dirpath, d)
            target = os.path.realpath(full)
            if os.path.islink(full) and (target == real or real.startswith(target + os.sep)):
                out.append(Path(full))  # a link to this folder or an ancestor: reported, never walked
            else:
                keep.append(d)
        dirnames[:] = keep
        out.extend(Path(dirpath) / f for f in filenames if not f.startswith("."))
    return out


def _loose_images(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if not p.name.startswith(".") and p.suffix.lower() in IMG_EXTS and not p.is_dir()
    )


def _sorted_sources(src: Path, files: list[Path], label: int) -> list[Source]:
    items = sorted((f.relative_to(src).as_posix(), f) for f in files)
    return [Source(rel, str(f), label) for rel, f in items]


def discover(src: Path, unlabelled: frozenset[str] = frozenset()) -> tuple[list[str], list[Split]]:
    """Class names (sorted, from the first labelled split) and each split's candidate files in sample
    order. `unlabelled` names the splits read as unlabelled whatever their folder structure."""
    if not src.exists():
        raise UserError(f"source folder {src} does not exist")
    if not src.is_dir():
        raise UserError(f"source {src} is not a folder (expected an ImageFolder root or a folder of images)")
    subdirs = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    split_dirs = [src / s for s in SPLIT_NAMES if (src / s).is_dir()]
    if not split_dirs:  # class folders (or images) directly under SRC: one split, "train"
        split_dirs = [src]
    names = [sd.name if sd != src else "train" for sd in split_dirs]
    unknown = sorted(set(unlabelled) - set(names))
    if unknown:
        raise UserError(
            f"--unlabelled applies to split(s) {unknown}, which {src} lacks (it has: {', '.join(names)})"
        )
    classes: list[str] | None = None
    first_labelled: Path | None = None
    splits: list[Split] = []
    for sd, name in zip(split_dirs, names):
        cdirs = sorted(
            (p for p in sd.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name
        )
        loose = _loose_images(sd)
        if name in unlabelled or (loose and not cdirs):
            files = walk_files(sd)
            sp = Split(name, labelled=False, candidates=_sorted_sources(src, files, UNLABELLED))
            if not any(Path(s.rel).suffix.lower() in IMG_EXTS for s in sp.candidates):
                raise UserError(f"no image files in {sd} (read as an unlabelled split)")
            splits.append(sp)
            continue
        if loose:
            raise UserError(
                f"{sd} holds both image files ({loose[0].name}, ...) and folders ({cdirs[0].name}, ...): "
                + (
                    "pass --unlabelled to read every image below it without labels, or move the loose images "
                    "into class folders"
                    if name == "train"
                    else "move the loose images into class folders (or out of it)"
                )
            )
        if not cdirs:
            raise UserError(
                f"no class folders or images in {sd}: expected {sd}/<class>/<image files> "
                f"(labelled) or {sd}/<image files> (unlabelled)"
            )
        if classes is None:
            classes, first_labelled = [p.name for p in cdirs], sd
        else:
            extra = sorted({p.name for p in cdirs} - set(classes))
            if extra:
                raise UserError(
                    f"{sd} has class folders {extra[:5]} that {first_labelled} lacks: "
                    f"every labelled split must use the classes of {first_labelled.name}"  # type: ignore[union-attr]
                )
        label_of = {c: i for i, c in enumerate(classes)}
        sp = Split(name)
        for cd in cdirs:
            files = walk_files(cd)
            if not files:
                raise UserError(f"class folder {cd} is empty: remove it or add images")
            sp.candidates.extend(_sorted_sources(src, files, label_of[cd.name]))
            sp.class_dirs[label_of[cd.name]] = cd.relative_to(src).as_posix()
        splits.append(sp)
    if len(split_dirs) > 1 or split_dirs[0] != src:
        others = [p.name for p in subdirs if p.name not in SPLIT_NAMES]
        if others:
            print(f"[convert] ignoring folders that are not splits ({', '.join(SPLIT_NAMES)}): {others}")
    return classes or [], splits


def hash_job(path: str) -> tuple[int, str] | str:
    """(bytes, sha1) of a file, or the reason it cannot be read."""
    try:
        if os.path.isdir(path):
            return (
                "symlink loop (links to its own or a parent folder)" if os.path.islink(path) else "not a file"
            )
        if os.path.islink(path) and not os.path.exists(path):
            try:
                os.stat(path)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    return "symlink loop"
            return "broken symlink"
        h = hashlib.sha1()
        n = 0
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
                n += len(chunk)
        return n, h.hexdigest()
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symlink loop"
        if isinstance(e, PermissionError):
            return "unreadable: permission denied"
        if isinstance(e, IsADirectoryError):
            return "not a file"
        return f"unreadable: {e.strerror or e}"

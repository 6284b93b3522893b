"""Output files written safely: every byte goes to `<name>.tmp` first and is renamed into place when
complete, so a full disk, a read-only folder or a crash never leaves a partial file under a final name."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

from fastvpd.config import UserError

TMP = ".tmp"


def tmp(path: Path) -> Path:
    return path.with_name(path.name + TMP)


def replace(src: Path, final: Path) -> None:
    """Rename a finished temp file over its final name (one place, so tests can fail it)."""
    os.replace(src, final)


def cleanup_tmp(folder: Path) -> None:
    if folder.is_dir():
        for p in folder.rglob(f"*{TMP}"):
            if p.is_file():
                p.unlink()


def write_atomic(path: Path, data: bytes) -> None:
    """Write a small file under its temp name, fsync it, rename it into place."""
    t = tmp(path)
    try:
        with open(t, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        replace(t, path)
    except BaseException:
        t.unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=1).encode())


def reserve(f: Any, nbytes: int, path: Path) -> None:
    """Allocate `nbytes` for the open file `f` up front, so a disk too small fails here with ENOSPC
    instead of part-way through (file systems without fallocate are left to fail on write)."""
    if nbytes <= 0 or not hasattr(os, "posix_fallocate"):
        return
    try:
        os.posix_fallocate(f.fileno(), 0, nbytes)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise OSError(e.errno, os.strerror(e.errno), str(path)) from None
        # EOPNOTSUPP/EINVAL: no preallocation here; ordinary writes still report a full disk


def check_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test{TMP}"
        with open(probe, "wb") as f:
            f.write(b"\0")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to output folder {out}: {e.strerror or e}") from None


def commit(o: dict[str, Any], fmt: str) -> None:
    """Tell `convert` that `fmt`'s first finished file is about to replace an old one."""
    hook = o.get("commit")
    if hook is not None:
        hook(fmt)

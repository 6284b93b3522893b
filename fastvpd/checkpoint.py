"""Checkpoints that survive crashes, full disks and bit rot, and never execute code when loaded.

File layout (one file per checkpoint)::

    b"FVPDCKPT" | u32 little-endian header length | JSON header | payload

The header holds the format `version`, the payload's byte length and `sha256`, and a few fields for
choosing a checkpoint without reading the payload (`global_step`, `epoch`, `kind`). The payload is a
`torch.save` of plain containers and tensors, read back with `torch.load(weights_only=True)`: RNG states
and configs are therefore stored as tensors / dicts, never as pickled objects.

Writes are atomic: a temp file in the same directory, fsync, rename, fsync of the directory; on any
OSError (disk full, read-only) the temp file is removed, the previous checkpoint is untouched and a
UserError names the fix. Run layout: `<run>/checkpoints/step_XXXXXXXX.pt` (periodic, newest `keep` kept),
`last.pt` (always the newest, hard-linked when possible), `best.pt`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import sys
import time
from pathlib import Path
from typing import Any

import torch

from fastvpd.config import UserError

MAGIC = b"FVPDCKPT"
VERSION = 1
_HEAD = struct.Struct("<I")


class CheckpointError(UserError):
    """A checkpoint file that is truncated, tampered with, of another format or unreadable."""


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _serialize(state: dict[str, Any], meta: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    header = {
        **meta,
        "version": VERSION,
        "payload_bytes": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
        "time": time.time(),
    }
    hb = json.dumps(header, sort_keys=True).encode()
    return MAGIC + _HEAD.pack(len(hb)) + hb + payload


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save(path: str | Path, state: dict[str, Any], **meta: Any) -> Path:
    """Atomically write `state` (tensors + plain containers) to `path`; `meta` goes into the header.

    Raises UserError when the disk is full or read-only; whatever was at `path` before is intact.
    """
    path = Path(path)
    data = _serialize(state, meta)
    try:
        _atomic_write(path, data)
    except OSError as e:
        raise UserError(
            f"could not write checkpoint {path} ({e.strerror or e}): free disk space or set train.out_dir "
            "to a writable folder; the previous checkpoint is intact"
        ) from None
    return path


def read_header(path: str | Path) -> dict[str, Any]:
    """The JSON header only (cheap): raises CheckpointError when the file is not a fastvpd checkpoint."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(len(MAGIC) + _HEAD.size)
            if len(head) < len(MAGIC) + _HEAD.size or head[: len(MAGIC)] != MAGIC:
                raise CheckpointError(f"{path} is not a fastvpd checkpoint (bad magic or empty file)")
            (n,) = _HEAD.unpack(head[len(MAGIC) :])
            hb = f.read(n)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    try:
        header = json.loads(hb)
    except ValueError:
        raise CheckpointError(f"{path}: corrupt checkpoint header (truncated or tampered file)") from None
    if header.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {header.get('version')}, expected {VERSION}"
        )
    header["_offset"] = len(MAGIC) + _HEAD.size + n
    return header


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Verify length and sha256, then `torch.load(weights_only=True)` the payload (nothing executed).

    Raises CheckpointError (a UserError) naming the problem for truncated/tampered/foreign files.
    """
    path = Path(path)
    header = read_header(path)
    with open(path, "rb") as f:
        f.seek(header["_offset"])
        payload = f.read()
    if len(payload) != header["payload_bytes"]:
        raise CheckpointError(
            f"{path} is truncated: payload has {len(payload)} of {header['payload_bytes']} bytes "
            "(interrupted copy or full disk); use another checkpoint"
        )
    if hashlib.sha256(payload).hexdigest() != header["sha256"]:
        raise CheckpointError(
            f"{path} fails its sha256 check (corrupted or modified); use another checkpoint"
        )
    try:
        state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: payload cannot be loaded safely: {str(e).splitlines()[0]}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: payload is not a dict")
    return state


def candidates(ckpt_dir: str | Path) -> list[tuple[int, float, Path]]:
    """Checkpoints in `ckpt_dir`, newest first: by global step (header), then `last.pt`, then mtime.

    Files whose header cannot be read are returned last with step -1 so that `latest_valid` reports them.
    """
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    out: list[tuple[int, float, Path]] = []
    for p in d.glob("*.pt"):
        try:
            step = int(read_header(p).get("global_step", -1))
        except CheckpointError:
            step = -1
        tie = 1.0 if p.name == "last.pt" else 0.0  # same step: prefer last.pt (it may be a hard link)
        out.append((step, tie + p.stat().st_mtime * 1e-12, p))
    out.sort(key=lambda t: (t[0], t[1]), reverse=True)
    return out


def latest_valid(ckpt_dir: str | Path, warn=None) -> tuple[Path, dict[str, Any]] | None:  # type: ignore[no-untyped-def]
    """Newest checkpoint in `ckpt_dir` that passes every check, with its state; None if there is none.

    Corrupt files are skipped with one warning line each (printed to stderr unless `warn` is given).
    """
    warn = warn or (lambda m: print(m, file=sys.stderr, flush=True))
    for _, _, p in candidates(ckpt_dir):
        try:
            return p, load(p)
        except CheckpointError as e:
            warn(f"warning: skipping checkpoint: {e}")
    return None


def _link_or_copy(src: Path, dst: Path) -> None:
    """Point `dst` at `src`'s bytes atomically: a hard link when possible, else a full atomic copy."""
    tmp = dst.with_name(f".{dst.name}.lnk{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
        os.replace(tmp, dst)
        _fsync_dir(dst.parent)
    except OSError:
        tmp.unlink(missing_ok=True)
        _atomic_write(dst, src.read_bytes())


class CheckpointDir:
    """The keep policy for one run's `checkpoints/` folder.

    `save(state, periodic=..., best=...)` always refreshes `last.pt`; a periodic save also keeps
    `step_XXXXXXXX.pt` (the newest `keep` of them survive); `best=True` refreshes `best.pt`.
    """

    def __init__(self, ckpt_dir: str | Path, keep: int = 2) -> None:
        self.dir = Path(ckpt_dir)
        self.keep = max(0, keep)

    def save(self, state: dict[str, Any], global_step: int, epoch: int, periodic: bool, best: bool) -> Path:
        meta = {"global_step": global_step, "epoch": epoch}
        last = self.dir / "last.pt"
        try:
            if periodic and self.keep > 0:
                main = save(self.dir / f"step_{global_step:08d}.pt", state, kind="periodic", **meta)
                _link_or_copy(main, last)
            else:
                main = save(last, state, kind="last", **meta)
            if best:
                _link_or_copy(main, self.dir / "best.pt")
        except OSError as e:
            raise UserError(
                f"could not write checkpoint in {self.dir} ({e.strerror or e}): free disk space or set "
                "train.out_dir to a writable folder; the previous checkpoint is intact"
            ) from None
        self._prune()
        return main

    def _prune(self) -> None:
        periodic = sorted(self.dir.glob("step_*.pt"))
        for p in periodic[: max(0, len(periodic) - self.keep)]:
            p.unlink(missing_ok=True)

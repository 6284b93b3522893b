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
`last.pt` (always the newest, hard-linked when possible), `best.pt`. A temp file left by a process killed
mid-write is deleted by the next save or load in its folder.

Reading weights out of a checkpoint (`read_state`, `backbone_state`, `load_classifier`) also lives here:
a pretraining checkpoint (the MoCo *query* encoder), a classifier checkpoint of distillation / linear
probe, an official MoCo `.pth.tar` or an exported torchvision state dict, with a one-line error when it
does not fit the configured arch.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import struct
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fastvpd.classifier import Classifier
from fastvpd.config import UserError
from fastvpd.models import build_backbone, unwrapped_key

MAGIC = b"FVPDCKPT"
VERSION = 1
_HEAD = struct.Struct("<I")


def _refusal(e: Exception) -> str:
    """`torch.load(weights_only=True)`'s refusal in one line of our own: never PyTorch's advice to load with
    weights_only=False, which would run whatever code the file holds."""
    msg = str(e)
    if "weights_only" in msg or "Unsupported global" in msg:
        glob = re.search(r"Unsupported global: GLOBAL ([\w.]+)", msg)
        what = f" ({glob.group(1)})" if glob else ""
        return (
            f"it holds Python objects besides tensors{what}, which are not loaded because they can run code"
        )
    return f"damaged file ({type(e).__name__}: {msg.splitlines()[0][:120] if msg else ''})"


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


_TEMP_TAGS = (".tmp", ".lnk")  # `.NAME.tmpPID` (atomic write), `.NAME.lnkPID` (hard link being swapped in)
_writing: set[Path] = set()  # temp files this process is writing right now


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's live process
    return True


def sweep_torn(d: str | Path, name: str = "", warn=None) -> list[Path]:  # type: ignore[no-untyped-def]
    """Delete temp files in `d` (of checkpoint `name`, or of any) left by a process killed mid-write.

    A temp file is torn when the process named in its suffix is gone, or is this process and it is not
    writing that file now. Returns the deleted paths; `warn(line)` is told of each.
    """
    d = Path(d)
    if not d.is_dir():
        return []
    gone = []
    for p in d.glob(f".{name or '*'}.*"):
        for tag in _TEMP_TAGS:
            head, sep, pid = p.name.rpartition(tag)
            if not sep or not pid.isdigit() or not head.startswith("."):
                continue
            mine = int(pid) == os.getpid()
            if (mine and p not in _writing) or (not mine and not _pid_alive(int(pid))):
                p.unlink(missing_ok=True)
                gone.append(p)
                if warn is not None:
                    warn(f"removed {p}: a checkpoint write interrupted before it finished")
            break
    return gone


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_torn(path.parent, path.name)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    _writing.add(tmp)
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
    finally:
        _writing.discard(tmp)


def _write_failed(what: str, e: OSError, had_previous: bool) -> UserError:
    tail = (
        "the previous checkpoint is intact" if had_previous else "no checkpoint was written before this one"
    )
    return UserError(
        f"could not write checkpoint {what} ({e.strerror or e}): free disk space or set train.out_dir "
        f"to a writable folder; {tail}"
    )


def save(path: str | Path, state: dict[str, Any], **meta: Any) -> Path:
    """Atomically write `state` (tensors + plain containers) to `path`; `meta` goes into the header.

    Raises UserError when the disk is full or read-only; whatever was at `path` before is intact.
    """
    path = Path(path)
    data = _serialize(state, meta)
    had = path.is_file()
    try:
        _atomic_write(path, data)
    except OSError as e:
        raise _write_failed(str(path), e, had) from None
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
        raise CheckpointError(f"{path}: payload cannot be loaded safely: {_refusal(e)}") from None
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
    sweep_torn(ckpt_dir, warn=warn)
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
    _writing.add(tmp)
    try:
        os.link(src, tmp)
        os.replace(tmp, dst)
        _fsync_dir(dst.parent)
    except OSError:
        tmp.unlink(missing_ok=True)
        _atomic_write(dst, src.read_bytes())
    finally:
        _writing.discard(tmp)


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
        had = last.is_file()
        try:
            if periodic and self.keep > 0:
                main = self.dir / f"step_{global_step:08d}.pt"
                _atomic_write(main, _serialize(state, {"kind": "periodic", **meta}))
                _link_or_copy(main, last)
            else:
                main = last
                _atomic_write(main, _serialize(state, {"kind": "last", **meta}))
            if best:
                _link_or_copy(main, self.dir / "best.pt")
        except OSError as e:
            raise _write_failed(f"in {self.dir}", e, had) from None
        self._prune()
        return main

    def _prune(self) -> None:
        periodic = sorted(self.dir.glob("step_*.pt"))
        for p in periodic[: max(0, len(periodic) - self.keep)]:
            p.unlink(missing_ok=True)


# ------------------------------------------------------------------------------ weights out of checkpoints
_PROBE = "layer1.0.conv1.weight"  # every torchvision ResNet has it: marks where a backbone's keys start


def _not_loadable(path: Path, e: Exception) -> str:
    """Why `torch.load(weights_only=True)` refused `path`, in our words (see `_refusal`)."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"PK" or head[:1] == b"\x80":  # a torch.save zip archive / a legacy pickle
        return _refusal(e)
    return "not a PyTorch file (text or another format?)"


def read_state(path: str | Path) -> dict[str, Any]:
    """A fastvpd checkpoint (verified) or any `torch.load(weights_only=True)`-safe file, as a dict."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist: pass a pretraining/distillation checkpoint (.pt)")
    with open(path, "rb") as f:
        magic = f.read(len(MAGIC))
    if magic == MAGIC:
        return load(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a checkpoint this code can read: {_not_loadable(path, e)}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} does not hold a state dict (got {type(obj).__name__})")
    return obj


def _flatten(obj: Any, prefix: str = "") -> dict[str, Tensor]:
    """Every tensor in nested dicts, keyed by its dotted path without DDP/compile wrapper components."""
    out: dict[str, Tensor] = {}
    if isinstance(obj, Tensor):
        out[unwrapped_key(prefix)] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(k, str):
                out.update(_flatten(v, f"{prefix}{k}."))
    return out


def _pick_prefix(prefixes: list[str]) -> str | None:
    """Which backbone to take when a file holds several: MoCo's query encoder, else the student/classifier,
    else the only one that is not a key encoder / teacher."""
    for want in ("encoder_q", "classifier", "student"):
        hits = [p for p in prefixes if want in p.split(".")]
        if len(hits) == 1:
            return hits[0]
    rest = [p for p in prefixes if not {"encoder_k", "teacher", "optimizer"} & set(p.split("."))]
    return rest[0] if len(rest) == 1 else None


def _saved_arch(obj: dict[str, Any]) -> str:
    m = obj.get("config", {}).get("model", {}) if isinstance(obj.get("config"), dict) else {}
    if not m:
        return ""
    return f" (it was trained with model.arch={m.get('arch')} model.small_stem={m.get('small_stem')})"


def backbone_state(
    obj: dict[str, Any], arch: str, small_stem: bool, source: str = "checkpoint"
) -> dict[str, Tensor]:
    """The backbone weights in `obj` with torchvision key names (no fc), checked against `arch`.

    Accepts a pretraining checkpoint (MoCo query backbone; split-BN keys are plain BN keys), a
    distillation/linear checkpoint (the student), an official MoCo `.pth.tar` (`module.encoder_q.*`) or a
    torchvision state dict. Raises UserError (one line) when nothing fits `arch`/`small_stem`.
    """
    flat = _flatten(obj)
    prefixes = sorted({k[: -len(_PROBE)] for k in flat if k == _PROBE or k.endswith("." + _PROBE)})
    prefix = _pick_prefix(prefixes)
    if prefix is None:
        what = "no ResNet backbone" if not prefixes else f"several backbones ({', '.join(prefixes)})"
        raise UserError(f"{source} holds {what}: pass a fastvpd pretraining/distillation checkpoint")
    state = {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "head."))}
    ref = build_backbone(arch, small_stem).state_dict()
    missing = [k for k in ref if k not in state]
    extra = [k for k in state if k not in ref]
    bad = [k for k in ref if k in state and tuple(state[k].shape) != tuple(ref[k].shape)]
    if missing or extra or bad:
        detail = (
            f"shape of {bad[0]} is {tuple(state[bad[0]].shape)}, expected {tuple(ref[bad[0]].shape)}"
            if bad
            else f"{len(missing)} missing / {len(extra)} unexpected keys, e.g. {(missing or extra)[0]}"
        )
        raise UserError(
            f"{source} does not fit model.arch={arch} model.small_stem={small_stem}{_saved_arch(obj)}: "
            f"{detail}; set model.arch/model.small_stem to match it"
        )
    return {k: state[k].to(ref[k].dtype) for k in ref}


def classifier_record(model: Classifier, res: int, classes: Sequence[str]) -> dict[str, Any]:
    """What `evaluate`/`export` need to rebuild a classifier from a run checkpoint (under task.classifier)."""
    return {
        "arch": model.arch,
        "small_stem": bool(model.small_stem),
        "num_classes": int(model.num_classes),
        "res": int(res),
        "classes": list(classes),
        "state_dict": model.state_dict(),
    }


def classifier_entry(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The `task.classifier` record of a distillation / linear-probe checkpoint, else None."""
    rec = obj.get("task", {}).get("classifier") if isinstance(obj.get("task"), dict) else None
    return rec if isinstance(rec, dict) and "state_dict" in rec else None


def load_classifier(path: str | Path) -> tuple[Classifier, dict[str, Any]]:
    """Rebuild the classifier of a distillation / linear-probe checkpoint -> (model in eval mode, record)."""
    rec = classifier_entry(read_state(path))
    if rec is None:
        raise UserError(
            f"{path} is not a classifier checkpoint (no task.classifier): pass a checkpoint of "
            "`python -m fastvpd.distill` or `python -m fastvpd.linear`"
        )
    model = Classifier(rec["arch"], int(rec["num_classes"]), bool(rec["small_stem"]))
    try:
        model.load_state_dict(rec["state_dict"])
    except RuntimeError as e:
        raise UserError(f"{path}: classifier weights do not load ({str(e).splitlines()[0]})") from None
    return model.eval(), rec

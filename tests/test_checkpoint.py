"""Checkpoint format: atomic writes, checksums, weights_only loading, keep policy, fallback on corruption."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from fastvpd import checkpoint
from fastvpd.checkpoint import CheckpointDir, CheckpointError
from fastvpd.config import UserError


def _state(v: float) -> dict:
    return {"w": torch.full((4, 4), v), "meta": {"step": int(v), "name": "x"}, "rng": torch.get_rng_state()}


def test_roundtrip_and_header(tmp_path: Path) -> None:
    p = checkpoint.save(tmp_path / "a.pt", _state(3.0), global_step=7, epoch=1)
    h = checkpoint.read_header(p)
    assert h["version"] == checkpoint.VERSION and h["global_step"] == 7 and len(h["sha256"]) == 64
    s = checkpoint.load(p)
    assert torch.equal(s["w"], torch.full((4, 4), 3.0)) and s["meta"] == {"step": 3, "name": "x"}
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]  # no temp files left


def test_truncated_and_tampered_are_refused(tmp_path: Path) -> None:
    p = checkpoint.save(tmp_path / "a.pt", _state(1.0), global_step=1)
    data = p.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        checkpoint.load(tmp_path / "trunc.pt")
    bad = bytearray(data)
    bad[-50] ^= 0xFF
    (tmp_path / "tamper.pt").write_bytes(bytes(bad))
    with pytest.raises(CheckpointError, match="sha256"):
        checkpoint.load(tmp_path / "tamper.pt")
    torch.save({"w": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not a fastvpd checkpoint"):
        checkpoint.load(tmp_path / "plain.pt")


class _Evil:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, ("echo pwned",))


def _no_unsafe_advice(msg: str) -> None:
    """PyTorch's refusal advises reloading with weights_only=False (running the file's code): never quoted."""
    assert "weights_only" not in msg and "can still be loaded" not in msg and "trust" not in msg, msg
    assert "\n" not in msg


def test_load_never_executes_code(tmp_path: Path) -> None:
    p = checkpoint.save(tmp_path / "evil.pt", {"x": _Evil()}, global_step=0)  # checksum is valid
    with pytest.raises(CheckpointError, match="objects besides tensors") as e:
        checkpoint.load(p)
    _no_unsafe_advice(str(e.value))
    torch.save({"x": _Evil()}, tmp_path / "evil_plain.pt")  # not our format: read_state's own path
    with pytest.raises(UserError, match="objects besides tensors") as e:
        checkpoint.read_state(tmp_path / "evil_plain.pt")
    _no_unsafe_advice(str(e.value))


def test_a_text_file_given_as_checkpoint_is_named_as_such(tmp_path: Path) -> None:
    (tmp_path / "notes.pt").write_text("these are my notes, not weights\n")
    with pytest.raises(UserError, match="not a PyTorch file") as e:
        checkpoint.read_state(tmp_path / "notes.pt")
    _no_unsafe_advice(str(e.value))
    with pytest.raises(CheckpointError, match="not a fastvpd checkpoint"):
        checkpoint.load(tmp_path / "notes.pt")


def test_latest_valid_skips_corrupt_newest(tmp_path: Path) -> None:
    d = CheckpointDir(tmp_path, keep=5)
    d.save(_state(1.0), global_step=10, epoch=1, periodic=True, best=False)
    d.save(_state(2.0), global_step=20, epoch=2, periodic=True, best=False)
    # corrupt the newest: last.pt is a hard link to step_20, so truncating one truncates both
    newest = tmp_path / "step_00000020.pt"
    newest.write_bytes(newest.read_bytes()[:-10])
    (tmp_path / "last.pt").unlink()
    warnings: list[str] = []
    path, state = checkpoint.latest_valid(tmp_path, warn=warnings.append)  # type: ignore[misc]
    assert path.name == "step_00000010.pt" and state["meta"]["step"] == 1
    assert len(warnings) == 1 and "truncated" in warnings[0]
    assert checkpoint.latest_valid(tmp_path / "none") is None


def test_keep_policy_last_and_best(tmp_path: Path) -> None:
    d = CheckpointDir(tmp_path, keep=2)
    for i in range(1, 5):
        d.save(_state(float(i)), global_step=i * 10, epoch=i, periodic=True, best=(i == 2))
    d.save(_state(5.0), global_step=55, epoch=5, periodic=False, best=False)
    names = sorted(p.name for p in tmp_path.glob("*.pt"))
    assert names == ["best.pt", "last.pt", "step_00000030.pt", "step_00000040.pt"]
    assert checkpoint.load(tmp_path / "best.pt")["meta"]["step"] == 2
    assert checkpoint.load(tmp_path / "last.pt")["meta"]["step"] == 5
    assert checkpoint.latest_valid(tmp_path)[0].name == "last.pt"  # type: ignore[index]


def test_disk_full_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = CheckpointDir(tmp_path, keep=2)
    d.save(_state(1.0), global_step=1, epoch=0, periodic=False, best=False)

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "fsync", full)
    with pytest.raises(UserError, match="No space left on device.*previous checkpoint is intact"):
        d.save(_state(2.0), global_step=2, epoch=0, periodic=False, best=False)
    monkeypatch.undo()
    assert checkpoint.load(tmp_path / "last.pt")["meta"]["step"] == 1
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]


def test_unwritable_dir_is_a_user_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    with pytest.raises(UserError, match="could not write checkpoint"):
        checkpoint.save(blocker / "ck" / "a.pt", _state(1.0))


def test_a_failed_first_write_does_not_claim_a_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "fsync", full)
    for write in (
        lambda: CheckpointDir(tmp_path / "run", keep=2).save(_state(1.0), 1, 0, periodic=True, best=True),
        lambda: checkpoint.save(tmp_path / "a.pt", _state(1.0)),
    ):
        with pytest.raises(UserError, match="No space left on device") as e:
            write()
        assert "intact" not in str(e.value) and "no checkpoint was written before" in str(e.value)
    monkeypatch.undo()
    assert not list((tmp_path / "run").iterdir()) and not list(tmp_path.glob("*.pt"))


def _dead_pid() -> int:
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_torn_temp_files_are_deleted_by_the_next_save_and_load(tmp_path: Path) -> None:
    d = CheckpointDir(tmp_path, keep=2)
    d.save(_state(1.0), global_step=1, epoch=0, periodic=True, best=False)
    dead = _dead_pid()
    torn_last = tmp_path / f".last.pt.tmp{dead}"  # a process killed while writing last.pt
    torn_step = tmp_path / f".step_00000002.pt.tmp{dead}"
    torn_link = tmp_path / f".best.pt.lnk{dead}"
    mine = tmp_path / f".last.pt.tmp{os.getpid()}"  # this pid, but no write in progress: a reused pid
    live = tmp_path / f".last.pt.tmp{os.getppid()}"  # a live process may still be writing: kept
    for p in (torn_last, torn_step, torn_link, mine, live):
        p.write_bytes(b"half a checkpoint")
    d.save(_state(2.0), global_step=2, epoch=0, periodic=False, best=False)  # writes last.pt
    assert not torn_last.exists() and not mine.exists() and live.exists()
    assert torn_step.exists() and torn_link.exists()  # another file's temps wait for the load
    said: list[str] = []
    path, state = checkpoint.latest_valid(tmp_path, warn=said.append)  # type: ignore[misc]
    assert path.name == "last.pt" and state["meta"]["step"] == 2
    assert not torn_step.exists() and not torn_link.exists() and live.exists()
    assert len(said) == 2 and all("interrupted" in s for s in said)

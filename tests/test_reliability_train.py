"""Reliability of the trainers (fastvpd.pretrain / fastvpd.distill over fastvpd.engine + checkpoint):
kill -9 at chosen points then train.resume=auto, SIGTERM/SIGINT, bad checkpoints, full disk, non-finite
losses. See RELIABILITY.md.

Faults are injected in a child process started as `python tests/test_reliability_train.py FAULT MODULE
ARGS...`: FAULT patches one function (the step's backward, the checkpoint writer, the last.pt link) so
that the process SIGKILLs (or SIGTERMs/SIGINTs) itself at an exact, repeatable point. The uninterrupted
reference runs and the resumptions run in this process (cheaper: no second torch import).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tiny_data import converted_tree

ROOT = Path(__file__).resolve().parents[1]
TIMING_KEYS = {"samples_per_s", "data_wait"}


# ------------------------------------------------------------------------------------ child-process faults
def _install_fault(spec: str) -> None:
    """Patch the trainer so that it kills/signals itself at a repeatable point. spec = KIND:N."""
    from fastvpd import checkpoint
    from fastvpd.step import Precision

    kind, n = spec.split(":")
    count = {"n": 0}

    def hit() -> bool:
        count["n"] += 1
        return count["n"] == int(n)

    if kind in ("kill-step", "term", "int"):  # inside the N-th step: forward done, no update yet
        real = Precision.backward_step

        def backward_step(self: Any, *a: Any, **k: Any) -> Any:
            if hit():
                if kind == "kill-step":
                    os.kill(os.getpid(), signal.SIGKILL)
                stamp = os.environ["FVPD_SIGNAL_STAMP"]
                Path(stamp).write_text(repr(time.time()))
                os.kill(os.getpid(), signal.SIGTERM if kind == "term" else signal.SIGINT)
            return real(self, *a, **k)

        Precision.backward_step = backward_step  # type: ignore[method-assign]
    elif kind == "kill-ckpt-write":  # half of the N-th checkpoint file written to its temp name
        real_write = checkpoint._atomic_write

        def atomic_write(path: Path, data: bytes) -> None:
            if hit():
                tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
                with open(tmp, "wb") as f:
                    f.write(data[: len(data) // 2])
                    f.flush()
                    os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
            real_write(path, data)

        checkpoint._atomic_write = atomic_write
    elif kind == "kill-ckpt-link":  # periodic file complete, last.pt not yet pointed at it
        real_link = checkpoint._link_or_copy

        def link(src: Path, dst: Path) -> None:
            if hit():
                os.kill(os.getpid(), signal.SIGKILL)
            real_link(src, dst)

        checkpoint._link_or_copy = link
    else:
        raise SystemExit(f"unknown fault {spec}")


def _child_main(argv: list[str]) -> None:
    import runpy

    spec, module, *args = argv
    torch.set_num_threads(int(os.environ["FVPD_TEST_THREADS"]))  # bit-exact needs the parent's count
    _install_fault(spec)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def _spawn(spec: str, module: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), spec, module, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "FVPD_TEST_THREADS": str(torch.get_num_threads()), **(env or {})},
    )


def _finish(p: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str, float]:
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err, time.time()


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 train / 18 val 12-px images in 3 classes, converted to the cache: 3 steps per epoch at batch 16."""
    return converted_tree(tmp_path_factory, "rel", {"train": 16, "val": 6}, classes=3, size=12, tint=True)


COMMON = [
    "model.arch=resnet18",
    "model.small_stem=true",
    "aug.res=8",
    "train.batch_size=16",
    "train.epochs=2",
    "train.device=cpu",
    "train.deterministic=true",
    "train.amp=none",
    "train.cuda_graph=false",
    "log.every=1",
    "log.tensorboard=false",
    "log.progress=false",
    "ckpt.every=1",
    "ckpt.keep=2",
]
MOCO = ["moco.queue_size=64", "moco.mlp_hidden=16", "moco.dim=16", "moco.bn_splits=2", "eval.knn_every=0"]


def pre_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.root={data}", f"train.out_dir={out}", *COMMON, *MOCO, *extra]


def dis_args(data: Path, out: Path, teacher: Path, *extra: str) -> list[str]:
    return [
        f"data.root={data}",
        f"train.out_dir={out}",
        *COMMON,
        f"distill.teacher={teacher}",
        "distill.start_epoch=2",  # epoch 1 CE only, epoch 2 with OFD: a resume crosses the switch
        "eval.every=1",
        *extra,
    ]


def _run(module: str, argv: list[str]) -> Path:
    import importlib

    return importlib.import_module(module).main(argv)


def _exit_2_errors(capsys: pytest.CaptureFixture[str], module: str, argv: list[str]) -> list[str]:
    """Run the entry point expecting exit 2; return the `error:` lines it printed on stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        _run(module, argv)
    assert e.value.code == 2
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]


@pytest.fixture(scope="module")
def reference(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Uninterrupted pretraining and distillation runs (6 steps each)."""
    base = tmp_path_factory.mktemp("rel_ref")
    pre = _run("fastvpd.pretrain", pre_args(tiny_data, base / "pre"))
    teacher = pre / "checkpoints" / "last.pt"
    dis = _run("fastvpd.distill", dis_args(tiny_data, base / "dis", teacher))
    return {"pre": pre, "dis": dis, "teacher": teacher}


# ----------------------------------------------------------------------------------------------- helpers
def _metrics(run: Path) -> list[dict[str, Any]]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def _diff_tree(a: Any, b: Any, where: str = "") -> list[str]:
    """Paths where two checkpoint trees differ (tensors compared exactly)."""
    if isinstance(a, torch.Tensor):
        if not (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape):
            return [f"{where} (type/shape)"]
        if torch.equal(a, b) or (
            a.is_floating_point() and torch.equal(a.isnan(), b.isnan()) and a.isnan().all()
        ):
            return []
        return [f"{where} (max |diff| {(a.double() - b.double()).abs().max():.3g})"]
    if isinstance(a, dict):
        if not isinstance(b, dict) or set(a) != set(b):
            return [f"{where} (keys)"]
        return [d for k in a for d in _diff_tree(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, list | tuple):
        if len(a) != len(b):
            return [f"{where} (length)"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _diff_tree(x, y, f"{where}[{i}]")]
    if isinstance(a, float) and np.isnan(a):
        return [] if isinstance(b, float) and np.isnan(b) else [where]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def assert_identical_runs(run: Path, ref: Path) -> None:
    """Same final weights, queue, optimizer, RNG/loader states, progress and metrics (timings aside)."""
    from fastvpd import checkpoint

    a = checkpoint.load(run / "checkpoints" / "last.pt")
    b = checkpoint.load(ref / "checkpoints" / "last.pt")
    for st in (a, b):  # bookkeeping only (see RELIABILITY.md, H2): the offset of the last set_epoch call,
        for r in st["ranks"]:  # never read back (the engine always calls set_epoch(epoch, step) itself)
            r["loader"].pop("start_step", None)
    diffs = [d for key in ("task", "progress", "ranks") for d in _diff_tree(a[key], b[key], key)]
    assert not diffs, f"{run.name}: {len(diffs)} differences, e.g. {diffs[:8]}"
    assert _metrics(run) == _metrics(ref)


# ------------------------------------------------------------------------------------------ kill -9 + resume
PRE_FAULTS = [
    "kill-step:5",  # mid-step in epoch 2 (after the epoch-1 checkpoint)
    "kill-step:2",  # mid-step before any checkpoint exists: resume=auto starts over
    "kill-ckpt-write:2",  # half-written step_00000006.pt: must never be loaded
    "kill-ckpt-link:1",  # step_00000003.pt complete, last.pt not yet written
]


def _in_waves(jobs: list[tuple[str, str, list[str]]], width: int = 2) -> list[tuple[int, str, str, float]]:
    """Run fault jobs (spec, module, args) `width` at a time (two CPU cores)."""
    out = []
    for i in range(0, len(jobs), width):
        procs = [_spawn(*j) for j in jobs[i : i + width]]
        out += [_finish(p) for p in procs]
    return out


def test_kill9_then_resume_is_identical(reference: dict[str, Path], tiny_data: Path, tmp_path: Path) -> None:
    dis_dir = tmp_path / "dis_kill"
    jobs = [(f, "fastvpd.pretrain", pre_args(tiny_data, tmp_path / f.replace(":", "_"))) for f in PRE_FAULTS]
    jobs.append(("kill-step:5", "fastvpd.distill", dis_args(tiny_data, dis_dir, reference["teacher"])))
    for (spec, module, _), (rc, _, err, _) in zip(jobs, _in_waves(jobs)):
        assert rc == -signal.SIGKILL, (spec, module, rc, err[-2000:])

    leftovers = list((tmp_path / "kill-ckpt-write_2" / "checkpoints").glob(".*.tmp*"))
    assert leftovers, "the half-written checkpoint should be on disk (as after a real crash)"
    for f in PRE_FAULTS:
        run = tmp_path / f.replace(":", "_")
        _run("fastvpd.pretrain", pre_args(tiny_data, run, "train.resume=auto"))
        assert_identical_runs(run, reference["pre"])
    _run("fastvpd.distill", dis_args(tiny_data, dis_dir, reference["teacher"], "train.resume=auto"))
    assert_identical_runs(dis_dir, reference["dis"])


# ------------------------------------------------------------------------------------------- SIGTERM/SIGINT
SIGNAL_EXIT_BOUND_S = 30.0  # documented in RELIABILITY.md: one step + one checkpoint write (+ slack)


def test_sigterm_and_sigint_checkpoint_and_exit_0(
    reference: dict[str, Path], tiny_data: Path, tmp_path: Path
) -> None:
    from fastvpd import checkpoint

    cases = {
        "term": ("fastvpd.pretrain", pre_args(tiny_data, tmp_path / "term")),
        "int": ("fastvpd.distill", dis_args(tiny_data, tmp_path / "int", reference["teacher"])),
    }
    procs = {}
    for kind, (module, args) in cases.items():
        env = {"FVPD_SIGNAL_STAMP": str(tmp_path / f"{kind}.stamp")}
        procs[kind] = (_spawn(f"{kind}:4", module, args, env), module, args)
    for kind, (p, module, args) in procs.items():
        rc, out, err, t_exit = _finish(p)
        assert rc == 0, (kind, rc, err[-2000:])
        t_sig = float((tmp_path / f"{kind}.stamp").read_text())
        print(f"{kind}: signal to exit {t_exit - t_sig:.2f} s")
        assert t_exit - t_sig < SIGNAL_EXIT_BOUND_S, (kind, t_exit - t_sig)
        run = tmp_path / kind
        hdr = checkpoint.read_header(run / "checkpoints" / "last.pt")
        assert hdr["global_step"] == 4  # the signalled step completes, then the checkpoint
        _run(module, [*args, "train.resume=auto"])
        assert_identical_runs(run, reference["pre" if module.endswith("pretrain") else "dis"])


# ------------------------------------------------------------------------------------- bad checkpoints
def test_truncated_or_tampered_checkpoints_are_refused_previous_used(
    reference: dict[str, Path], tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    from fastvpd import checkpoint
    from fastvpd.checkpoint import CheckpointError

    run = tmp_path / "run"
    shutil.copytree(reference["pre"], run)
    ck = run / "checkpoints"
    assert sorted(p.name for p in ck.glob("*.pt")) == ["last.pt", "step_00000003.pt", "step_00000006.pt"]
    last = ck / "last.pt"
    last.unlink()  # it is a hard link of step_6: give it its own bytes, then damage both
    shutil.copy(ck / "step_00000006.pt", last)
    data = last.read_bytes()
    last.write_bytes(data[: len(data) - 1000])  # truncated
    b = bytearray(data)
    b[-100] ^= 0x01  # one flipped bit in the payload
    (ck / "step_00000006.pt").write_bytes(bytes(b))
    with pytest.raises(CheckpointError, match="truncated"):
        checkpoint.load(last)
    with pytest.raises(CheckpointError, match="sha256"):
        checkpoint.load(ck / "step_00000006.pt")
    hdr = json.loads(data[12 : 12 + int.from_bytes(data[8:12], "little")])
    foreign = data.replace(f'"version": {hdr["version"]}'.encode(), b'"version": 9', 1)
    (tmp_path / "v99.pt").write_bytes(foreign)
    with pytest.raises(CheckpointError, match="format version 9,"):
        checkpoint.load(tmp_path / "v99.pt")
    with pytest.raises(CheckpointError, match="not a fastvpd checkpoint"):
        (tmp_path / "plain.pt").write_bytes(b"")
        checkpoint.load(tmp_path / "plain.pt")

    capsys.readouterr()
    _run("fastvpd.pretrain", pre_args(tiny_data, run, "train.resume=auto"))
    out = capsys.readouterr()
    text = out.out + out.err
    assert "skipping checkpoint" in text and "truncated" in text and "sha256" in text
    assert "resumed from" in text and "step_00000003.pt" in text  # the previous good one
    assert_identical_runs(run, reference["pre"])


class _Payload:
    """Pickles as a call to os.system: must never run when a checkpoint is loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_with_pickled_callable_is_refused_and_not_executed(tmp_path: Path) -> None:
    from fastvpd import checkpoint
    from fastvpd.checkpoint import CheckpointError

    marker = tmp_path / "executed"
    path = tmp_path / "evil.pt"
    # a well-formed file: right magic, version and sha256, only the payload is hostile
    path.write_bytes(checkpoint._serialize({"task": {"x": _Payload(marker)}}, {"global_step": 1, "epoch": 0}))
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        checkpoint.load(path)
    assert not marker.exists()
    (tmp_path / "checkpoints").mkdir()
    path.rename(tmp_path / "checkpoints" / "last.pt")
    assert checkpoint.latest_valid(tmp_path / "checkpoints", warn=lambda m: None) is None
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------- full disk
def test_disk_full_during_checkpoint_keeps_previous(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import errno

    from fastvpd import checkpoint

    calls = {"n": 0}
    real_open = open

    def fake_open(file: Any, mode: str = "r", *a: Any, **k: Any) -> Any:
        if "w" in mode:
            calls["n"] += 1
            if calls["n"] >= 2:  # the first checkpoint is written, the second meets a full disk
                raise OSError(errno.ENOSPC, "No space left on device", os.fspath(file))
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr(checkpoint, "open", fake_open, raising=False)
    run = tmp_path / "run"
    err = _exit_2_errors(capsys, "fastvpd.pretrain", pre_args(tiny_data, run))
    assert len(err) == 1 and "No space left" in err[0] and "previous checkpoint is intact" in err[0], err
    monkeypatch.undo()
    files = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert files == ["last.pt", "step_00000003.pt"], files  # no temp file left behind
    state = checkpoint.load(run / "checkpoints" / "last.pt")
    assert state["progress"]["global_step"] == 3


# ------------------------------------------------------------------------------------------ non-finite loss
def _poison(monkeypatch: pytest.MonkeyPatch, at_step: int) -> None:
    """NaN in both views of the `at_step`-th batch (1-based), as a corrupt batch would give."""
    from fastvpd import pretrain

    real = pretrain.MocoTask.train_step
    count = {"n": 0}

    def train_step(self: Any, batch: Any) -> None:
        count["n"] += 1
        if count["n"] != at_step:
            return real(self, batch)
        if batch.views:  # views rendered by the loader
            batch.views = [v * float("nan") for v in batch.views]
            return real(self, batch)
        # views rendered inside the step (views_in_step): poison what the loader's augment returns
        augment = self.loader.augment
        self.loader.augment = lambda idx: [v * float("nan") for v in augment(idx)]
        try:
            return real(self, batch)
        finally:
            del self.loader.augment  # the class's method again

    monkeypatch.setattr(pretrain.MocoTask, "train_step", train_step)


def test_nonfinite_stop_names_step_parts_and_checkpoint(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _poison(monkeypatch, at_step=5)
    run = tmp_path / "stop"
    err = _exit_2_errors(capsys, "fastvpd.pretrain", pre_args(tiny_data, run))
    assert len(err) == 1, err
    msg = err[0]
    print(msg)
    assert "step 5" in msg and "loss=nan" in msg and "acc=" in msg, msg
    assert str(run / "checkpoints" / "step_00000003.pt") in msg and "on_nonfinite=skip" in msg, msg
    from fastvpd import checkpoint

    assert checkpoint.read_header(run / "checkpoints" / "last.pt")["global_step"] == 3  # nothing NaN saved


def test_nonfinite_skip_counts_and_keeps_state_finite(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastvpd import checkpoint

    _poison(monkeypatch, at_step=5)
    run = tmp_path / "skip"
    _run("fastvpd.pretrain", pre_args(tiny_data, run, "train.on_nonfinite=skip"))
    rows = _metrics(run)
    assert sum(r.get("skipped", 0) for r in rows) == 1 and [r["step"] for r in rows if r.get("skipped")] == [
        5
    ]
    state = checkpoint.load(run / "checkpoints" / "last.pt")
    assert state["progress"]["global_step"] == 6
    bad = [
        k
        for k, v in state["task"]["model"].items()
        if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()
    ]
    assert not bad, f"non-finite tensors after a skipped step: {bad[:6]}"


if __name__ == "__main__":
    _child_main(sys.argv[1:])

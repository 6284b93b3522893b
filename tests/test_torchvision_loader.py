"""The torchvision backend's worker lifetime: close(), a dropped loader, a signal to the process group.

Regression for the H100 run where `pretrain` over this backend failed with "DataLoader worker (pid N) is
killed by signal: Terminated": the suite's `timeout` sent SIGTERM to the whole process group; the trainer
(inside `fit`, which turns SIGTERM into a checkpoint) survived it, its workers did not.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import subprocess
import sys
import textwrap
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fastvpd.config import DataConfig
from fastvpd.data import build_loader, moco_v2

RES = 16
BS = 16
ROOT = Path(__file__).resolve().parents[1]


def _loader(root: Path, workers: int = 2):  # noqa: ANN202
    cfg = DataConfig(root=str(root), backend="torchvision", workers=workers)
    return build_loader(cfg, moco_v2(RES), "train", BS, "cpu", torch.float32, seed=0)


def _cycle(loader) -> Iterator:  # noqa: ANN001
    """As benchmarks/throughput.py draws batches: epochs back to back from one generator."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def _children() -> set[int]:
    return {p.pid for p in mp.active_children()}  # also reaps the children that have exited


def _check(batch) -> None:  # noqa: ANN001
    assert len(batch.views) == 2 and batch.views[0].shape == (BS, 3, RES, RES)
    assert torch.isfinite(batch.views[0]).all()


@pytest.mark.skipif(os.name != "posix", reason="fork-started workers")
def test_close_is_idempotent_and_stops_the_workers(digits_converted: Path) -> None:
    before = _children()
    loader = _loader(digits_converted)
    it = iter(loader)
    _check(next(it))
    workers = _children() - before
    assert len(workers) == 2
    loader.close()
    assert not workers & _children()  # joined (or terminated) by close, not left to the GC
    loader.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        next(it)  # the iteration that was running when it closed fails loudly, it does not hang
    again = list(zip(range(2), loader))  # iterating again starts new workers
    assert len(again) == 2
    _check(again[1][1])
    assert len(_children() - before - workers) == 2
    loader.close()
    assert not (_children() - before)


@pytest.mark.skipif(os.name != "posix", reason="fork-started workers")
def test_dropped_loader_stops_its_workers_and_the_next_one_runs(digits_converted: Path) -> None:
    """Dropping the last reference stops the workers at once: the loader is in no reference cycle, so
    no later garbage collection (in this process, or in a later loader's forked workers, which inherit
    the garbage) shuts them down at an arbitrary moment."""
    before = _children()
    first = _loader(digits_converted)
    batches = _cycle(first)
    for _ in range(3):
        _check(next(batches))
    old = _children() - before
    assert len(old) == 2
    ref = weakref.ref(first)
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        del batches, first
        assert ref() is None  # freed by reference counting alone
    finally:
        if was_enabled:
            gc.enable()
    assert not old & _children()
    second = _loader(digits_converted)
    batches = _cycle(second)
    for _ in range(2 * 15):  # two epochs of 15 batches, past the prefetched ones
        _check(next(batches))
    del batches
    second.close()
    assert not (_children() - before)


_GROUP_SIGNAL = """
import os, signal, sys
import torch
from fastvpd.config import DataConfig
from fastvpd.data import build_loader, moco_v2

got = []
signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))  # as the engine's _StopFlag
cfg = DataConfig(root=sys.argv[1], backend="torchvision", workers=2)
loader = build_loader(cfg, moco_v2(16), "train", 16, "cpu", torch.float32, seed=0)
it = iter(loader)
first = [next(it) for _ in range(2)]  # one batch from each worker: both have started
os.killpg(os.getpgrp(), signal.SIGTERM)  # what `timeout` (or Ctrl-C's SIGINT) does: the whole group
rest = [next(it) for _ in range(10)]  # past the 2 x 2 prefetched batches: the workers must still run
loader.close()
print("ok", got == [signal.SIGTERM], len(rest), flush=True)
"""


@pytest.mark.skipif(os.name != "posix", reason="process groups")
def test_workers_survive_a_sigterm_to_the_process_group(digits_converted: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_GROUP_SIGNAL), str(digits_converted)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        start_new_session=True,  # its own process group, so the signal stays away from pytest
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ok True 10" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert "killed by signal" not in proc.stderr

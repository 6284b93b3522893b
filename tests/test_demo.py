"""The demo stops (exit 130, checkpoint kept, resumable) when a signal interrupts one of its stages."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastvpd.demo import DemoInterrupted, _finished
from fastvpd.engine import FitResult

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("stopped", ["SIGTERM", "SIGINT"])
def test_finished_passes_a_done_run_and_stops_on_a_signalled_one(tmp_path: Path, stopped: str) -> None:
    def result(how: str) -> FitResult:
        return FitResult(tmp_path, 7, 1, how, tmp_path / "last.pt")

    assert _finished(result("done"), "stage") == tmp_path
    assert _finished(result("max_steps"), "stage") == tmp_path
    with pytest.raises(DemoInterrupted, match="last.pt"):
        _finished(result(stopped), "seed 0 pretraining")


@pytest.mark.skipif(os.name != "posix", reason="sends SIGTERM")
def test_sigterm_during_pretraining_stops_the_whole_demo(tmp_path: Path) -> None:
    """Before the fix the demo went on to distil from a half-trained teacher after each stage's SIGTERM."""
    out = tmp_path / "demo"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastvpd.demo", "--out", str(out), "train.device=cpu", "log.progress=false"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    deadline = time.monotonic() + 240
    assert proc.stdout is not None
    try:
        for line in proc.stdout:  # wait until the pretraining loop runs, then interrupt it
            lines.append(line)
            if line.startswith("pretrain: resnet18"):
                time.sleep(3)
                proc.send_signal(signal.SIGTERM)
                break
            assert time.monotonic() < deadline, "".join(lines)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # a demo that went on instead of stopping: do not leave it running
            proc.kill()
            rest = proc.communicate()[0]
    log = "".join(lines) + rest
    assert proc.returncode == 130, log
    assert "demo stopped: seed 0 pretraining was interrupted" in log and "2/4" not in log, log
    assert list((out / "seed0" / "pretrain" / "checkpoints").glob("*.pt")), log
    assert not (out / "seed0" / "distill").exists() and not (out / "results.md").exists()


def test_demo_bad_seeds_is_one_line(tmp_path: Path) -> None:
    p = subprocess.run(
        [sys.executable, "-m", "fastvpd.demo", "--seeds", "0,a", "--out", str(tmp_path / "o")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1 and "--seeds takes comma-separated whole numbers" in err[0]

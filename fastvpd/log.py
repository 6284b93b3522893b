"""Run logging: `metrics.jsonl` (one JSON object per line, flushed), TensorBoard, a tqdm bar.

Only the main rank writes. The logger never touches device tensors: the engine reads the device meters
once per `log.every` steps (one host sync) and hands plain floats here.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm


def _fmt_time(s: float) -> str:
    if not math.isfinite(s) or s < 0:
        return "?"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


def trim_metrics(path: Path, max_step: int) -> None:
    """Drop lines logged after `max_step` (a resumed run re-does those steps; no duplicate lines)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= max_step:
                keep.append(line)
        except ValueError:  # a torn last line from a crash
            continue
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(f"{ln}\n" for ln in keep))
    tmp.replace(path)


class RunLogger:
    """Per-run sinks. `enabled=False` (non-main ranks) turns every method into a no-op.

    Args:
        run_dir: holds `metrics.jsonl` and the TensorBoard event files (`tb/`).
        total_steps: steps of the whole run (for the run-level ETA in the bar).
        resume_step: global step the run (re)starts at: metrics logged after it are dropped and
            TensorBoard purges later events.
    """

    def __init__(
        self,
        run_dir: str | Path,
        total_steps: int,
        resume_step: int = 0,
        tensorboard: bool = True,
        progress: bool = True,
        enabled: bool = True,
    ) -> None:
        self.enabled = enabled
        self.total_steps = total_steps
        self.progress = progress and enabled
        self.bar: tqdm | None = None
        self.tb = None
        self._f = None
        self._t0 = time.perf_counter()
        self._step0 = resume_step
        if not enabled:
            return
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.dir / "metrics.jsonl"
        trim_metrics(self.metrics_path, resume_step)
        self._f = open(self.metrics_path, "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.dir / "tb"), purge_step=resume_step or None)
            except Exception as e:  # tensorboard missing or broken: metrics.jsonl is the source of truth
                self.info(f"tensorboard off: {str(e).splitlines()[0]}")

    def info(self, msg: str) -> None:
        """One human-readable line (through tqdm so the bar is not broken)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def log(self, step: int, metrics: dict[str, Any], prefix: str = "") -> None:
        """Append {"step", **metrics} to metrics.jsonl and send numeric values to TensorBoard."""
        if not self.enabled:
            return
        row = {"step": step, **{f"{prefix}{k}": v for k, v in metrics.items()}}
        self._f.write(json.dumps(row) + "\n")  # type: ignore[union-attr]
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, int | float) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, step)

    # ---- progress bar: one per epoch, postfix carries throughput and the ETA of the whole run ----
    def start_epoch(self, epoch: int, epochs: int, steps: int, initial: int = 0) -> None:
        if not self.progress:
            return
        self.close_bar()
        self.bar = tqdm(
            total=steps, initial=initial, desc=f"epoch {epoch + 1}/{epochs}", dynamic_ncols=True, leave=False
        )

    def advance(self, n: int, global_step: int, samples_per_s: float, extra: dict[str, float]) -> None:
        """Move the bar by `n` steps (called at the log cadence) and show samples/s and the run ETA."""
        if self.bar is None:
            return
        done = max(1, global_step - self._step0)
        eta = (time.perf_counter() - self._t0) / done * (self.total_steps - global_step)
        post = {k: f"{v:.4g}" for k, v in extra.items()}
        post.update({"img/s": f"{samples_per_s:.0f}", "run_eta": _fmt_time(eta)})
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(n)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self.close_bar()
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self._f is not None:
            self._f.close()
            self._f = None

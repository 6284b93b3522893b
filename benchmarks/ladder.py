"""A ladder of training-step rungs, each a row of settings (a frozen dataclass, its `form`) timed against
the first: the MoCo ladder (benchmarks/moco_steps.py), the distillation ladder (distill_steps.py) and the
experiments' rungs (benchmarks/experiments/) all run here."""

from __future__ import annotations

import re
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any

import torch

from benchmarks.harness import (
    Options,
    Skip,
    count_flops,
    first_line,
    free_memory,
    log,
    peak_memory,
    skipped,
    time_steps,
)
from benchmarks.hw import HwMonitor

RowHook = Callable[[list[dict[str, Any]]], None]
NO_GPU = "needs a CUDA GPU"


@dataclass
class Rung:
    """One rung: its label, its settings (`form`, recorded in its row so later code reads settings, not
    names), why it cannot run here ('' when it can), and extra warm-up calls (a CUDA graph's capture).

    `pick(rows)`: a rung whose form is chosen from the rows measured before it in the same ladder; it
    returns (form, note) or raises Skip with the reason."""

    name: str
    form: Any = None
    skip: str = ""
    warmup_extra: int = 0
    pick: Callable[[list[dict[str, Any]]], tuple[Any, str]] | None = None


def form_dict(form: Any) -> dict[str, Any] | None:
    return asdict(form) if is_dataclass(form) and not isinstance(form, type) else None


def measured(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows this run measured (skipped and failed rows left out) that carry their form."""
    return [r for r in rows if r.get("status") == "ok" and r.get("form") is not None]


def run_ladder(
    rungs: Sequence[Rung],
    build: Callable[[Any], Callable[[], Any]],
    opts: Options,
    device: torch.device,
    peak_tflops: float | None,
    on_row: RowHook | None = None,
) -> dict[str, Any]:
    """Measure each rung (`build(form)` returns a zero-argument step); FLOPs counted once, on the first
    measured rung (same maths on every rung).

    `opts.rungs` (a regex) skips the rungs it does not match, except the first: the baseline of every
    speed-up. `on_row(rows)` runs after each measured rung, so a run cut short keeps what it measured."""
    rows: list[dict[str, Any]] = []
    flops: float | None = None
    hw_rows: dict[str, Any] = {}
    for i, rung in enumerate(rungs):
        form = form_dict(rung.form)
        if i and opts.rungs and not re.search(opts.rungs, rung.name):
            rows.append({**skipped(rung.name, f"not selected by --rungs {opts.rungs!r}"), "form": form})
            continue
        if rung.skip:
            rows.append({**skipped(rung.name, rung.skip), "form": form})
            log(f"{rung.name}: skipped ({rung.skip})")
            continue
        log(f"{rung.name}: measuring")
        started = time.perf_counter()  # the rung's whole cost (build, compile, warm-up): for GPU budgets
        free_memory(device)
        note = ""
        try:
            chosen = rung.form
            if rung.pick is not None:
                chosen, note = rung.pick(rows)
                form = form_dict(chosen)
                log(f"{rung.name}: {note}")
            with peak_memory(device) as mem, HwMonitor(device) as hw:
                step = build(chosen)
                warmup = opts.warmup + rung.warmup_extra
                if flops is None:
                    flops = count_flops(step)  # a real step: it counts as one of the warm-up calls
                    warmup = max(warmup - 1, 0)
                t = time_steps(step, device, warmup, opts.repeats)
            del step
        except Skip as e:
            row = skipped(rung.name, str(e))
        except Exception as e:  # one rung failing must not sink the report
            traceback.print_exc()
            row = skipped(rung.name, first_line(e), status="failed")
        else:
            row = {"name": rung.name, "status": "ok", **t, **mem}
            if note:
                row["note"] = note
            row["samples_s"] = opts.batch / (t["ms_per_step"] / 1000.0)
            if flops:
                achieved = flops / (t["ms_per_step"] / 1000.0)
                row["gflops"] = achieved / 1e9
                if peak_tflops:
                    row["mfu_pct"] = 100.0 * achieved / (peak_tflops * 1e12)
            hw_rows[rung.name] = hw.result
            row["wall_s"] = time.perf_counter() - started
            log(
                f"{rung.name}: {row['ms_per_step']:.2f} ms/step, {row['samples_s']:.1f} samples/s "
                f"({row['wall_s']:.0f} s in all)"
            )
        finally:
            free_memory(device)
        row["form"] = form
        rows.append(row)
        if on_row is not None and i < len(rungs) - 1:  # the section's own report follows the last rung
            on_row(rows)
    base = next((r for r in rows if r["status"] == "ok"), None)
    for r in rows:
        if r["status"] == "ok" and base is not None:
            r["speedup"] = base["ms_per_step"] / r["ms_per_step"]
    return {"rows": rows, "flops_per_step": flops, "hw": hw_rows}


def ladder_notes(res: dict[str, Any], first: str) -> list[str]:
    notes = [first]
    if res["flops_per_step"]:
        notes.append(f"{res['flops_per_step'] / 1e9:.1f} GFLOP per step (FlopCounterMode, fwd+bwd)")
    return notes

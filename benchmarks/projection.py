"""Hours for the full recipe from the measured rates: the end-to-end rate when one was measured, else the
best step fed by the best loader."""

from __future__ import annotations

from typing import Any

# Full recipe of the paper (VIPriors ImageNet subset: 50 images x 1000 classes).
RECIPE_IMAGES = 50_000
RECIPE_PRETRAIN_EPOCHS = 800
RECIPE_DISTILL_EPOCHS = 100


def best(section: dict[str, Any] | None) -> dict[str, Any] | None:
    """The fastest measured row of a section (None when it measured none)."""
    rows = [r for r in (section or {}).get("rows", []) if r.get("status") == "ok" and r.get("samples_s")]
    return max(rows, key=lambda r: r["samples_s"]) if rows else None


def fed_rate(step_rate: float, loader: dict[str, Any], batch: int, device_share: float = 1.0) -> float:
    """Samples/s of a training step fed by a loader. The loader's GPU work (its `dev ms/batch`) runs on the
    step's GPU, so its time adds to the step's; its host work runs beside the step, so its own rate only
    caps the result. `device_share` scales the GPU work: 0.5 for a one-view batch priced from the two-view
    loader rows. (benchmarks/RESULTS.md compares this with an end-to-end measurement.)"""
    dev = loader.get("device_ms_per_batch")
    rate = step_rate
    if dev and batch > 0:
        rate = 1.0 / (1.0 / step_rate + device_share * dev / 1000.0 / batch)
    return min(rate, loader["samples_s"])


def _best_fed(
    step: dict[str, Any], loaders: dict[str, Any] | None, batch: int, device_share: float = 1.0
) -> tuple[float, str]:
    """The loader that feeds `step` fastest (fed_rate), and how the figure was made."""
    rows = [r for r in (loaders or {}).get("rows", []) if r.get("status") == "ok" and r.get("samples_s")]
    if not rows:
        return step["samples_s"], f"step '{step['name']}' only (no loader measured)"
    rate, row = max(
        ((fed_rate(step["samples_s"], r, batch, device_share), r) for r in rows), key=lambda t: t[0]
    )
    how = "step + loader GPU time" if row.get("device_ms_per_batch") else "min(step, loader)"
    return rate, f"{how}: step '{step['name']}', loader '{row['name']}'"


def projection(results: dict[str, Any]) -> dict[str, Any]:
    """Hours for the full recipe from the measured rates: end to end if measured, else the best step fed
    by the best loader (fed_rate)."""
    e2e, step = best(results.get("e2e")), best(results.get("steps"))
    batch = int((results.get("options") or {}).get("batch") or 0)
    if e2e:
        rate, source = e2e["samples_s"], f"end to end, {e2e['name']}"
    elif step:
        rate, source = _best_fed(step, results.get("loaders"), batch)
    else:
        return {"status": "skipped", "reason": "no pretraining rate was measured"}
    out: dict[str, Any] = {"status": "ok"}

    def part(epochs: int, r: float, src: str) -> dict[str, Any]:
        hours = epochs * RECIPE_IMAGES / r / 3600.0
        return {"epochs": epochs, "images": RECIPE_IMAGES, "samples_s": r, "source": src, "hours": hours}

    out["pretrain"] = part(RECIPE_PRETRAIN_EPOCHS, rate, source)
    dist_best = best(results.get("distill"))
    if dist_best:
        # one supervised view per sample: half a two-view loader row's GPU work, its host rate as a cap
        r, src = _best_fed(dist_best, results.get("loaders"), batch, device_share=0.5)
        out["distill"] = part(RECIPE_DISTILL_EPOCHS, r, "distill " + src)
        out["total_hours"] = out["pretrain"]["hours"] + out["distill"]["hours"]
    else:
        out["total_hours"] = None
        out["distill_note"] = "distillation step not measured"
    return out


def projection_lines(proj: dict[str, Any]) -> list[str]:
    if not proj:
        return []
    if proj.get("status", "ok") != "ok":
        return [f"projection skipped: {proj.get('reason', '')}"]
    lines = []
    for part in ("pretrain", "distill"):
        p = proj.get(part)
        if p:
            lines.append(
                f"{part}: {p['epochs']} epochs x {p['images']} images at {p['samples_s']:.1f} samples/s "
                f"({p['source']}) = {p['hours']:.2f} h"
            )
    if proj.get("total_hours") is not None:
        lines.append(f"total: {proj['total_hours']:.2f} h")
    return lines

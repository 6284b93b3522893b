"""The report: a terminal table, results.json, results.md and chart.png, rewritten after every section so a
run cut short keeps what it measured."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.projection import projection_lines

# (section key, title, [(column title, row key, format)]) — the order the report shows them in.
Column = tuple[str, str, str]
STEP_COLUMNS: tuple[Column, ...] = (  # the MoCo and the distillation ladders share their columns
    ("rung", "name", "s"),
    ("samples/s", "samples_s", ".1f"),
    ("ms/step", "ms_per_step", ".2f"),
    ("speed-up", "speedup", ".2fx"),
    ("peak GiB", "peak_mem_gib", ".2f"),
    ("MFU %", "mfu_pct", ".1f"),
    ("GFLOP/s", "gflops", ".1f"),
)
TABLES: tuple[tuple[str, str, tuple[Column, ...]], ...] = (
    (
        "loaders",
        "Loaders: two-view moco_v2 batches",
        (
            ("backend", "name", "s"),
            ("samples/s", "samples_s", ".1f"),
            ("speed-up", "speedup", ".2fx"),
            ("ms/batch", "ms_per_batch", ".1f"),
            ("CPU %", "cpu_util_pct", ".0f"),
            ("dev ms/batch", "device_ms_per_batch", ".2f"),
            ("first batch s", "first_batch_s", ".1f"),
        ),
    ),
    (
        "steps",
        "MoCo step ladder (device-resident inputs)",
        STEP_COLUMNS,
    ),
    (
        "distill",
        "Distillation step ladder (teacher fwd + student fwd/bwd + connectors)",
        STEP_COLUMNS,
    ),
    (
        "e2e",
        "End to end: fastvpd.pretrain over each loader",
        (
            ("backend", "name", "s"),
            ("samples/s", "samples_s", ".1f"),
            ("speed-up", "speedup", ".2fx"),
            ("data stall %", "stall_pct", ".1f"),
            ("steps", "steps", "d"),
            ("wall s", "wall_s", ".1f"),
            ("CPU %", "cpu_util_pct", ".0f"),
            ("GPU SM %", "gpu_sm_util_pct", ".0f"),
        ),
    ),
)


# the loaders section's sub-table: results["loaders"]["decode"] (benchmarks/decode.py)
DECODE_TITLE = "JPEG decode alone: full-size uint8 RGB, encoded bytes in memory"
DECODE_COLUMNS: tuple[Column, ...] = (
    ("decoder", "name", "s"),
    ("images/s", "images_per_s", ".1f"),
    ("speed-up", "speedup", ".2fx"),
    ("ms/batch", "ms_per_batch", ".1f"),
)

# ... and results["loaders"]["triton_tuning"] (benchmarks/aug_tune.py)
TUNING_TITLE = "Triton augmentation launch shapes: GPU time per two-view batch"
TUNING_COLUMNS: tuple[Column, ...] = (
    ("pixels per program x warps", "name", "s"),
    ("GPU ms/batch", "device_ms_per_batch", ".2f"),
    ("Triton kernels ms", "triton_ms_per_batch", ".2f"),
    ("samples/s", "samples_s", ".0f"),
)
SUBTABLES = (("decode", DECODE_TITLE, DECODE_COLUMNS), ("triton_tuning", TUNING_TITLE, TUNING_COLUMNS))

PROFILE_TITLE = "Where the step's time goes: top ops by self time"
PROFILE_COLUMNS: tuple[Column, ...] = (
    ("op (GPU: kernel)", "name", "s"),
    ("ms/step", "ms_per_step", ".2f"),
    ("share %", "pct", ".1f"),
    ("calls/step", "calls_per_step", ".0f"),
)


def _top_tables(sec: dict[str, Any]) -> list[tuple[str, list[dict[str, Any]]]]:
    """(title, rows) of a section's top-ops tables: the step profile's, and the kernels of the fastest
    loader that works on the GPU (per batch)."""
    out = []
    prof = sec.get("profile") or {}
    if prof.get("top"):
        out.append((f"{PROFILE_TITLE} ({prof.get('what', 'step')}, {prof.get('steps')} steps)", prof["top"]))
    gpu_rows = [r for r in sec.get("rows", []) if r.get("status") == "ok" and r.get("device_top")]
    if gpu_rows:
        best = max(gpu_rows, key=lambda r: r.get("samples_s") or 0.0)
        out.append((f"GPU kernels of loader '{best['name']}' (ms/step = per batch)", best["device_top"]))
    return out


def fmt_value(value: Any, fmt: str) -> str:
    """One table cell: '-' for missing, 'x' suffix for ratios, plain str for text."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if fmt == "s":
        return str(value)
    if fmt.endswith("x"):
        return f"{value:{fmt[:-1]}}x"
    if fmt == "d":
        return str(int(value))
    return f"{value:{fmt}}"


def _cells(rows: Sequence[dict[str, Any]], cols: Sequence[Column]) -> list[list[str]]:
    out = []
    for row in rows:
        if row.get("status", "ok") != "ok":
            reason = f"{row.get('status', 'skipped')}: {row.get('reason', '')}"
            out.append([str(row.get("name", "?")), reason] + [""] * (len(cols) - 2))
        else:
            out.append([fmt_value(row.get(key), f) for _, key, f in cols])
    return out


def text_table(rows: Sequence[dict[str, Any]], cols: Sequence[Column]) -> str:
    """Fixed-width table; a skipped row prints its reason across the figure columns."""
    head = [c[0] for c in cols]
    body = _cells(rows, cols)
    widths = [len(h) for h in head]
    for r, row in zip(body, rows):
        for i, cell in enumerate(r):
            if row.get("status", "ok") != "ok" and i == 1:
                continue  # the reason spans the columns; it must not widen one
            widths[i] = max(widths[i], len(cell))
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for r, row in zip(body, rows):
        if row.get("status", "ok") != "ok":
            lines.append(r[0].ljust(widths[0]) + "  " + r[1])
        else:
            lines.append(
                "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
            )
    return "\n".join(lines)


def md_table(rows: Sequence[dict[str, Any]], cols: Sequence[Column]) -> str:
    head = [c[0] for c in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(cols) - 1)) + "|"]
    for r in _cells(rows, cols):
        lines.append("| " + " | ".join(c.replace("|", "/") for c in r) + " |")
    return "\n".join(lines)


def _meta_lines(meta: dict[str, Any]) -> list[str]:
    keys = (
        "device_name",
        "gpu_memory_gib",
        "driver",
        "torch",
        "cuda_runtime",
        "cudnn",
        "torchvision",
        "python",
        "cpu_model",
        "cpu_cores",
        "git_commit",
        "date",
    )
    return [f"{k}: {meta[k]}" for k in keys if meta.get(k) is not None]


def _notes(section: dict[str, Any]) -> list[str]:
    return [str(n) for n in section.get("notes", [])]


def render_text(results: dict[str, Any]) -> str:
    """The whole report as terminal text."""
    out = ["fastvpd throughput benchmark", *("  " + m for m in _meta_lines(results.get("meta", {})))]
    for key, title, cols in TABLES:
        sec = results.get(key)
        if not sec:
            continue
        out += ["", title]
        if sec.get("status", "ok") != "ok":
            out.append(f"  {sec.get('status')}: {sec.get('reason', '')}")
            continue
        out.append(text_table(sec.get("rows", []), cols))
        out += ["  " + n for n in _notes(sec)]
        for title, top in _top_tables(sec):
            out += ["", title, text_table(top, PROFILE_COLUMNS)]
        for sub_key, sub_title, sub_cols in SUBTABLES:
            dec = sec.get(sub_key)
            if not dec:
                continue
            out += ["", sub_title]
            if dec.get("status", "ok") != "ok":
                out.append(f"  {dec.get('status')}: {dec.get('reason', '')}")
            else:
                out += [text_table(dec.get("rows", []), sub_cols), *("  " + n for n in _notes(dec))]
    proj = projection_lines(results.get("projection", {}))
    if proj:
        out += ["", "Projection: full recipe (800 pretrain + 100 distill epochs)", *("  " + p for p in proj)]
    return "\n".join(out)


def render_markdown(results: dict[str, Any]) -> str:
    out = ["# fastvpd throughput benchmark", "", *("- " + m for m in _meta_lines(results.get("meta", {})))]
    opts = results.get("options")
    if opts:
        out += ["", "Options: " + ", ".join(f"`{k}={v}`" for k, v in opts.items())]
    for key, title, cols in TABLES:
        sec = results.get(key)
        if not sec:
            continue
        out += ["", f"## {title}", ""]
        if sec.get("status", "ok") != "ok":
            out.append(f"{sec.get('status')}: {sec.get('reason', '')}")
            continue
        out.append(md_table(sec.get("rows", []), cols))
        notes = _notes(sec)
        if notes:
            out += ["", *("- " + n for n in notes)]
        for title, top in _top_tables(sec):
            out += ["", f"### {title}", "", md_table(top, PROFILE_COLUMNS)]
        for sub_key, sub_title, sub_cols in SUBTABLES:
            dec = sec.get(sub_key)
            if not dec:
                continue
            out += ["", f"### {sub_title}", ""]
            if dec.get("status", "ok") != "ok":
                out.append(f"{dec.get('status')}: {dec.get('reason', '')}")
            else:
                out += [md_table(dec.get("rows", []), sub_cols), "", *("- " + n for n in _notes(dec))]
    proj = projection_lines(results.get("projection", {}))
    if proj:
        out += ["", "## Projection: full recipe", "", *("- " + p for p in proj)]
    if results.get("chart"):
        out += ["", f"![chart]({results['chart']})"]
    return "\n".join(out) + "\n"


def _bars(ax: Any, rows: Sequence[dict[str, Any]], title: str, ylabel: str) -> bool:
    ok = [r for r in rows if r.get("status", "ok") == "ok" and r.get("samples_s")]
    if not ok:
        ax.set_axis_off()
        ax.set_title(f"{title}: nothing measured", fontsize=9)
        return False
    names = [str(r["name"]) for r in ok]
    vals = [float(r["samples_s"]) for r in ok]
    bars = ax.bar(range(len(ok)), vals, color="#4C72B0")
    for b, r in zip(bars, ok):
        if r.get("speedup") is not None:
            ax.annotate(
                f"{r['speedup']:.2f}x",
                (b.get_x() + b.get_width() / 2, b.get_height()),
                ha="center",
                va="bottom",
                fontsize=8,
            )
    ax.set_xticks(range(len(ok)))
    ax.set_xticklabels(names, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    return True


def write_chart(results: dict[str, Any], path: Path) -> bool:
    """PNG with one bar panel per measured section (samples/s, speed-up on top); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = [(k, t) for k, t, _ in TABLES if results.get(k, {}).get("rows")]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        _bars(ax, results[key]["rows"], title.split(":")[0].split(" (")[0], "samples/s")
    device = results.get("meta", {}).get("device_name", "")
    fig.suptitle(f"fastvpd throughput — {device}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def write_report(results: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write results.json, results.md and chart.png (when matplotlib is present) into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    chart = out_dir / "chart.png"
    if write_chart(results, chart):
        paths["png"] = chart
        results = {**results, "chart": chart.name}
    js = out_dir / "results.json"
    tmp = js.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_jsonable(results), indent=2) + "\n")
    tmp.replace(js)
    paths["json"] = js
    md = out_dir / "results.md"
    md.write_text(render_markdown(results))
    paths["md"] = md
    return paths

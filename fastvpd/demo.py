"""`make demo`: the whole paper, end to end, on the embedded digits data (CPU in minutes).

Steps: make the digits tree → convert (the cache the demo reads) → MoCo v2 + margin pretraining (no labels) →
self-distillation → the two baselines from the same code (supervised from scratch, MoCo + plain fine-tuning)
→ evaluation on the test split → results table (Markdown + JSON) and a PNG chart in the run folder.

`--seeds 0,1,2` repeats the whole thing per seed and reports mean ± std; `--readme README.md` writes that
table between the `<!-- demo-results -->` markers, so the README's numbers always come from a run.
`--ablation negatives` runs the queue-size × margin ablation instead (`fastvpd.ablation`).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

from fastvpd.config import RECIPES, UserError, main_guard
from fastvpd.extras import require

MARK_BEGIN, MARK_END = "<!-- demo-results:begin -->", "<!-- demo-results:end -->"


@dataclass
class MethodResult:
    method: str
    top1: float
    top5: float
    seconds: float


def _banner(msg: str) -> None:
    print(f"\n=== {msg} ===", flush=True)


def _config(name: str) -> str:
    path = RECIPES / name
    if not path.is_file():
        raise UserError(f"missing demo config {path}")
    return str(path)


def _last_ckpt(run_dir: Path) -> Path:
    for name in ("last.pt", "best.pt"):
        p = Path(run_dir) / "checkpoints" / name
        if p.is_file():
            return p
    raise UserError(f"no checkpoint found in {run_dir}/checkpoints")


class DemoInterrupted(Exception):
    """A stage was stopped by SIGTERM/SIGINT (its checkpoint is saved): the demo stops there too."""


def _finished(result: Any, stage: str) -> Path:
    """The stage's run folder, or DemoInterrupted when a signal stopped it.

    Each stage saves a checkpoint and returns on a signal; without this check the demo would go on with
    the next stage (and a half-trained model).
    """
    if result.interrupted:
        raise DemoInterrupted(
            f"{stage} was interrupted; its checkpoint {result.last_checkpoint} is saved. "
            "Run the same command again to resume where it stopped."
        )
    return Path(result.run_dir)


def run_seed(out: Path, seed: int, data_root: Path, extra: list[str]) -> tuple[list[MethodResult], Path]:
    """One full pass of the paper's pipeline and its baselines for one seed."""
    from fastvpd import distill, evaluate, pretrain

    out.mkdir(parents=True, exist_ok=True)
    common = [f"data.root={data_root}", f"train.seed={seed}", "train.resume=auto"] + extra
    results: list[MethodResult] = []

    _banner(f"[seed {seed}] 1/4 MoCo v2 + margin pretraining (train split, labels unused)")
    t0 = time.perf_counter()
    pre_dir = _finished(
        pretrain.run(
            ["--config", _config("demo_digits_pretrain.yaml"), f"train.out_dir={out / 'pretrain'}", *common]
        ),
        f"seed {seed} pretraining",
    )
    t_pre = time.perf_counter() - t0
    teacher = _last_ckpt(pre_dir)

    runs = [
        (
            "MoCo+margin → OFD self-distillation (paper)",
            ["model.init=moco", "distill.kind=ofd"],
            "distill",
            True,
        ),
        ("MoCo+margin → plain fine-tuning", ["model.init=moco", "distill.kind=none"], "finetune", True),
        ("supervised from scratch", ["model.init=random", "distill.kind=none"], "scratch", False),
    ]
    for i, (label, over, name, uses_pretrain) in enumerate(runs, start=2):
        _banner(f"[seed {seed}] {i}/4 {label}")
        t0 = time.perf_counter()
        run_dir = _finished(
            distill.run(
                [
                    "--config",
                    _config("demo_digits_distill.yaml"),
                    f"train.out_dir={out / name}",
                    f"distill.teacher={teacher}",
                    *over,
                    *common,
                ]
            ),
            f"seed {seed} {name}",
        )
        seconds = time.perf_counter() - t0 + (t_pre if uses_pretrain else 0.0)
        res = evaluate.main(
            [
                str(_last_ckpt(run_dir)),
                "--data",
                str(data_root),
                "--split",
                "test",
                "--out",
                str(run_dir / "test"),
            ]
        )
        results.append(MethodResult(label, float(res["top1"]), float(res["top5"]), seconds))
    return results, pre_dir


def _table(rows: dict[str, list[MethodResult]], machine: str) -> str:
    n = len(next(iter(rows.values())))
    head = (
        f"Digits demo, test split, {n} seed(s), mean ± std; wall time includes pretraining where used. "
        f"{machine}"
    )
    lines = [head, "", "| method | top-1 (%) | top-5 (%) | wall time (s) |", "|---|---|---|---|"]
    for method, rs in rows.items():

        def ms(vals: list[float], fmt: str = ".1f") -> str:
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            return f"{statistics.mean(vals):{fmt}} ± {sd:{fmt}}"

        top1, top5 = ms([r.top1 for r in rs]), ms([r.top5 for r in rs])
        lines.append(f"| {method} | {top1} | {top5} | {ms([r.seconds for r in rs], '.0f')} |")
    return "\n".join(lines)


def _chart(rows: dict[str, list[MethodResult]], pretrain_dirs: list[Path], path: Path) -> None:
    """Bar chart of top-1 per method plus the pretraining loss and kNN curves."""
    require("matplotlib", "demo", "the demo's chart").use("Agg")
    plt = require("matplotlib.pyplot", "demo", "the demo's chart")

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    names = list(rows)
    means = [statistics.mean(r.top1 for r in rows[m]) for m in names]
    sds = [statistics.stdev([r.top1 for r in rows[m]]) if len(rows[m]) > 1 else 0.0 for m in names]
    axes[0].barh(range(len(names)), means, xerr=sds, color=["#2a7", "#59c", "#c75"][: len(names)])
    axes[0].set_yticks(range(len(names)), [n.replace(" → ", "\n→ ") for n in names], fontsize=8)
    lo = max(0.0, min(m - s for m, s in zip(means, sds)) - 4.0)  # a 0-100 axis would hide the differences
    axes[0].set_xlim(lo, min(100.0, max(m + s for m, s in zip(means, sds)) + 2.0))
    for y, (m, s) in enumerate(zip(means, sds)):
        axes[0].text(lo + 0.3, y, f"{m:.1f} ± {s:.1f}", va="center", fontsize=9, color="white")
    axes[0].set_xlabel("test top-1 (%)")
    axes[0].set_title("accuracy per method")
    for d in pretrain_dirs:
        recs = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()]
        tr = [r for r in recs if "loss" in r and "step" in r]
        kn = [r for r in recs if "knn_top1" in r]
        if tr:
            axes[1].plot([r["step"] for r in tr], [r["loss"] for r in tr], alpha=0.8)
        if kn:
            axes[2].plot([r["epoch"] for r in kn], [r["knn_top1"] for r in kn], marker="o", alpha=0.8)
    axes[1].set_title("pretraining loss (margin InfoNCE)")
    axes[1].set_xlabel("step")
    axes[2].set_title("kNN monitor, val top-1 (%)")
    axes[2].set_xlabel("epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def splice_readme(readme: Path, begin: str, end: str, block: str, section: str | None = None) -> None:
    """Write `block` between the `begin`/`end` markers of `readme`, replacing what was there.

    Without the markers: `section` (a heading and text) is appended to the file with the markers after
    it, or, when `section` is None, a one-line UserError.
    """
    text = readme.read_text() if readme.is_file() else ""
    if begin not in text or end not in text:
        if section is None:
            raise UserError(f"{readme} has no {begin} ... {end} block to fill")
        text = text.rstrip("\n") + f"\n\n{section}{begin}\n{end}\n"
    a, rest = text.split(begin, 1)
    _, b = rest.split(end, 1)
    readme.write_text(f"{a}{begin}\n{block}\n{end}{b}")


def update_readme(readme: Path, table: str, chart_rel: str | None) -> None:
    block = table + (f"\n\n![demo results]({chart_rel})" if chart_rel else "")
    splice_readme(readme, MARK_BEGIN, MARK_END, block)


def make_data(out: Path, formats: tuple[str, ...] = ("cache",)) -> Path:
    """The embedded digits as an ImageFolder tree under OUT/digits, converted into OUT/converted."""
    from fastvpd.convert import convert
    from fastvpd.datasets.digits import make_digits

    src, conv = out / "digits", out / "converted"
    if not (src / "train").is_dir():
        make_digits(src, seed=0)
    convert(src, conv, formats=formats, workers=None, progress=True)
    return conv


@main_guard
def main(argv: list[str] | None = None) -> Path:
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    if not {"-h", "--help"} & set(argv):  # before minutes of training, not at the chart
        for mod in ("sklearn", "matplotlib"):
            require(mod, "demo", "the demo's data and charts")
    if "--ablation" in argv or any(a.startswith("--ablation=") for a in argv):
        return _ablation(argv)
    ap = argparse.ArgumentParser(prog="python -m fastvpd.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    ap.add_argument("--readme", default=None, help="write the results table into this README's demo block")
    ap.add_argument(
        "--ablation", choices=["negatives"], default=None, help="run an ablation instead (see below)"
    )
    ap.add_argument(
        "overrides", nargs="*", help="extra key=value overrides for every run (e.g. train.device=cpu)"
    )
    ap.epilog = (
        "--ablation negatives: queue size x margin sweep; `--ablation negatives --help` for its options"
    )
    args = ap.parse_args(argv)

    out = Path(args.out)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        msg = f"--seeds takes comma-separated whole numbers, e.g. 0,1,2 (got {args.seeds!r})"
        raise UserError(msg) from None
    t0 = time.perf_counter()
    _banner("0/4 embedded data: scikit-learn digits → ImageFolder → uint8 cache")
    conv = make_data(out / "data")

    rows: dict[str, list[MethodResult]] = {}
    pre_dirs = []
    for seed in seeds:
        try:
            res, pre_dir = run_seed(out / f"seed{seed}", seed, conv, list(args.overrides))
        except DemoInterrupted as e:
            print(f"\ndemo stopped: {e}", flush=True)
            raise SystemExit(130) from None
        pre_dirs.append(pre_dir)
        for r in res:
            rows.setdefault(r.method, []).append(r)

    cpu = platform.processor() or platform.machine()
    machine = f"Machine: {cpu}, {_cpu_desc()}, run {date.today().isoformat()}."
    table = _table(rows, machine)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(
        json.dumps({m: [r.__dict__ for r in rs] for m, rs in rows.items()} | {"machine": machine}, indent=2)
    )
    _chart(rows, pre_dirs, out / "results.png")
    if args.readme:  # the chart travels with the README (runs/ is not part of the repository)
        readme = Path(args.readme)
        chart = readme.resolve().parent / "docs" / "demo_results.png"
        chart.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "results.png", chart)
        update_readme(readme, table, "docs/demo_results.png")
    _banner(f"done in {time.perf_counter() - t0:.0f} s")
    print(table)
    print(f"\nresults: {out / 'results.md'}  ·  {out / 'results.json'}  ·  chart: {out / 'results.png'}")
    return out


def _cpu_desc() -> str:
    import os

    import torch

    dev = (
        torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"{os.cpu_count()} CPU cores, no GPU"
    )
    return f"{dev}, torch {torch.__version__}"


def _ablation(argv: list[str]) -> Path:
    """`--ablation NAME [its options]`: hand the rest of the command line to that ablation."""
    rest, name, i = [], None, 0
    while i < len(argv):
        a = argv[i]
        if a == "--ablation":
            name, i = (argv[i + 1] if i + 1 < len(argv) else None), i + 2
            continue
        if a.startswith("--ablation="):
            name = a.split("=", 1)[1]
        else:
            rest.append(a)
        i += 1
    if name != "negatives":
        raise UserError(f"--ablation takes: negatives (got {name!r})")
    from fastvpd import ablation

    return ablation.main(rest)


if __name__ == "__main__":
    main()

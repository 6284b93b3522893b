"""`python -m fastvpd.demo --ablation negatives`: does the margin make MoCo less sensitive to the number of
negatives? The paper's second claim, on the embedded digits (CPU).

For every queue size K (`--queues`), margin (`--margins`) and seed (`--seeds`): MoCo v2 pretraining on the
digits' training images (labels unused), then two measurements of its backbone on the test split:
- kNN top-1: the pretraining's own weighted-kNN monitor, run once after the last epoch, with the training
  images' features as the bank and the test images as the queries;
- linear probe top-1: `fastvpd.linear` (frozen backbone, a trained fc) on the training images, evaluated
  on the test split by `fastvpd.evaluate`.

Writes OUT/results.json (every run, and mean ± std per K and margin), OUT/results.md (the table) and
OUT/results.png (top-1 against K, one line per margin); `--readme FILE` writes the table between the
`<!-- ablation-results:begin/end -->` markers (added at the end of FILE when absent). Runs resume: a finished
run keeps its OUT/K<K>_m<margin>/seed<S>/result.json, an interrupted one resumes from its checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

from fastvpd.config import UserError
from fastvpd.demo import (
    DemoInterrupted,
    _banner,
    _config,
    _cpu_desc,
    _finished,
    _last_ckpt,
    make_data,
    splice_readme,
)

MARK_BEGIN, MARK_END = "<!-- ablation-results:begin -->", "<!-- ablation-results:end -->"
QUEUES, MARGINS, SEEDS = (64, 512, 4096), (0.0, 0.4), (0, 1, 2)
# The sweep's size, chosen so its 18 runs fit an hour on a shared 2-core CPU (`--jobs 2` or 3, one thread
# each): the demo's pretraining (ResNet-18, batch 64, its weaker views) at 16 px (the digits are 8x8 at
# source: 16 px keeps all of it, at a quarter of the demo's pixels), EPOCHS epochs at the paper's rate 0.03
# per 256 (the digits' loss leaves its plateau sooner at that rate than at the demo's 0.24), and the
# demo's 10-epoch linear probe. With 448 keys enqueued per epoch, a queue of 4096 is not yet all real keys
# after 8 epochs: its oldest 512 rows are still the random initial ones.
EPOCHS, RES, LR = 8, 16, 0.03


@dataclass
class RunResult:
    queue: int
    margin: float
    seed: int
    knn_top1: float
    linear_top1: float
    seconds: float  # wall time of pretraining + probe + evaluation (this machine, shared or not)
    cpu_seconds: float  # this process's CPU time for the same work


def _run_dir(out: Path, queue: int, margin: float, seed: int) -> Path:
    return out / f"K{queue}_m{margin:g}" / f"seed{seed}"


def _knn_top1(pre_dir: Path, epochs: int) -> float:
    """The kNN top-1 logged after the last pretraining epoch (read back, so a resumed run has it too)."""
    rows = [json.loads(x) for x in (pre_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    last = [r["knn_top1"] for r in rows if "knn_top1" in r and r.get("epoch") == epochs]
    if not last:
        raise UserError(f"{pre_dir}/metrics.jsonl has no kNN result for epoch {epochs}")
    return float(last[-1])


def run_one(
    out: Path, data_root: Path, queue: int, margin: float, seed: int, epochs: int, extra: list[str]
) -> RunResult:
    """Pretrain (K=queue, m=margin), probe linearly, evaluate both on the test split; kept in result.json."""
    from fastvpd import evaluate, linear, pretrain

    run = _run_dir(out, queue, margin, seed)
    done = run / "result.json"
    if done.is_file():
        return RunResult(**json.loads(done.read_text()))
    run.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.perf_counter(), time.process_time()
    common = [f"data.root={data_root}", f"train.seed={seed}", "train.resume=auto", f"aug.res={RES}"]
    name = f"K={queue} m={margin:g} seed {seed}"
    pre_dir = _finished(
        pretrain.run(
            ["--config", _config("demo_digits_pretrain.yaml"), f"train.out_dir={run / 'pretrain'}",
             f"moco.queue_size={queue}", f"moco.margin={margin}", f"optim.lr={LR}", f"train.epochs={epochs}",
             f"eval.knn_every={epochs}", "data.val_split=test", f"ckpt.every={max(epochs // 4, 1)}",
             *common, *extra]
        ),
        f"{name} pretraining",
    )  # fmt: skip
    knn = _knn_top1(pre_dir, epochs)
    probe_dir = _finished(
        linear.run(
            ["--config", _config("demo_digits_linear.yaml"), f"train.out_dir={run / 'linear'}",
             f"linear.backbone={_last_ckpt(pre_dir)}", "eval.every=0", *common, *extra]
        ),
        f"{name} linear probe",
    )  # fmt: skip
    res = evaluate.main(
        [str(_last_ckpt(probe_dir)), "--data", str(data_root), "--split", "test", "--out", str(run / "test")]
    )
    result = RunResult(
        queue, margin, seed, knn, float(res["top1"]), time.perf_counter() - t0, time.process_time() - c0
    )
    done.write_text(json.dumps(asdict(result), indent=2) + "\n")
    return result


def _ms(vals: list[float]) -> tuple[float, float]:
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarise(results: list[RunResult]) -> list[dict]:
    """Mean ± std over seeds of each (K, margin): one row per pair, sorted by margin then K."""
    rows = []
    for m in sorted({r.margin for r in results}):
        for k in sorted({r.queue for r in results}):
            rs = [r for r in results if r.margin == m and r.queue == k]
            if not rs:
                continue
            lin, knn = _ms([r.linear_top1 for r in rs]), _ms([r.knn_top1 for r in rs])
            rows.append({"queue": k, "margin": m, "seeds": len(rs), "linear": lin, "knn": knn})
    return rows


def table(rows: list[dict], n_train: int, head: str) -> str:
    margins = sorted({r["margin"] for r in rows})
    cell = {(r["queue"], r["margin"]): r for r in rows}
    cols = [f"linear, m = {m:g}" for m in margins] + [f"kNN, m = {m:g}" for m in margins]
    lines = [head, "", "| queue K | keys per training image | " + " | ".join(cols) + " |"]
    lines.append("|---" * (2 + len(cols)) + "|")
    for k in sorted({r["queue"] for r in rows}):
        vals = []
        for metric in ("linear", "knn"):
            for m in margins:
                r = cell.get((k, m))
                vals.append(f"{r[metric][0]:.1f} ± {r[metric][1]:.1f}" if r else "–")
        lines.append(f"| {k} | {k / n_train:.2g} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def chart(rows: list[dict], path: Path) -> None:
    """Top-1 against K (log axis), one line per margin with ± std bars; linear probe and kNN side by side."""
    from fastvpd.extras import require

    plt = require("matplotlib.pyplot", "demo", "draw the ablation's chart")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, title in zip(axes, ("linear", "knn"), ("linear probe", "kNN (k=50)")):
        for m in sorted({r["margin"] for r in rows}):
            rs = sorted((r for r in rows if r["margin"] == m), key=lambda r: r["queue"])
            ax.errorbar(
                [r["queue"] for r in rs],
                [r[metric][0] for r in rs],
                yerr=[r[metric][1] for r in rs],
                marker="o",
                capsize=4,
                label=f"margin {m:g}" + (" (plain MoCo v2)" if m == 0 else ""),
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("queue size K (negatives)")
        ax.set_ylabel("test top-1 (%)")
        ax.set_title(f"{title}, mean ± std over seeds")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def update_readme(readme: Path, block: str) -> None:
    """Put `block` between the ablation markers; append a section with them when the file has none."""
    section = (
        "## Ablation: the margin and the number of negatives\n\n"
        "`python -m fastvpd.demo --ablation negatives --readme README.md` writes this table.\n\n"
    )
    splice_readme(readme, MARK_BEGIN, MARK_END, block, section)


def _floats(s: str, what: str) -> list[float]:
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{what} takes comma-separated numbers (got {s!r})") from None


def _run_or_stop(
    out: Path, data_root: Path, k: int, m: float, s: int, epochs: int, extra: list[str]
) -> RunResult:
    try:
        return run_one(out, data_root, k, m, s, epochs, extra)
    except DemoInterrupted as e:
        print(f"\nablation stopped: {e}", flush=True)
        raise SystemExit(130) from None


def _workers(argv: list[str], out: Path, jobs: int, threads: int, total: int) -> None:
    """Run the plan in `jobs` worker processes (logs in OUT/logs/), with a bar of finished runs."""
    from tqdm import tqdm

    (out / "logs").mkdir(parents=True, exist_ok=True)
    base, skip = [], False  # this command line less --jobs/--threads (the workers get their own)
    for a in argv:
        if not skip and not a.startswith(("--jobs", "--threads")):
            base.append(a)
        skip = a in ("--jobs", "--threads")
    procs = []
    for i in range(jobs):
        log = open(out / "logs" / f"job{i}.log", "a")  # noqa: SIM115 (closed below)
        cmd = [sys.executable, "-m", "fastvpd.demo", "--ablation", "negatives", *base,
               "--part", f"{i}/{jobs}", "--threads", str(threads), "log.progress=false"]  # fmt: skip
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
    print(f"{jobs} jobs of {threads} thread(s); their logs: {out / 'logs'}", flush=True)
    bar = tqdm(total=total, desc="runs", unit="run")
    try:
        while any(p.poll() is None for p, _ in procs):
            bar.update(len(list(out.glob("K*_m*/seed*/result.json"))) - bar.n)
            time.sleep(5)
        bar.update(len(list(out.glob("K*_m*/seed*/result.json"))) - bar.n)
    finally:
        bar.close()
        for p, log in procs:
            if p.poll() is None:  # interrupted here: the workers got the same signal; let them save
                p.wait()
            log.close()
    codes = [p.returncode for p, _ in procs]
    if 130 in codes or any(c < 0 for c in codes):
        print("\nablation stopped: a job was interrupted; run the same command again to resume", flush=True)
        raise SystemExit(130)
    if any(codes):
        bad = next(i for i, c in enumerate(codes) if c)
        raise UserError(
            f"ablation job {bad} failed (exit {codes[bad]}): see {out / 'logs' / f'job{bad}.log'}"
        )


def main(argv: list[str]) -> Path:
    ap = argparse.ArgumentParser(
        prog="python -m fastvpd.demo --ablation negatives", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument(
        "--out", default="runs/ablation-negatives", help="run folder (default runs/ablation-negatives)"
    )
    ap.add_argument(
        "--queues", default=",".join(map(str, QUEUES)), help="queue sizes K (default 64,512,4096)"
    )
    ap.add_argument(
        "--margins", default="0,0.4", help="margins m (default 0,0.4: plain MoCo v2 and the paper's)"
    )
    ap.add_argument("--seeds", default="0,1,2", help="seeds per (K, m) (default 0,1,2)")
    ap.add_argument(
        "--epochs", type=int, default=EPOCHS, help=f"pretraining epochs per run (default {EPOCHS})"
    )
    ap.add_argument("--jobs", type=int, default=1, help="runs side by side, in worker processes (default 1)")
    ap.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads per job (default: cores / jobs)"
    )
    ap.add_argument("--part", default=None, help=argparse.SUPPRESS)  # i/N: a --jobs worker's share
    ap.add_argument("--readme", default=None, help="write the table between this file's ablation markers")
    ap.add_argument("overrides", nargs="*", help="key=value overrides for every run (e.g. train.device=cpu)")
    args = ap.parse_intermixed_args(argv)  # a worker's command line puts overrides on both sides of --part
    queues = [int(q) for q in _floats(args.queues, "--queues")]
    margins, seeds = _floats(args.margins, "--margins"), [int(s) for s in _floats(args.seeds, "--seeds")]
    if not queues or not margins or not seeds or args.epochs <= 0 or min(queues) <= 0:
        raise UserError("--queues, --margins and --seeds need at least one value, queues and --epochs > 0")
    if args.jobs <= 0:
        raise UserError(f"--jobs must be > 0 (got {args.jobs})")
    threads = args.threads if args.threads > 0 else max(1, (os.cpu_count() or 1) // args.jobs)
    import torch

    torch.set_num_threads(threads)
    out = Path(args.out)
    t0 = time.perf_counter()
    plan = [(k, m, s) for k in queues for m in margins for s in seeds]  # a K's margins side by side
    if args.part:  # a worker: its share of the plan, no summary
        i, n = (int(x) for x in args.part.split("/"))
        data_root = out / "data" / "converted"
        for k, m, s in plan[i::n]:
            _banner(f"queue K={k}, margin {m:g}, seed {s}")
            _run_or_stop(out, data_root, k, m, s, args.epochs, list(args.overrides))
        return out
    _banner("0 embedded data: scikit-learn digits → ImageFolder → cache")
    data_root = make_data(out / "data", formats=("cache",))
    if args.jobs > 1:
        _workers(argv, out, args.jobs, threads, len(plan))
    from fastvpd.data.manifest import Manifest

    n_train = Manifest.load(data_root).count("train")
    results = []
    for i, (k, m, s) in enumerate(plan, start=1):
        _banner(f"{i}/{len(plan)} queue K={k}, margin {m:g}, seed {s}")
        r = _run_or_stop(out, data_root, k, m, s, args.epochs, list(args.overrides))
        print(f"K={k} m={m:g} seed {s}: linear {r.linear_top1:.1f}, kNN {r.knn_top1:.1f} ({r.seconds:.0f} s)")
        results.append(r)
    wall = time.perf_counter() - t0
    rows = summarise(results)
    head = (
        f"Digits, {n_train} training images (labels unused in pretraining), test split; top-1 (%), "
        f"mean ± std over {len(seeds)} seed(s). ResNet-18, {args.epochs} epochs of MoCo v2 at {RES} px, "
        f"batch 64, lr {LR} per 256, τ 0.2; linear probe 10 epochs. Machine: {_cpu_desc()}, "
        f"run {date.today()}, {wall / 60:.0f} min wall in this invocation."
    )
    md = table(rows, n_train, head)
    (out / "results.md").write_text(md + "\n")
    summary = [{**r, "linear": list(r["linear"]), "knn": list(r["knn"])} for r in rows]
    (out / "results.json").write_text(
        json.dumps(
            {
                "runs": [asdict(r) for r in results],
                "summary": summary,
                "epochs": args.epochs,
                "res": RES,
                "lr": LR,
                "train_images": n_train,
                "machine": _cpu_desc(),
                "wall_seconds": wall,
                "run_seconds": sum(r.seconds for r in results),
                "cpu_seconds": sum(r.cpu_seconds for r in results),
            },
            indent=2,
        )  # fmt: skip
        + "\n"
    )
    chart(rows, out / "results.png")
    if args.readme:  # the chart travels with the README (runs/ is not part of the repository)
        readme = Path(args.readme)
        png = readme.resolve().parent / "docs" / "ablation_results.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "results.png", png)
        update_readme(readme, md + "\n\n![ablation results](docs/ablation_results.png)")
    _banner(f"done in {wall:.0f} s")
    print(md)
    print(f"\nresults: {out / 'results.md'}  ·  {out / 'results.json'}  ·  chart: {out / 'results.png'}")
    return out

"""Restart trials under torchrun: does a 2-process run survive one worker killed mid-run?

Each trial runs `torchrun --standalone --nproc_per_node=2 --max-restarts=1 -m fastvpd.pretrain` on the
digits (converted here, once, into --work), waits for the checkpoint of epoch `--kill-epoch - 1`, lets the
next epoch start, SIGKILLs one worker (ranks alternate between trials), then waits for torchrun to exit.
A trial passes when torchrun exits 0, the log says the restarted group resumed from a checkpoint, and the
final checkpoint holds every step. Loopback only: torchrun's rendezvous binds 127.0.0.1 on a free port;
every trial is bounded by --trial-timeout (its whole process group is killed when it runs over).
--parallel N runs N trials side by side (each torchrun picks its own free rendezvous port).

    python benchmarks/torchrun_restarts.py --trials 10 --log benchmarks/results/torchrun-cpu-DATE/trials.log
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
# small enough for ~7 steps/epoch at a few seconds per epoch on 2 CPU cores
TRAIN = [
    "train.epochs=8",
    "ckpt.every=1",
    "ckpt.keep=2",
    "train.device=cpu",
    "train.deterministic=true",
    "eval.knn_every=0",
    "log.tensorboard=false",
    "log.progress=false",
    "log.every=1",
    "aug.res=8",
    "moco.queue_size=128",
    "moco.mlp_hidden=32",
    "moco.dim=16",
]


def digits(work: Path) -> Path:
    """The scikit-learn digits converted to the cache format under `work` (made once)."""
    out = work / "digits"
    if not (out / "manifest.json").is_file():
        sys.path.insert(0, str(ROOT))
        from fastvpd.convert import convert
        from fastvpd.datasets.digits import make_digits

        make_digits(work / "digits_src", seed=0)
        convert(work / "digits_src", out, formats=("cache",), workers=1, progress=False)
    return out


def workers(agent: psutil.Process) -> dict[int, psutil.Process]:
    """rank -> worker process of a torchrun agent."""
    out = {}
    for p in agent.children(recursive=True):
        try:
            env = p.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "RANK" in env and "fastvpd" in " ".join(p.cmdline()):
            out[int(env["RANK"])] = p
    return out


def steps_done(run: Path) -> int:
    """The newest checkpoint's step (0 when none)."""
    steps = [int(p.stem.split("_")[1]) for p in (run / "checkpoints").glob("step_*.pt")]
    return max(steps, default=0)


def trial(i: int, data: Path, work: Path, kill_rank: int, kill_epoch: int, timeout: float) -> dict:
    run = work / f"trial_{i:02d}"
    log = work / f"trial_{i:02d}.log"
    cmd = [
        *TORCHRUN,
        "--standalone",
        "--local-addr=127.0.0.1",
        "--nproc_per_node=2",
        "--max-restarts=1",
        "--monitor-interval=0.5",
        "-m",
        "fastvpd.pretrain",
        "--config",
        str(ROOT / "configs" / "demo_digits_pretrain.yaml"),
        f"data.root={data}",
        f"train.out_dir={run}",
        *TRAIN,
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": "lo",
        "PYTHONWARNINGS": "ignore::FutureWarning",
    }
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    agent = psutil.Process(proc.pid)
    killed, spe, rc = None, None, None
    try:
        while time.time() - t0 < timeout:
            rc = proc.poll()
            if rc is not None:
                break
            if killed is None:
                if spe is None and (run / "config.yaml").is_file():
                    spe = _steps_per_epoch(log)
                done = steps_done(run)
                if spe and done >= spe * (kill_epoch - 1):
                    time.sleep(0.5 * _epoch_seconds(run, spe))  # into the middle of the epoch
                    w = workers(agent)
                    if kill_rank in w:
                        w[kill_rank].send_signal(signal.SIGKILL)
                        killed = (kill_rank, _last_step(run), time.time() - t0)
            time.sleep(0.2)
        else:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = "timeout"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text(errors="replace")
    final = steps_done(run)
    resumed = "resumed from" in text
    ok = rc == 0 and killed is not None and resumed and spe is not None and final == spe * 8
    return {
        "trial": i,
        "ok": ok,
        "rc": rc,
        "killed_rank": killed and killed[0],
        "killed_after_step": killed and killed[1],
        "killed_at_s": killed and round(killed[2], 1),
        "resumed": resumed,
        "final_step": final,
        "seconds": round(time.time() - t0, 1),
        "errors": [ln for ln in text.splitlines() if "rror" in ln and "Warning" not in ln][:5],
    }


def _steps_per_epoch(log: Path) -> int | None:
    for ln in log.read_text(errors="replace").splitlines():
        if "steps/epoch" in ln:
            return int(ln.split(" steps/epoch")[0].rsplit(" ", 1)[1])
    return None


def _last_step(run: Path) -> int:
    rows = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").is_file() else []
    return max((json.loads(r).get("step", 0) for r in rows if r.strip()), default=0)


def _epoch_seconds(run: Path, spe: int) -> float:
    """Seconds per epoch from the periodic checkpoints' times (2 s when only one is there)."""
    times = sorted(p.stat().st_mtime for p in (run / "checkpoints").glob("step_*.pt"))
    return min(10.0, times[-1] - times[-2]) if len(times) > 1 else 2.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--kill-epoch", type=int, default=3, help="1-based epoch in which a worker is killed")
    ap.add_argument("--trial-timeout", type=float, default=600.0)
    ap.add_argument("--parallel", type=int, default=1, help="trials run side by side")
    ap.add_argument("--work", type=Path, default=Path("/tmp/fastvpd_torchrun_trials"))
    ap.add_argument("--log", type=Path, default=None, help="append one JSON line per trial here")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    data = digits(a.work)
    passed = 0
    with ThreadPoolExecutor(a.parallel) as pool:  # trials side by side share nothing but the machine
        futs = [
            pool.submit(trial, i, data, a.work, i % 2, a.kill_epoch, a.trial_timeout) for i in range(a.trials)
        ]
        for fut in futs:
            r = fut.result()
            passed += r["ok"]
            line = json.dumps(r)
            print(line, flush=True)
            if a.log:
                a.log.parent.mkdir(parents=True, exist_ok=True)
                with open(a.log, "a") as f:
                    f.write(line + "\n")
    summary = f"{passed}/{a.trials} trials resumed and finished"
    print(summary)
    if a.log:
        with open(a.log, "a") as f:
            f.write(summary + "\n")
    sys.exit(0 if passed == a.trials else 1)


if __name__ == "__main__":
    main()

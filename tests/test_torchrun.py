"""`fastvpd.pretrain` under real torchrun launchers, 2 CPU processes (gloo), loopback only.

- A rank SIGKILLed mid-epoch under `--max-restarts=1`: torchrun restarts the group, the group forms again
  (before the fix in `dist.init`, the restarted ranks often read the dead generation's addresses from
  torchrun's shared store: "Gloo connectFullMesh failed ... Connection refused") and the run resumes
  from its last checkpoint to the same final state as an uninterrupted 2-process run, bit for bit.
- SIGTERM to every rank (at different steps): the ranks agree on one stopping step and write one
  checkpoint, equal to the uninterrupted run's state at that step; exit 0.
- Two "nodes" (two torchrun launchers, c10d rendezvous on 127.0.0.1) take the same steps as one process.

Each torchrun runs this file as its worker script: `python tests/test_torchrun.py FAULT MODULE ARGS...`
patches the trainer so that a rank kills or signals itself at an exact step (see `_install_fault`), or
`step OUT` runs test_dist's two-rank MoCo steps. Every launcher is bounded by TIMEOUT_S (its process group
is killed past it), binds 127.0.0.1 (`--local-addr`, `GLOO_SOCKET_IFNAME=lo`) and picks free ports.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_data import converted_tree

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240
pytestmark = pytest.mark.slow


# ------------------------------------------------------------------------------------ inside the workers
def _install_fault(spec: str) -> None:
    """kill:R:N = rank R SIGKILLs itself inside its N-th step, in torchrun's first generation only;
    term:N0,N1 = rank r sends itself SIGTERM inside its N_r-th step; none = no fault."""
    from fastvpd.step import Precision

    kind, _, arg = spec.partition(":")
    rank = int(os.environ["RANK"])
    if kind == "kill":
        who, n = map(int, arg.split(":"))
        if rank != who or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
            return
        sig = signal.SIGKILL
    elif kind == "term":
        n, sig = int(arg.split(",")[rank]), signal.SIGTERM
    else:
        return
    real, count = Precision.backward_step, {"n": 0}

    def backward_step(self: Any, *a: Any, **k: Any) -> Any:
        count["n"] += 1
        if count["n"] == n:
            os.kill(os.getpid(), sig)
        return real(self, *a, **k)

    Precision.backward_step = backward_step  # type: ignore[method-assign]


def _child_main(argv: list[str]) -> None:
    if argv[0] == "step":
        sys.path.insert(0, str(Path(__file__).parent))
        from test_dist import ddp_steps

        ddp_steps(int(os.environ["RANK"]), argv[1])
        return
    import runpy

    spec, module, *args = argv
    _install_fault(spec)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


# ------------------------------------------------------------------------------------------- launchers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(launch: list[str], worker: list[str], log: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",  # bit-exact comparisons need one thread count in every run
        "GLOO_SOCKET_IFNAME": "lo",
        "PYTHONWARNINGS": "ignore::FutureWarning",
        "PYTHONPATH": str(ROOT),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--local-addr=127.0.0.1", "--monitor-interval=0.2"]
    with open(log, "w") as f:
        return subprocess.Popen(
            [*cmd, *launch, str(Path(__file__).resolve()), *worker],
            cwd=ROOT,
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # the whole tree can be killed on timeout
        )


def _wait(p: subprocess.Popen, log: Path, deadline: float) -> tuple[int, str]:
    try:
        rc = p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        rc = -999
    text = log.read_text(errors="replace")
    assert rc != -999, f"torchrun ran past {TIMEOUT_S} s:\n{text[-3000:]}"
    return rc, text


def _standalone(spec: str, args: list[str], log: Path) -> subprocess.Popen:
    """One torchrun, 2 workers, one restart allowed, rendezvous on a free loopback port."""
    launch = ["--standalone", "--nproc_per_node=2", "--max-restarts=1"]
    return _torchrun(launch, [spec, "fastvpd.pretrain", *args], log)


# ------------------------------------------------------------------------------------------------ runs
COMMON = [
    "model.arch=resnet18",
    "model.small_stem=true",
    "aug.res=8",
    "train.batch_size=16",  # 8 per rank: 3 steps per epoch on 48 images
    "train.epochs=3",
    "train.device=cpu",
    "train.deterministic=true",
    "train.amp=none",
    "log.every=3",  # the ranks agree on a stop only at these reads: here, epoch ends
    "log.tensorboard=false",
    "log.progress=false",
    "ckpt.every=1",
    "ckpt.keep=3",
    "moco.queue_size=64",
    "moco.mlp_hidden=16",
    "moco.dim=16",
    "eval.knn_every=0",
]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 train / 6 val 12-px images in 3 classes, converted to the cache."""
    return converted_tree(tmp_path_factory, "tr", {"train": 16, "val": 2}, classes=3, size=12, tint=True)


def _two_nodes(out: Path, logs: list[Path]) -> list[subprocess.Popen]:
    """Two launchers, one process each, c10d rendezvous on a free 127.0.0.1 port: test_dist's steps."""
    port = _free_port()
    launch = [
        "--nnodes=2",
        "--nproc_per_node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        f"--rdzv-id=fastvpd-test-{port}",
    ]
    return [_torchrun(launch, ["step", str(out)], log) for log in logs]


@pytest.fixture(scope="module")
def runs(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every launch of this file, side by side (their waits overlap): name -> (run dir or output file,
    torchrun exit code, its output)."""
    base = tmp_path_factory.mktemp("torchrun")
    specs = {
        "reference": "none",
        "killed": "kill:1:5",  # rank 1 dies inside step 5 (epoch 2); the epoch-1 checkpoint is step 3
        "sigterm": "term:4,5",  # rank 0 signalled in step 4, rank 1 in step 5: they stop together at 6
    }
    procs = {}
    for name, spec in specs.items():
        args = [f"data.root={tiny_data}", f"train.out_dir={base / name}", *COMMON]
        procs[name] = (base / name, _standalone(spec, args, base / f"{name}.log"), base / f"{name}.log")
    logs = [base / f"node{i}.log" for i in range(2)]
    for i, p in enumerate(_two_nodes(base / "ddp.pt", logs)):
        procs[f"node{i}"] = (base / "ddp.pt", p, logs[i])
    deadline = time.monotonic() + TIMEOUT_S
    return {name: (where, *_wait(p, log, deadline)) for name, (where, p, log) in procs.items()}


def _diff(a: Any, b: Any, where: str = "") -> list[str]:
    if isinstance(a, torch.Tensor):
        same = isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
        return [] if same else [where]
    if isinstance(a, dict):
        if not isinstance(b, dict) or set(a) != set(b):
            return [f"{where} (keys)"]
        return [d for k in a for d in _diff(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, list | tuple):
        if not isinstance(b, list | tuple) or len(a) != len(b):
            return [f"{where} (length)"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _diff(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def _load(path: Path) -> dict[str, Any]:
    from fastvpd import checkpoint

    state = checkpoint.load(path)
    for r in state["ranks"]:  # bookkeeping: where the last set_epoch started, never read back
        r["loader"].pop("start_step", None)
    return state


# ----------------------------------------------------------------------------------------------- tests
def test_killed_rank_restarts_group_and_matches_uninterrupted_run(runs: dict) -> None:
    ref, rc, out = runs["reference"]
    assert rc == 0, out[-3000:]
    run, rc, out = runs["killed"]
    assert rc == 0, out[-3000:]
    assert "connectFullMesh" not in out
    # only a restarted group resumes: the kill happened, and the new generation formed
    assert f"resumed from {run / 'checkpoints' / 'last.pt'} at epoch 2, step 3" in out
    a, b = _load(run / "checkpoints" / "last.pt"), _load(ref / "checkpoints" / "last.pt")
    assert a["progress"]["global_step"] == 9
    diffs = [d for key in ("task", "progress", "ranks") for d in _diff(a[key], b[key], key)]
    assert not diffs, f"{len(diffs)} differences, e.g. {diffs[:8]}"


def test_sigterm_to_every_rank_gives_one_consistent_checkpoint(runs: dict) -> None:
    from fastvpd import checkpoint

    run, rc, out = runs["sigterm"]
    assert rc == 0, out[-3000:]  # both ranks returned normally: torchrun does not restart them
    assert "stopped (SIGTERM) at step 6" in out and out.count("stopped (") == 1
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["last.pt", "step_00000003.pt"], ckpts  # nothing torn, nothing else
    assert checkpoint.read_header(run / "checkpoints" / "last.pt")["global_step"] == 6
    stopped = _load(run / "checkpoints" / "last.pt")
    loaders = [r["loader"] for r in stopped["ranks"]]
    assert len(loaders) == 2 and loaders[0].get("epoch") == loaders[1].get("epoch")
    # the state both ranks stopped at is the uninterrupted run's at step 6 (its epoch-2 checkpoint)
    ref = _load(runs["reference"][0] / "checkpoints" / "step_00000006.pt")
    diffs = _diff(stopped["task"], ref["task"], "task")
    diffs += _diff([r["rng"] for r in stopped["ranks"]], [r["rng"] for r in ref["ranks"]], "rng")
    assert not diffs, diffs[:8]


def test_cpu_run_says_nothing_of_gpus_or_cuda_graphs(runs: dict) -> None:
    """A CPU run's messages describe the CPU run (they once promised a capture 'on a GPU')."""
    out = runs["reference"][2]
    assert "augmentation rendered inside the training step" in out
    lines = [ln for ln in out.splitlines() if "GPU" in ln or "CUDA graph" in ln or "cuda graph" in ln]
    assert not lines, lines


def test_two_nodes_on_localhost_step_equals_single_process(runs: dict) -> None:
    """Two launchers (`--nnodes=2 --rdzv-backend=c10d`) on 127.0.0.1: the steps equal one process's."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_dist import assert_equals_single_process

    for node in ("node0", "node1"):
        out, rc, text = runs[node]
        assert rc == 0, text[-3000:]
    assert_equals_single_process(torch.load(out, weights_only=True))


if __name__ == "__main__":
    _child_main(sys.argv[1:])

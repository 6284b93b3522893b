"""Two gloo processes (DDP on the query encoder, shuffle-BN keys, all-gathered enqueue) take the same steps
as one process on the same global batch.

BN needs care: one process normalises over the whole batch, two processes each over their half, and the
key encoder's shuffle groups samples differently. Both are correct MoCo, but not the same numbers. So the
comparison runs with every BN layer in eval mode (running statistics): then the only differences left are
what DDP/shuffle-BN/all-gather must get right — gradient averaging over ranks, the key shuffle and
unshuffle, the order of the gathered keys in the queue — and those must match to float tolerance.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

from fastvpd import dist
from fastvpd.config import OptimConfig
from fastvpd.moco import MoCo
from fastvpd.optim import build_sgd
from fastvpd.pretrain import _route_query_through_ddp
from fastvpd.step import DeviceMeters, Precision, moco_step, pin_lr

B, RES, STEPS = 8, 16, 2


def _setup(seed: int = 0) -> tuple[MoCo, torch.optim.Optimizer, torch.Tensor]:
    torch.manual_seed(seed)
    model = MoCo("resnet18", dim=16, mlp_hidden=32, queue_size=32, momentum=0.9, bn_splits=1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    lr = torch.tensor(0.1)
    opt = build_sgd(model.encoder_q.parameters(), OptimConfig(), lr)
    pin_lr(opt, lr)
    return model, opt, torch.randn(STEPS, 2, B, 3, RES, RES, generator=torch.Generator().manual_seed(1))


def ddp_steps(rank: int, out: str) -> None:
    """STEPS MoCo steps on this rank's half of every batch, in the process group `dist.init` joins (from
    RANK/WORLD_SIZE/MASTER_* as torchrun or `_worker` sets them); rank 0 saves weights and loss."""
    torch.set_num_threads(1)
    info = dist.init("cpu")
    assert info.world_size == 2 and info.rank == rank
    model, opt, data = _setup()
    _route_query_through_ddp(model, info.device)
    meters = DeviceMeters(["loss", "acc"], info.device)
    half = slice(rank * B // 2, (rank + 1) * B // 2)
    for s in range(STEPS):
        moco_step(model, opt, Precision("none", info.device), meters, data[s, 0, half], data[s, 1, half])
    m = meters.read()  # all-reduced over the two ranks
    if rank == 0:
        torch.save({"model": model.state_dict(), "loss": m["mean"]["loss"]}, out)
    dist.shutdown()


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank)
    )
    ddp_steps(rank, out)


def assert_equals_single_process(ddp: dict) -> None:
    """The saved two-process result equals STEPS single-process steps on the whole batches."""
    model, opt, data = _setup()
    meters = DeviceMeters(["loss", "acc"], torch.device("cpu"))
    for s in range(STEPS):
        moco_step(model, opt, Precision("none", torch.device("cpu")), meters, data[s, 0], data[s, 1])
    single = model.state_dict()
    assert abs(meters.read()["mean"]["loss"] - ddp["loss"]) < 1e-4
    assert (
        torch.equal(single["queue_ptr"], ddp["model"]["queue_ptr"]) and int(single["queue_ptr"]) == B * STEPS
    )
    for k, v in single.items():
        assert torch.allclose(v.float(), ddp["model"][k].float(), atol=2e-5, rtol=1e-4), k
    moved = [k for k in single if k.startswith("encoder_k.") and "weight" in k]
    assert any(not torch.equal(single[k], _setup()[0].state_dict()[k]) for k in moved)  # momentum did act


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_step_equals_single_process(tmp_path: Path) -> None:
    out = tmp_path / "ddp.pt"
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=2, join=True)
    assert_equals_single_process(torch.load(out, weights_only=True))


def _join_all(store: object, world: int, timeout_s: float = 20.0) -> list[str]:
    """Every rank's `_fresh_namespace` on `store`, ranks in threads started in reverse order."""
    from concurrent.futures import ThreadPoolExecutor
    from datetime import timedelta

    with ThreadPoolExecutor(world) as pool:
        futs = [
            pool.submit(dist._fresh_namespace, store, r, world, timedelta(seconds=timeout_s))
            for r in reversed(range(world))
        ]
        return [f.result(timeout=timeout_s + 5) for f in reversed(futs)]


def test_restarted_generation_agrees_on_a_namespace_no_earlier_one_wrote() -> None:
    """torchrun's agent keeps one store across restarts: a new generation must not pick up the old one's
    keys (the dead rank 0's echo, its token) and every rank must land in the same fresh namespace."""
    import torch.distributed as tdist

    store = tdist.HashStore()
    first = _join_all(store, 3)
    assert len(set(first)) == 1
    store.set(first[0] + "rank_0", b"127.0.0.1:1")  # what gloo's full mesh left: the old rank 0's address
    for _ in range(3):  # restarts: echo and ready keys of the previous generation are still there
        again = _join_all(store, 3)
        assert len(set(again)) == 1 and again[0] not in first
        assert not store.check([again[0] + "rank_0"])
        first = first + again


def test_join_gives_up_within_its_bound_naming_the_missing_rank() -> None:
    import time
    from datetime import timedelta

    import pytest
    import torch.distributed as tdist

    store = tdist.HashStore()
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"ranks \[1\] did not join"):
        dist._fresh_namespace(store, 0, 2, timedelta(seconds=0.5))
    with pytest.raises(RuntimeError, match="rank 0 did not answer"):
        dist._fresh_namespace(store, 1, 2, timedelta(seconds=0.5))
    assert time.monotonic() - t0 < 5

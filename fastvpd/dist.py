"""Process-group plumbing for `torchrun` (and plain single-process runs).

One module-level `DistInfo` so that the helpers below (`gather`, `all_reduce_mean`, ...) need no
arguments and are identities on a single process: trainers call them unconditionally.
NCCL on GPU, gloo on CPU. `torchrun --nproc_per_node=G -m fastvpd.pretrain ...` sets RANK/WORLD_SIZE/
LOCAL_RANK/MASTER_ADDR/MASTER_PORT, which `init` reads.

Restarts (`torchrun --max-restarts=N`): torchrun's agent keeps one TCPStore for the whole job and hands it
to every generation of workers, without a per-restart prefix. A process group formed directly on it reads
the previous generation's keys (gloo: the dead rank 0's address, "connectFullMesh failed ... Connection
refused"; NCCL: its old unique id), depending on which rank reaches the store first.
`TORCHELASTIC_RESTART_COUNT` does not tell generations apart either: agents count restarts each for
themselves (a node restarted by a membership change keeps its count). So `init` agrees on a fresh
namespace first (`_fresh_namespace`) and forms the group under it.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as tdist

from fastvpd.config import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


_INFO = DistInfo(0, 1, 0, torch.device("cpu"))


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """`train.device` → a torch.device: auto = the local GPU if there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA GPU is visible: use train.device=cpu or auto")
        return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    return torch.device("cpu")


# Bound on forming the group (every rank started and joined) and on one collective: a lost peer ends the
# run (torchrun restarts it) instead of leaving the others waiting for ever. torch's own default for gloo.
JOIN_TIMEOUT = timedelta(minutes=10)
COLLECTIVE_TIMEOUT = timedelta(minutes=30)
_POLL_S = 0.05


def _fresh_namespace(store: Any, rank: int, world: int, timeout: timedelta) -> str:
    """A store prefix that this generation of ranks agreed on and no earlier generation wrote under.

    Keys left by an earlier generation may still be in `store`, so nothing read from it can be trusted as
    current unless it answers something written now: each rank > 0 writes a random nonce; rank 0 draws a
    random token and echoes every nonce it reads with the token; a rank takes the token from the echo of
    its own nonce (only the live rank 0 can have written that) and confirms under the token (a fresh
    namespace, so the confirmation is current too). Rank 0 returns once every rank confirmed. The old
    generation is dead before torchrun starts the new one, so only one rank 0 is echoing.
    """
    deadline = time.monotonic() + timeout.total_seconds()

    def late(what: str) -> None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"rank {rank}: {what} within {timeout} (a process of the group did not start)")
        time.sleep(_POLL_S)

    if rank == 0:
        token = uuid.uuid4().hex
        pending = set(range(1, world))
        echoed: dict[int, bytes] = {}
        while pending:
            for r in sorted(pending):
                key = f"fastvpd/join/nonce/{r}"
                if store.check([key]):
                    nonce = store.get(key)
                    if echoed.get(r) != nonce:
                        store.set(f"fastvpd/join/ack/{r}", nonce + b" " + token.encode())
                        echoed[r] = nonce
                if store.check([f"fastvpd/{token}/ready/{r}"]):
                    pending.discard(r)
            if pending:
                late(f"ranks {sorted(pending)} did not join")
        return f"fastvpd/{token}/"
    nonce = uuid.uuid4().hex.encode()
    store.set(f"fastvpd/join/nonce/{rank}", nonce)
    ack_key = f"fastvpd/join/ack/{rank}"
    while True:
        if store.check([ack_key]):
            got, _, token = store.get(ack_key).partition(b" ")
            if got == nonce:
                break
        late("rank 0 did not answer")
    prefix = f"fastvpd/{token.decode()}/"
    store.set(f"{prefix}ready/{rank}", b"1")
    return prefix


def init(device: str = "auto") -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1 (idempotent); else single-process."""
    global _INFO
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    dev = pick_device(device, local)
    if world > 1 and not tdist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kw: dict[str, Any] = {"device_id": dev} if dev.type == "cuda" else {}
        store, rank, world = next(tdist.rendezvous("env://", rank, world, timeout=JOIN_TIMEOUT))
        prefix = _fresh_namespace(store, rank, world, JOIN_TIMEOUT)
        tdist.init_process_group(
            backend=backend,
            store=tdist.PrefixStore(prefix, store),
            rank=rank,
            world_size=world,
            timeout=COLLECTIVE_TIMEOUT,
            **kw,
        )
    if tdist.is_initialized():
        rank, world = tdist.get_rank(), tdist.get_world_size()
    _INFO = DistInfo(rank, world, local, dev)
    return _INFO


def info() -> DistInfo:
    return _INFO


def is_main() -> bool:
    return _INFO.rank == 0


def world_size() -> int:
    return _INFO.world_size


def gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenate `t` from every rank along dim 0 (rank order); identity on one process.

    Uses `all_gather_into_tensor` (one collective, CUDA-graph capturable under NCCL); no autograd.
    """
    if _INFO.world_size == 1:
        return t
    t = t.contiguous()
    out = torch.empty((_INFO.world_size * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
    tdist.all_gather_into_tensor(out, t)
    return out


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of `t` over ranks, in place (and returned); identity on one process."""
    if _INFO.world_size > 1:
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        t.div_(_INFO.world_size)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Max over ranks in place: used to agree on stop flags (signal, non-finite) at the log cadence."""
    if _INFO.world_size > 1:
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return t


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable, small: RNG states at checkpoint time); [obj] on one process."""
    if _INFO.world_size == 1:
        return [obj]
    out: list[Any] = [None] * _INFO.world_size
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (e.g. the resume checkpoint path chosen by rank 0)."""
    if _INFO.world_size == 1:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if _INFO.world_size > 1:
        tdist.barrier()


def shutdown() -> None:
    """Leave the process group (safe to call twice or without one)."""
    global _INFO
    if tdist.is_initialized():
        tdist.destroy_process_group()
    _INFO = DistInfo(0, 1, 0, _INFO.device)

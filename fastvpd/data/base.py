"""What every loader shares: the `Batch` it yields, `LoaderBase` (epochs, rank sharding, resume, seeds)
and the helpers around them."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fastvpd.config import UserError
from fastvpd.data.spec import AugSpec

_MASK64 = (1 << 64) - 1


@contextmanager
def torch_threads_kept() -> Iterator[None]:
    """Undo a third-party change of torch's intra-op thread count inside the block.

    Importing FFCV calls `torch.set_num_threads(1)` (ffcv.pipeline.compiler, at import time): without this,
    one `import ffcv` (the converter, the ffcv backend) leaves every later model step in the process on
    one core, roughly halving a CPU run's speed.
    """
    n = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


@dataclass
class Batch:
    """views: one tensor per view [N, 3, H, W] (channels-last, normalised); labels/indices: int64 [N].

    A loader whose views are rendered inside the training step (`CacheLoader.defer_views`) yields
    `views=[]` and the batch's augmentation seed in `seed`.
    """

    views: list[Tensor]
    labels: Tensor
    indices: Tensor
    seed: int | None = None


def views_in_step(loader: Any, say: Any = print) -> bool:
    """Let the training step render the views, where the loader supports it (cache backend, device
    placement, no AutoAugment).

    True: `loader` now yields index-only batches (`Batch.seed` set); the step must call
    `loader.seed_views(batch)` and render `loader.augment(batch.indices)` itself. False: ordinary batches,
    with one line saying why for a loader that could have.
    """
    if not hasattr(loader, "defer_views"):
        return False
    why = loader.defer_views()
    if why:
        say(f"augmentation rendered by the loader, not in the step: {why}")
        return False
    say("augmentation rendered inside the training step")
    return True


def render_then(loader: Any, fn: Any, n_views: int, indices: Tensor, *rest: Tensor) -> Any:
    """A training step that renders the batch's views from its indices first (`views_in_step`):
    `fn(*views[:n_views], *rest)`. Bound with functools.partial(render_then, loader, step, n_views) for
    `GraphedStep` (MoCo takes both views; distillation the first, as it does from an ordinary batch)."""
    return fn(*loader.augment(indices)[:n_views], *rest)


def mix_seed(*parts: int) -> int:
    """Deterministic 63-bit seed from integers (splitmix64 chain): (seed, epoch, rank, step) -> seed."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & _MASK64)) & _MASK64
        x = (x + 0x9E3779B97F4A7C15) & _MASK64
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        x = z ^ (z >> 31)
    return x & ((1 << 63) - 1)


def shard_indices(n: int, seed: int, epoch: int, rank: int, world_size: int, train: bool) -> Tensor:
    """This rank's sample order for an epoch (int64, CPU).

    Train: a permutation drawn from (seed, epoch) — identical on every rank — truncated to a multiple
    of world_size; rank r takes every world_size-th entry from r (like DistributedSampler with
    drop_last). Eval: sequential, strided the same way, nothing dropped.
    """
    if train:
        g = torch.Generator().manual_seed(mix_seed(seed, epoch))
        order = torch.randperm(n, generator=g)
        order = order[: (n // world_size) * world_size]
    else:
        order = torch.arange(n)
    return order[rank::world_size].contiguous()


def num_batches(per_rank: int, batch_size: int, train: bool) -> int:
    return per_rank // batch_size if train else -(-per_rank // batch_size)


class LoaderBase:
    """Shared epoch/rank/resume bookkeeping; subclasses implement `_iter(order_from_start_step)`."""

    gen: torch.Generator | None = None  # the augmentation's generator (cache, ffcv, dali)

    def __init__(
        self,
        spec: AugSpec,
        num_samples: int,
        num_classes: int,
        batch_size: int,
        device: torch.device,
        dtype: torch.dtype,
        seed: int,
        rank: int,
        world_size: int,
        train: bool,
    ) -> None:
        if batch_size <= 0:
            raise UserError(f"batch size must be > 0 (got {batch_size})")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world size {world_size}")
        self.spec = spec
        self.num_samples = num_samples
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.dtype = dtype
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.train = train
        self.epoch = 0
        self.start_step = 0
        per_rank = num_samples // world_size if train else len(range(rank, num_samples, world_size))
        self._per_rank = per_rank
        if train and num_batches(per_rank, batch_size, train) == 0:
            raise UserError(
                f"batch size {batch_size} is larger than the {per_rank} training samples per rank: "
                "lower train.batch_size"
            )

    def __len__(self) -> int:
        return num_batches(self._per_rank, self.batch_size, self.train)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Reshuffle from (seed, epoch); the next iteration starts at batch `start_step` (resume)."""
        if start_step < 0 or start_step > len(self):
            raise UserError(f"start_step {start_step} is outside the epoch ({len(self)} batches)")
        self.epoch = epoch
        self.start_step = start_step

    def order(self) -> Tensor:
        """This rank's sample indices for the epoch from `start_step` on (train: whole batches only)."""
        idx = shard_indices(self.num_samples, self.seed, self.epoch, self.rank, self.world_size, self.train)
        idx = idx[: len(self) * self.batch_size] if self.train else idx
        return idx[self.start_step * self.batch_size :]

    def step_seed(self, step: int) -> int:
        """Augmentation seed of one batch: a function of (seed, epoch, rank, step), so resume is exact."""
        return mix_seed(self.seed, self.epoch, self.rank, step)

    def state_dict(self) -> dict[str, Any]:
        state = {"seed": self.seed, "epoch": self.epoch, "start_step": self.start_step, "rank": self.rank}
        if self.gen is not None:  # the augmentation's generator, where the loader draws from one
            state["generator"] = self.gen.get_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        self.set_epoch(int(state["epoch"]), int(state.get("start_step", 0)))
        if self.gen is not None and "generator" in state:
            g = state["generator"]
            self.gen.set_state(g.cpu() if hasattr(g, "cpu") else g)

    def __iter__(self) -> Iterator[Batch]:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the loader holds beyond its memory (worker processes); nothing by default.
        `engine.launch` calls it when a run ends."""


def measure_loader(loader: Any, batches: int, warmup: int = 2) -> dict[str, float]:
    """Throughput of a loader: samples/s over `batches` batches after `warmup` (device-synchronised)."""

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    it = iter(loader)
    for _ in range(warmup):
        next(it)
    sync()
    t0 = time.perf_counter()
    n = done = 0
    views = 0
    for _ in range(batches):
        try:
            b = next(it)
        except StopIteration:
            break
        n += int(b.labels.shape[0])
        views = len(b.views)
        done += 1
    sync()
    dt = time.perf_counter() - t0
    return {
        "samples_per_s": n / dt if dt > 0 else float("nan"),
        "images_per_s": n * views / dt if dt > 0 else float("nan"),
        "batches": float(done),
        "seconds": dt,
        "views": float(views),
    }

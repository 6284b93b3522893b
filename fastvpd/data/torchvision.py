"""The `torchvision` backend: the reference MoCo loader (PIL + torchvision.transforms + DataLoader workers).

Reads the source JPEGs listed in OUT/<split>/files.txt under the manifest's source root, so it is the
baseline every faster backend is compared with. The transforms are built from the same AugSpec.
Each sample's augmentation is seeded from (seed, epoch, sample index), so batches are reproducible
regardless of the number of workers and resume at start_step is exact.

Worker lifetime: the DataLoader's workers persist across epochs until `close()` (idempotent; iterating
again starts new ones) or until the loader is freed. Nothing in the loader points back at it (the sampler
holds a weak reference), so dropping the last reference stops its workers at once, not at a later garbage
collection (which could run anywhere, even inside a later loader's forked workers, which inherit the
garbage). Each worker runs in a process group of its own (`_worker_init`), so a signal sent to the
trainer's whole process group (Ctrl-C in a terminal, `timeout`, `kill -TERM -PGID`) reaches only the
trainer: the engine turns SIGTERM/SIGINT into a checkpoint at the next step, and that step still gets
its batch. Before, the workers died of such a signal (torch's worker handler lets only the parent's
SIGTERM end them quietly), and the trainer, which survives SIGTERM during `fit`, then failed with
"DataLoader worker (pid N) is killed by signal: Terminated". Workers still stop when the trainer
shuts them down or exits (torch's watchdog), or when it sends them SIGTERM itself.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from fastvpd.config import UserError
from fastvpd.data.base import Batch, LoaderBase, mix_seed
from fastvpd.data.spec import AugSpec, RandomResizedCrop, ResizeCenterCrop, ViewSpec


def view_transform(view: ViewSpec) -> Any:
    """torchvision.transforms pipeline of one view (MoCo v2 'aug_plus' order)."""
    ops: list[Any] = []
    if isinstance(view.crop, RandomResizedCrop):
        ops.append(T.RandomResizedCrop(view.res, scale=view.crop.scale, ratio=view.crop.ratio))
    else:
        ops.append(T.Resize(view.crop.resize))
    if view.autoaugment:
        ops.append(T.AutoAugment(T.AutoAugmentPolicy.IMAGENET))
    if view.jitter is not None:
        j = view.jitter
        ops.append(T.RandomApply([T.ColorJitter(j.brightness, j.contrast, j.saturation, j.hue)], p=j.p))
    if view.grayscale_p > 0:
        ops.append(T.RandomGrayscale(p=view.grayscale_p))
    if view.blur is not None:
        ops.append(
            T.RandomApply([T.GaussianBlur(view.blur.kernel_size(view.res), view.blur.sigma)], p=view.blur.p)
        )
    if view.hflip_p > 0:
        ops.append(T.RandomHorizontalFlip(view.hflip_p))
    post = [T.ToTensor(), T.Normalize(view.normalize.mean, view.normalize.std)]
    if isinstance(view.crop, ResizeCenterCrop) and view.crop.ten_crop:
        ops.append(T.TenCrop(view.res))
        tail = T.Compose(post)
        ops.append(T.Lambda(lambda crops: [tail(c) for c in crops]))
    else:
        if isinstance(view.crop, ResizeCenterCrop):
            ops.append(T.CenterCrop(view.res))
        ops += post
    return T.Compose(ops)


class MultiView:
    """TwoCropsTransform generalised: each view of the spec drawn independently -> list of tensors."""

    def __init__(self, spec: AugSpec) -> None:
        self.transforms = [view_transform(v) for v in spec.views]

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for t in self.transforms:
            r = t(img)
            out.extend(r if isinstance(r, list) else [r])
        return out


class FileListDataset(Dataset):
    """(views, label, index) of the files in files.txt, augmentation seeded per (seed, epoch, index)."""

    def __init__(self, root: Path, items: list[tuple[str, int]], transform: MultiView, seed: int) -> None:
        self.root, self.items, self.transform, self.seed = root, items, transform, seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> tuple[list[torch.Tensor], int, int]:
        i, epoch = key  # (sample index, epoch): see _ListSampler
        rel, label = self.items[i]
        path = self.root / rel
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except OSError as e:
            raise UserError(f"cannot read {path} ({e}): the source tree changed since conversion") from None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(self.seed, epoch, i))
            views = self.transform(img)
        return views, label, i


def read_files_txt(path: Path) -> list[tuple[str, int]]:
    items = []
    for line in path.read_text().splitlines():
        if line.strip():
            rel, label = line.rsplit(" ", 1)
            items.append((rel, int(label)))
    return items


class _ListSampler(torch.utils.data.Sampler):
    """The owner's order for its current epoch, as (index, epoch) keys: persistent workers keep the copy of
    the dataset they started with, so the epoch (which seeds the augmentation) travels with each index.

    It holds its owner weakly: owner -> DataLoader -> workers' iterator -> sampler -> owner would be a
    reference cycle, and a loader in a cycle keeps its workers until some later garbage collection."""

    def __init__(self, owner: LoaderBase) -> None:
        self._owner = weakref.ref(owner)

    @property
    def owner(self) -> LoaderBase:
        owner = self._owner()
        if owner is None:
            raise RuntimeError("the TorchvisionLoader that owns this sampler was freed")
        return owner

    def __iter__(self) -> Iterator[tuple[int, int]]:
        owner = self.owner
        epoch = owner.epoch
        return iter([(i, epoch) for i in owner.order().tolist()])

    def __len__(self) -> int:
        return len(self.owner.order())


def _worker_init(worker_id: int) -> None:
    """DataLoader worker_init_fn: leave the trainer's process group (see the module docstring)."""
    try:
        os.setpgid(0, 0)
    except OSError:  # not permitted here (e.g. a session leader): keep the old behaviour
        pass


# Batches queued per worker. torch's default (and the reference MoCo loader's) is 2: each worker always has
# its next batch queued while it renders the current one, so it never idles while the trainer keeps up.
# More only absorbs trainer stalls longer than a whole batch time and costs memory: each queued batch is
# rendered into shared memory and then copied to pinned memory, so 16 workers x 4 batches of 256 x two
# float32 224 px views (308 MB a batch) could hold ~20 GB of /dev/shm plus up to as much pinned host
# memory whenever the trainer paused (warm-up, CUDA graph capture, checkpoint); at 2 it is ~10 GB.
# This backend is the CPU-bound baseline (the trainer takes far less time over a batch than a worker
# takes to render it), so in the steady state the queue is empty whatever its depth.
PREFETCH_FACTOR = 2


class TorchvisionLoader(LoaderBase):
    """DataLoader over the source images with the shared rank sharding (DistributedSampler-like)."""

    def __init__(
        self,
        manifest: Any,
        split: str,
        spec: AugSpec,
        batch_size: int,
        device: torch.device,
        dtype: torch.dtype,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        train: bool = True,
        workers: int = 0,
    ) -> None:
        src = manifest.src
        if src is None or not Path(src).is_dir():
            raise UserError(
                f"data.backend=torchvision reads the source images, but the manifest's source {src} is not a "
                "folder: restore it, or use data.backend=cache"
            )
        items = read_files_txt(manifest.path(split, "files"))
        if len(items) != manifest.count(split):
            raise UserError(
                f"{manifest.path(split, 'files')} does not match the manifest: re-run the converter"
            )
        super().__init__(
            spec, len(items), manifest.num_classes, batch_size, device, dtype, seed, rank, world_size, train
        )
        self.dataset = FileListDataset(Path(src), items, MultiView(spec), seed)
        self.workers = workers if workers > 0 else max(1, (torch.multiprocessing.cpu_count() or 2) - 1)
        self._dl: DataLoader | None = None

    def __iter__(self) -> Iterator[Batch]:
        if self._dl is None:
            # persistent workers: MoCo's loader forks its workers again every epoch, which on the VIPriors
            # subset (195 batches of 256) idles the step for about one batch time per epoch
            self._dl = DataLoader(
                self.dataset,
                batch_size=self.batch_size,
                sampler=_ListSampler(self),
                num_workers=self.workers,
                pin_memory=self.device.type == "cuda",
                drop_last=self.train,
                worker_init_fn=_worker_init if self.workers > 0 else None,
                persistent_workers=self.workers > 0,
                prefetch_factor=PREFETCH_FACTOR if self.workers > 0 else None,
            )
        dl = self._dl
        for views, labels, indices in dl:
            out = [
                v.to(self.device, non_blocking=True).to(dtype=self.dtype, memory_format=torch.channels_last)
                for v in views
            ]
            yield Batch(
                out, labels.to(self.device, non_blocking=True), indices.to(self.device, non_blocking=True)
            )
            if self._dl is not dl:  # closed meanwhile: its workers are gone
                raise RuntimeError("this TorchvisionLoader was closed while an iteration of it was running")

    def close(self) -> None:
        """Stop the worker processes now (idempotent). Iterating again later starts new ones."""
        dl, self._dl = self._dl, None
        it = getattr(dl, "_iterator", None) if dl is not None else None
        if it is not None:
            dl._iterator = None
            it._shutdown_workers()  # torch's own shutdown: pin thread, done event, join, terminate stragglers

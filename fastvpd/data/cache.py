"""The `cache` backend: decoded pixels resident on the device, every augmentation batched in torch.

`OUT/<split>/cache/pixels.npy` (uint8 [P, 3], all images' HWC pixels back to back) and `meta.npz`
(offsets, heights, widths, labels) are loaded once. Placement:

* device  — the whole store on the training device (GPU when it fits with headroom; on CPU the
            memory-mapped file itself, paged in by the OS). A batch is then a pure device function of
            its indices (`augment`), with no host work and no sync. On CPU the same draws are rendered
            by the per-sample numba kernel (augment/cpu.py) over torch.get_num_threads() threads when
            numba is installed (same pixels to float rounding, a fraction of the batched ops' work).
* host    — the store does not fit the GPU: it stays in (pinned, if `pin_host`) host memory; a worker
            thread gathers the next batch's images into a pinned staging buffer and copies them to a
            device buffer on a side stream one batch ahead; the same resampling runs on that buffer.
"""

from __future__ import annotations

import queue
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fastvpd.config import UserError
from fastvpd.data.augment import PixelAugmenter
from fastvpd.data.base import Batch, LoaderBase
from fastvpd.data.spec import AugSpec

GPU_HEADROOM_FRACTION = 0.35  # of total GPU memory kept free for the model when placing the cache
GPU_HEADROOM_MIN = 6 << 30
UPLOAD_CHUNK_ROWS = 1 << 24  # 48 MiB of pixels per host->device chunk while loading


def load_cache(cache_dir: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(memory-mapped pixels [P, 3] uint8, meta arrays); UserError naming the fix when unreadable."""
    fix = "re-run `python -m fastvpd.convert SRC OUT --formats cache --force`"
    try:
        pixels = np.load(cache_dir / "pixels.npy", mmap_mode="r")
        with np.load(cache_dir / "meta.npz") as z:
            meta = {k: np.asarray(z[k]) for k in ("offsets", "heights", "widths", "labels")}
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot read the pixel cache in {cache_dir} ({e}): {fix}") from None
    if pixels.dtype != np.uint8 or pixels.ndim != 2 or pixels.shape[1] != 3:
        raise UserError(
            f"{cache_dir}/pixels.npy is not uint8 [P, 3] (got {pixels.dtype} {pixels.shape}): {fix}"
        )
    end = meta["offsets"].astype(np.int64) + meta["heights"].astype(np.int64) * meta["widths"].astype(
        np.int64
    )
    if len(end) and int(end.max()) > pixels.shape[0]:
        raise UserError(f"{cache_dir}/meta.npz points past the end of pixels.npy: {fix}")
    return pixels, meta


def _fits_gpu(nbytes: int, device: torch.device) -> bool:
    free, total = torch.cuda.mem_get_info(device)
    return nbytes + max(GPU_HEADROOM_MIN, int(GPU_HEADROOM_FRACTION * total)) <= free


def _upload(pixels: np.ndarray, device: torch.device) -> Tensor:
    """Copy the memory-mapped store to the GPU in chunks (never holding a second full host copy)."""
    out = torch.empty(pixels.shape, dtype=torch.uint8, device=device)
    staging = torch.empty(
        (min(UPLOAD_CHUNK_ROWS, max(1, pixels.shape[0])), 3), dtype=torch.uint8
    ).pin_memory()
    for s in range(0, pixels.shape[0], UPLOAD_CHUNK_ROWS):
        e = min(s + UPLOAD_CHUNK_ROWS, pixels.shape[0])
        staging[: e - s].numpy()[:] = pixels[s:e]
        out[s:e].copy_(staging[: e - s])  # synchronous: staging is reused next chunk
    return out


def _as_tensor(a: np.ndarray) -> Tensor:
    with warnings.catch_warnings():  # read-only memmap: we never write through this tensor
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


class CacheLoader(LoaderBase):
    """Device-resident pixel cache + batched device augmentation (see module docstring)."""

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
        pin_host: bool = True,
        placement: str = "auto",
        aug_kernel: str = "auto",
    ) -> None:
        pixels, meta = load_cache(manifest.path(split, "cache"))
        n = len(meta["offsets"])
        if n != manifest.count(split):
            raise UserError(
                f"cache of split {split!r} has {n} images, the manifest says {manifest.count(split)}: "
                "re-run `python -m fastvpd.convert SRC OUT --formats cache --force`"
            )
        super().__init__(
            spec, n, manifest.num_classes, batch_size, device, dtype, seed, rank, world_size, train
        )
        dev = self.device
        if placement == "auto":
            placement = "device" if dev.type != "cuda" or _fits_gpu(pixels.nbytes, dev) else "host"
        if placement not in ("device", "host"):
            raise ValueError(f"placement must be auto, device or host (got {placement!r})")
        self.placement = placement
        self.gen = torch.Generator(device=dev)
        self.gen.manual_seed(self.step_seed(0))
        # small per-image metadata lives on the device in both placements
        self.offsets_host = meta["offsets"].astype(np.int64)
        self.sizes_host = meta["heights"].astype(np.int64) * meta["widths"].astype(np.int64)
        self.offsets = torch.from_numpy(self.offsets_host).to(dev)
        self.heights = torch.from_numpy(meta["heights"].astype(np.int64)).to(dev)
        self.widths = torch.from_numpy(meta["widths"].astype(np.int64)).to(dev)
        self.labels = torch.from_numpy(meta["labels"].astype(np.int64)).to(dev)
        if placement == "device":
            store = _upload(pixels, dev) if dev.type == "cuda" else _as_tensor(pixels)
            self.host_pixels: np.ndarray | None = None
        else:
            if pin_host and dev.type == "cuda":
                pinned = torch.empty(pixels.shape, dtype=torch.uint8).pin_memory()
                pinned.numpy()[:] = pixels
                self.host_pixels = pinned.numpy()
            else:
                self.host_pixels = pixels
            # a staging/device buffer big enough for the largest possible batch
            cap = int(np.sort(self.sizes_host)[-batch_size:].sum()) if n else 1
            store = torch.empty((cap, 3), dtype=torch.uint8, device=dev)
            self._cap = cap
        self.aug = PixelAugmenter(
            spec,
            store,
            self.offsets,
            self.heights,
            self.widths,
            dtype,
            self.gen,
            kernel=aug_kernel,
        )
        self.deferred = False  # defer_views(): batches carry indices + seed, the step renders the views

    # --------------------------------------------------------------------------------------- device API
    def augment(self, indices: Tensor) -> list[Tensor]:
        """Pure device function (device placement): the spec's views for sample indices (int64, on device)."""
        if self.placement != "device":
            raise RuntimeError("augment(indices) needs the device placement; iterate the loader instead")
        return self.aug.augment(indices)

    def defer_views(self) -> str:
        """Yield index-only batches (`views=[]`, `seed` set) whose views the training step renders.

        The step then calls `seed_views(batch)` on the host and `augment(batch.indices)` inside itself,
        so a CUDA graph captures the augmentation with the step (the generator is registered with the
        graph: `generators`). Same draws, same pixels as the loader rendering them. Returns '' when
        switched on, else why it cannot be.
        """
        if self.placement != "device":
            return "the pixel cache is in host memory (it does not fit on the device)"
        if any(v.autoaugment for v in self.spec.views):
            return "AutoAugment draws its policies on the host"
        self.deferred = True
        return ""

    def seed_views(self, batch: Batch) -> None:
        """Host side of a deferred batch: seed the augmentation generator (a graph replay reads it)."""
        if batch.seed is None:
            raise ValueError("seed_views needs a deferred batch (CacheLoader.defer_views)")
        self.gen.manual_seed(batch.seed)

    @property
    def generators(self) -> list[torch.Generator]:
        """Generators the augmentation draws from (to register with a CUDA graph that captures it)."""
        return [self.gen]

    # ------------------------------------------------------------------------------------------ iterate
    def __iter__(self) -> Iterator[Batch]:
        order = self.order()
        if self.placement == "device":
            yield from self._iter_device(order)
        else:
            yield from self._iter_host(order)

    def _batches(self, order: Tensor) -> list[Tensor]:
        return list(order.split(self.batch_size)) if len(order) else []

    def _iter_device(self, order: Tensor) -> Iterator[Batch]:
        dev_order = order.to(self.device, non_blocking=True)
        for k, idx in enumerate(self._batches(dev_order)):
            seed = self.step_seed(self.start_step + k)
            if self.deferred:
                yield Batch([], self.labels[idx], idx, seed)
                continue
            self.gen.manual_seed(seed)
            views = self.aug.augment(idx)
            yield Batch(views, self.labels[idx], idx)

    def _stage(self, idx: np.ndarray, buf: np.ndarray) -> tuple[int, np.ndarray]:
        """Gather the images of one batch into `buf` back to back; (rows used, local offsets)."""
        assert self.host_pixels is not None
        local = np.zeros(len(idx), dtype=np.int64)
        pos = 0
        for j, i in enumerate(idx):
            o, s = int(self.offsets_host[i]), int(self.sizes_host[i])
            buf[pos : pos + s] = self.host_pixels[o : o + s]
            local[j] = pos
            pos += s
        return pos, local

    def _iter_host(self, order: Tensor) -> Iterator[Batch]:
        """A thread stages batch k+1 (pinned host -> device, side stream) while batch k is augmented."""
        dev = self.device
        cuda = dev.type == "cuda"
        batches = [b.numpy() for b in self._batches(order)]
        nbuf = 2
        host = [torch.empty((self._cap, 3), dtype=torch.uint8, pin_memory=cuda) for _ in range(nbuf)]
        devbuf = [self.aug.pixels] + [torch.empty_like(self.aug.pixels) for _ in range(nbuf - 1)]
        copy_stream = torch.cuda.Stream(dev) if cuda else None
        copied = [torch.cuda.Event() if cuda else None for _ in range(nbuf)]
        consumed = [torch.cuda.Event() if cuda else None for _ in range(nbuf)]
        free = [threading.Semaphore(1) for _ in range(nbuf)]
        ready: queue.Queue = queue.Queue(maxsize=nbuf)
        stop = threading.Event()

        def worker() -> None:
            try:
                for k, idx in enumerate(batches):
                    slot = k % nbuf
                    while not free[slot].acquire(timeout=0.1):
                        if stop.is_set():
                            return
                    if stop.is_set():
                        return
                    rows, local = self._stage(idx, host[slot].numpy())
                    if cuda:
                        with torch.cuda.stream(copy_stream):
                            copy_stream.wait_event(consumed[slot])  # previous reader of devbuf[slot] done
                            devbuf[slot][:rows].copy_(host[slot][:rows], non_blocking=True)
                            copied[slot].record(copy_stream)
                        copied[slot].synchronize()  # host[slot] may be rewritten only after the copy
                    else:
                        devbuf[slot][:rows].copy_(host[slot][:rows])
                    ready.put((k, slot, local))
                ready.put(None)
            except BaseException as e:  # surface worker errors in the consumer
                ready.put(e)

        t = threading.Thread(target=worker, name="fastvpd-cache-stage", daemon=True)
        t.start()
        try:
            while True:
                item = ready.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                k, slot, local = item
                if cuda:
                    torch.cuda.current_stream(dev).wait_event(copied[slot])
                idx_host = torch.from_numpy(batches[k])
                idx = idx_host.to(dev, non_blocking=True)
                base = torch.from_numpy(local).to(dev, non_blocking=True)
                self.gen.manual_seed(self.step_seed(self.start_step + k))
                views = self.aug.render(devbuf[slot], base, self.heights[idx], self.widths[idx])
                if cuda:
                    consumed[slot].record(torch.cuda.current_stream(dev))
                free[slot].release()
                yield Batch(views, self.labels[idx], idx)
        finally:
            stop.set()
            t.join(timeout=5)

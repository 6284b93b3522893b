"""The `dali` backend: NVIDIA DALI decodes, crops, resizes and flips the views from the WebDataset shards;
the loader's device finishes them with the shared `augment.ViewFinisher` (jitter, grayscale, blur,
normalise), as the ffcv backend does.

Geometry of a view (all draws per sample by DALI's seeded random operators): each JPEG is decoded whole,
once ("mixed", nvJPEG, on a GPU; "cpu" otherwise), and every view is cut from it: random_resized_crop
(area/ratio/10 attempts = torchvision RRC, bilinear resize to res), or for eval views a resize of the
shorter side to `resize`; then crop_mirror_normalize into uint8 HWC (the flip with hflip_p, the eval
views' centre crop, no normalisation), so the torch view is channels-last NCHW without a copy. The
photometric draws come from a torch generator on the device seeded per batch from `step_seed` (resume is
exact); the rendering is the Triton kernels on a GPU where Triton loads, the numba kernel on a CPU, else
the torch reference; AutoAugment views run torchvision's AutoAugment eagerly on the device first.
Ten-crop eval is not rendered here (use cache or torchvision).

Epochs and sharding: DALI shards the stored samples contiguously (`shard_id=rank`, `num_shards=world`,
shard r holds positions [r*N//world, (r+1)*N//world) of the tar files' order), so shards differ by at
most one sample. A training epoch is defined as floor(N/world) // batch_size batches per rank (what every
backend reports as len()); each epoch the pipeline is rebuilt with seed mix(seed, epoch) and shard
(rank + epoch) % world, so an epoch is a deterministic function of (seed, epoch, rank) and resume at
start_step re-reads (and drops) the first start_step batches (DALI readers cannot seek). Shuffling is
DALI's buffer shuffle (`initial_fill` samples) over the converter's fixed random order of the samples;
the buffer holds the whole shard up to SHUFFLE_BUFFER.

Pipelines side by side (`pipelines=P`, a constructor hook the benchmarks time; training only): pipeline
p of rank r reads sub-shard r*P + p of world*P (together exactly rank r's shard, as
floor(rP*N/(wP)) = floor(r*N/w)), with its own seed mix(seed, epoch, rank, P, p), and renders rows
[p*B/P, (p+1)*B/P) of every batch: P executors launch operators at once. An epoch is
(N // (world*P)) // (B/P) batches, the smallest sub-shard's: as P divides B, that is (N // world) // B,
one pipeline's count. Eval loaders keep one pipeline.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from fastvpd.config import UserError
from fastvpd.data.augment import ViewFinisher
from fastvpd.data.base import Batch, LoaderBase, mix_seed, num_batches
from fastvpd.data.spec import AugSpec, RandomResizedCrop, ResizeCenterCrop, ViewSpec
from fastvpd.extras import require

SHUFFLE_BUFFER = 16384  # samples held for DALI's shuffle (encoded JPEGs in host memory)


def _import_dali() -> Any:
    return require("nvidia.dali", "dali", "data.backend=dali")


def _render_view(decoded: Any, view: ViewSpec, op_dev: str) -> Any:
    """DALI graph of one view's geometry (inside the pipeline definition), from the whole decoded images:
    the crop and resize, then crop_mirror_normalize (the flip, a coin per sample with hflip_p; the eval
    views' centre crop) into uint8 HWC. The loader's device finishes it."""
    from nvidia.dali import fn, types

    res = view.res
    if isinstance(view.crop, RandomResizedCrop):
        img = fn.random_resized_crop(
            decoded,
            device=op_dev,
            size=[res, res],
            random_area=list(view.crop.scale),
            random_aspect_ratio=list(view.crop.ratio),
            num_attempts=10,
            interp_type=types.INTERP_LINEAR,
        )
        kw: dict[str, Any] = {}
    else:
        img = fn.resize(
            decoded, device=op_dev, resize_shorter=view.crop.resize, interp_type=types.INTERP_LINEAR
        )
        kw = {"crop": (res, res), "crop_pos_x": 0.5, "crop_pos_y": 0.5}
    mirror = fn.random.coin_flip(probability=view.hflip_p) if view.hflip_p > 0 else 0
    return fn.crop_mirror_normalize(
        img, device=op_dev, dtype=types.UINT8, output_layout="HWC", mean=0.0, std=1.0, mirror=mirror, **kw
    )


class DALILoader(LoaderBase):
    """DALI pipeline over OUT/<split>/wds/*.tar (+ .idx), one pipeline per rank."""

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
        aug_kernel: str = "auto",
        pipelines: int = 1,
    ) -> None:
        _import_dali()
        for v in spec.views:
            if isinstance(v.crop, ResizeCenterCrop) and v.crop.ten_crop:
                raise UserError(
                    "ten-crop eval is not available with data.backend=dali: use cache or torchvision"
                )
        if pipelines < 1:
            raise ValueError(f"pipelines must be >= 1 (got {pipelines})")
        # several pipelines each render a slice of every training batch from their own sub-shard (eval: one)
        self.pipelines = pipelines if train else 1
        n = manifest.count(split)
        super().__init__(
            spec, n, manifest.num_classes, batch_size, device, dtype, seed, rank, world_size, train
        )
        self.tars, self.idxs = manifest.wds_shards(split)
        for p in [*self.tars, *self.idxs]:
            if not p.is_file():
                raise UserError(
                    f"{p} is missing: re-run `python -m fastvpd.convert SRC OUT --formats dali --force`"
                )
        if not train:  # DALI's contiguous eval shard of this rank
            self._per_rank = (rank + 1) * n // world_size - rank * n // world_size
        if batch_size % self.pipelines:
            raise ValueError(
                f"pipelines={pipelines} must divide the batch size ({batch_size}): each pipeline renders "
                "an equal slice of every batch"
            )
        # each pipeline's samples: its sub-shard of world*P (the smallest one, for P > 1: DALI's shard sizes
        # differ by one at most), or with one pipeline this rank's shard
        self._per_pipe = self._per_rank if self.pipelines == 1 else n // (world_size * self.pipelines)
        self.workers = workers if workers > 0 else max(1, torch.get_num_threads())
        self._pipes: list[Any] = []
        # DALI hands over uint8 crops; jitter, grayscale, blur, normalise (and AutoAugment) run here on the
        # loader's device, as the ffcv backend does it
        self._finisher = ViewFinisher(spec.views, self.device, dtype, aug_kernel)
        self.gen = self._finisher.gen

    def _build(self, epoch: int, part: int = 0) -> Any:
        """The pipeline of (epoch, part): part p of `self.pipelines` reads sub-shard rank*P + p of world*P
        (together, this rank's shard: DALI's shard boundaries are floor(s*N/S)) and renders batch/P."""
        from nvidia.dali import fn, pipeline_def, types

        cuda = self.device.type == "cuda"
        decode_dev, op_dev = ("mixed", "gpu") if cuda else ("cpu", "cpu")
        parts = self.pipelines
        shard = ((self.rank + epoch) % self.world_size if self.train else self.rank) * parts + part
        spec, tars, idxs, train = (
            self.spec,
            [str(p) for p in self.tars],
            [str(p) for p in self.idxs],
            self.train,
        )
        # one pipeline keeps the seed of (seed, epoch, rank) alone
        pseed = (
            mix_seed(self.seed, epoch, self.rank)
            if parts == 1
            else mix_seed(self.seed, epoch, self.rank, parts, part)
        )
        pseed %= 1 << 31
        fill = max(1, min(SHUFFLE_BUFFER, self._per_pipe))

        @pipeline_def(
            batch_size=self.batch_size // parts,
            num_threads=max(1, self.workers // parts),
            device_id=self.device.index if cuda else None,
            seed=pseed,
            exec_dynamic=True,
        )
        def pipe() -> Any:
            jpegs, cls = fn.readers.webdataset(
                paths=tars,
                index_paths=idxs,
                ext=["jpg", "cls"],
                missing_component_behavior="error",
                random_shuffle=train,
                initial_fill=fill,
                seed=pseed,
                shard_id=shard,
                num_shards=self.world_size * parts,
                stick_to_shard=not train,
                pad_last_batch=not train,
                name="reader",
            )
            whole = fn.decoders.image(jpegs, device=decode_dev, output_type=types.RGB)  # once per sample
            views = [_render_view(whole, v, op_dev) for v in spec.views]
            return (*views, cls)

        p = pipe()
        p.build()
        return p

    def _to_torch(self, tls: list[Any]) -> torch.Tensor:
        """The pipelines' DALI HWC slices of one view as one uint8 [B, 3, R, R] channels-last batch (NHWC
        memory, no copy past the one out of DALI, each slice straight into its rows)."""
        from nvidia.dali.plugin.pytorch import feed_ndarray

        ts = [tl.as_tensor() for tl in tls]
        shape = list(ts[0].shape())
        shape[0] = sum(t.shape()[0] for t in ts)
        out = torch.empty(shape, dtype=torch.uint8, device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        row = 0
        for t in ts:
            n = t.shape()[0]
            feed_ndarray(t, out[row : row + n], cuda_stream=stream)
            row += n
        return out.permute(0, 3, 1, 2)

    @staticmethod
    def _parse_cls(cls: Any) -> tuple[np.ndarray, np.ndarray]:
        """(labels, sample indices): label from the ASCII .cls member, index from its key (source_info)."""
        labels = np.empty(len(cls), dtype=np.int64)
        indices = np.empty(len(cls), dtype=np.int64)
        for i in range(len(cls)):
            t = cls[i]
            labels[i] = int(bytes(np.asarray(t)).decode().strip())
            key = t.source_info().rsplit(":", 1)[-1].split(".", 1)[0]
            indices[i] = int(key)
        return labels, indices

    def __iter__(self) -> Iterator[Batch]:
        self._pipes = []  # release the previous epoch's pipelines (threads, buffers) first
        # each epoch: fresh (seed, epoch, rank) pipelines; once built they run ahead side by side (prefetch)
        self._pipes = [self._build(self.epoch, p) for p in range(self.pipelines)]
        total = len(self)
        for step in range(total):
            outs = [pipe.run() for pipe in self._pipes]
            if step < self.start_step:
                continue  # DALI readers cannot seek: resume drops the already-seen batches
            keep = min(self.batch_size, self._per_rank - step * self.batch_size) if not self.train else None
            parsed = [self._parse_cls(o[-1]) for o in outs]
            labels = np.concatenate([lab for lab, _ in parsed])
            indices = np.concatenate([idx for _, idx in parsed])
            views = [self._to_torch([o[v] for o in outs]) for v in range(len(outs[0]) - 1)]
            lab = torch.from_numpy(labels).to(self.device, non_blocking=True)
            idx = torch.from_numpy(indices).to(self.device, non_blocking=True)
            if keep is not None and keep < self.batch_size:  # eval: drop DALI's padding of the last batch
                views, lab, idx = [v[:keep] for v in views], lab[:keep], idx[:keep]
            views = self._finisher(views, self.step_seed(step))  # the batch's draws from its own seed
            yield Batch(views, lab, idx)

    def __len__(self) -> int:
        # each pipeline's epoch: its sub-shard's whole slices of batch/P; as P divides B,
        # (N // (W*P)) // (B/P) = (N // W) // B: the same epoch length as one pipeline's
        return num_batches(self._per_pipe, self.batch_size // self.pipelines, self.train)

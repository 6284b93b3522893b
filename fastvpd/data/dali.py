"""The `dali` backend: the whole spec inside an NVIDIA DALI pipeline over the WebDataset shards.

Rendering of the AugSpec (per view, all draws per sample by DALI's seeded random operators):
decoders.image_random_crop (area/ratio/10 attempts = torchvision RRC) -> resize -> color_twist (jitter
with prob p; grayscale folded in as saturation 0) -> gaussian_blur (sigma ~ U, a delta kernel when off)
-> crop_mirror_normalize (flip, mean/std). Decoding is "mixed" (nvJPEG) on a GPU, "cpu" otherwise.
Output layout is HWC so the torch view is channels-last NCHW without a copy.

Known differences from the torchvision reference (DALI has no per-sample op order): color_twist applies
brightness/contrast/saturation/hue as one fixed linear colour transform, contrast pivots on mid-grey
rather than the image mean. Ten-crop eval is not rendered here (use cache or torchvision).

Epochs and sharding: DALI shards the samples contiguously (`shard_id=rank`, `num_shards=world`, shard r
holds samples [r*N//world, (r+1)*N//world)), so shards differ by at most one sample. A training epoch
is defined as floor(N/world) // batch_size batches per rank (what every backend reports as len()); each
epoch the pipeline is rebuilt with seed mix(seed, epoch) and shard (rank + epoch) % world, so an epoch
is a deterministic function of (seed, epoch, rank) and resume at start_step re-reads (and drops) the
first start_step batches (DALI readers cannot seek). Shuffling is DALI's buffer shuffle (`initial_fill`
samples): samples are stored class-sorted, so the buffer is set to the whole shard up to SHUFFLE_BUFFER.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from fastvpd.config import UserError
from fastvpd.data import Batch, LoaderBase, mix_seed, num_batches
from fastvpd.data.spec import AugSpec, RandomResizedCrop, ResizeCenterCrop, ViewSpec

INSTALL_HINT = "pip install -e '.[dali]'"
SHUFFLE_BUFFER = 16384  # samples held for DALI's shuffle (encoded JPEGs in host memory)


def _import_dali() -> Any:
    try:
        import nvidia.dali  # noqa: F401
        from nvidia.dali import fn, pipeline_def, types  # noqa: F401
    except Exception as e:
        raise UserError(
            f"data.backend=dali needs NVIDIA DALI ({type(e).__name__}: {e}): {INSTALL_HINT}"
        ) from None
    return nvidia.dali


def _render_view(jpegs: Any, view: ViewSpec, decode_dev: str, op_dev: str) -> Any:
    """DALI graph of one view (called inside the pipeline definition)."""
    from nvidia.dali import fn, types

    f32 = types.FLOAT
    res = view.res
    if isinstance(view.crop, RandomResizedCrop):
        img = fn.decoders.image_random_crop(
            jpegs,
            device=decode_dev,
            output_type=types.RGB,
            random_area=list(view.crop.scale),
            random_aspect_ratio=list(view.crop.ratio),
            num_attempts=10,
        )
        img = fn.resize(img, device=op_dev, resize_x=res, resize_y=res, interp_type=types.INTERP_LINEAR)
    else:
        img = fn.decoders.image(jpegs, device=decode_dev, output_type=types.RGB)
        img = fn.resize(img, device=op_dev, resize_shorter=view.crop.resize, interp_type=types.INTERP_LINEAR)
    if view.autoaugment:
        from nvidia.dali.auto_aug import auto_augment

        img = auto_augment.auto_augment_image_net(img, shape=[res, res])
    sat_scale = None
    if view.grayscale_p > 0:
        sat_scale = 1.0 - fn.cast(fn.random.coin_flip(probability=view.grayscale_p), dtype=f32)
    if view.jitter is not None:
        j = view.jitter
        on = fn.cast(fn.random.coin_flip(probability=j.p), dtype=f32)

        def factor(x: float) -> Any:
            return on * fn.random.uniform(range=[max(0.0, 1.0 - x), 1.0 + x]) + (1.0 - on)

        sat = factor(j.saturation)
        img = fn.color_twist(
            img,
            device=op_dev,
            brightness=factor(j.brightness),
            contrast=factor(j.contrast),
            saturation=sat if sat_scale is None else sat * sat_scale,
            hue=on * fn.random.uniform(range=[-360.0 * j.hue, 360.0 * j.hue]),  # degrees
        )
    elif sat_scale is not None:
        img = fn.color_twist(img, device=op_dev, saturation=sat_scale)
    if view.blur is not None:
        on = fn.cast(fn.random.coin_flip(probability=view.blur.p), dtype=f32)
        sigma = fn.random.uniform(range=list(view.blur.sigma))
        img = fn.gaussian_blur(
            img, device=op_dev, sigma=on * sigma + (1.0 - on) * 1e-3, window_size=view.blur.kernel_size(res)
        )
    kw: dict[str, Any] = {}
    if isinstance(view.crop, ResizeCenterCrop):
        kw = {"crop": (res, res), "crop_pos_x": 0.5, "crop_pos_y": 0.5}
    mirror = fn.random.coin_flip(probability=view.hflip_p) if view.hflip_p > 0 else 0
    return fn.crop_mirror_normalize(
        img,
        device=op_dev,
        dtype=f32,
        output_layout="HWC",
        mean=[255.0 * m for m in view.normalize.mean],
        std=[255.0 * s for s in view.normalize.std],
        mirror=mirror,
        **kw,
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
    ) -> None:
        _import_dali()
        for v in spec.views:
            if isinstance(v.crop, ResizeCenterCrop) and v.crop.ten_crop:
                raise UserError(
                    "ten-crop eval is not available with data.backend=dali: use cache or torchvision"
                )
        n = manifest.count(split)
        super().__init__(
            spec, n, manifest.num_classes, batch_size, device, dtype, seed, rank, world_size, train
        )
        self.tars, self.idxs = manifest.wds_shards(split)
        for p in [*self.tars, *self.idxs]:
            if not p.is_file():
                raise UserError(
                    f"{p} is missing: re-run `python data_tools/convert.py SRC OUT --formats dali --force`"
                )
        if not train:  # DALI's contiguous eval shard of this rank
            self._per_rank = (rank + 1) * n // world_size - rank * n // world_size
        self.workers = workers if workers > 0 else max(1, torch.get_num_threads())
        self._pipe: Any = None

    def _build(self, epoch: int) -> Any:
        from nvidia.dali import fn, pipeline_def

        cuda = self.device.type == "cuda"
        decode_dev, op_dev = ("mixed", "gpu") if cuda else ("cpu", "cpu")
        shard = (self.rank + epoch) % self.world_size if self.train else self.rank
        spec, tars, idxs, train = (
            self.spec,
            [str(p) for p in self.tars],
            [str(p) for p in self.idxs],
            self.train,
        )
        pseed = mix_seed(self.seed, epoch, self.rank) % (1 << 31)
        fill = max(1, min(SHUFFLE_BUFFER, self._per_rank))

        @pipeline_def(
            batch_size=self.batch_size,
            num_threads=self.workers,
            device_id=self.device.index if cuda else None,
            seed=pseed,
            enable_conditionals=any(v.autoaugment for v in spec.views),
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
                num_shards=self.world_size,
                stick_to_shard=not train,
                pad_last_batch=not train,
                name="reader",
            )
            views = [_render_view(jpegs, v, decode_dev, op_dev) for v in spec.views]
            return (*views, cls)

        p = pipe()
        p.build()
        return p

    def _to_torch(self, tl: Any) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        t = tl.as_tensor()
        out = torch.empty(t.shape(), dtype=torch.float32, device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        feed_ndarray(t, out, cuda_stream=stream)
        return out.permute(0, 3, 1, 2).to(dtype=self.dtype, memory_format=torch.channels_last)

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
        self._pipe = None  # release the previous epoch's pipeline (threads, buffers) first
        self._pipe = self._build(self.epoch)  # each epoch: a fresh (seed, epoch, rank) pipeline
        total = len(self)
        for step in range(total):
            outs = self._pipe.run()
            if step < self.start_step:
                continue  # DALI readers cannot seek: resume drops the already-seen batches
            keep = min(self.batch_size, self._per_rank - step * self.batch_size) if not self.train else None
            *vtl, cls = outs
            labels, indices = self._parse_cls(cls)
            views = [self._to_torch(t) for t in vtl]
            lab = torch.from_numpy(labels).to(self.device, non_blocking=True)
            idx = torch.from_numpy(indices).to(self.device, non_blocking=True)
            if keep is not None and keep < self.batch_size:  # eval: drop DALI's padding of the last batch
                views, lab, idx = [v[:keep] for v in views], lab[:keep], idx[:keep]
            yield Batch(views, lab, idx)

    def __len__(self) -> int:
        return num_batches(self._per_rank, self.batch_size, self.train)

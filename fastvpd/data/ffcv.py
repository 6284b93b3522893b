"""The `ffcv` backend: FFCV decodes + crops + flips in JIT-compiled host threads; the rest of the spec
(jitter, grayscale, blur, normalise) runs batched on the device with the same `gpu_aug` ops as `cache`
(on CPU with numba: gpu_aug's per-sample kernel, `render_cpu_images`, same draws and pixels).

Two views: the image field is decoded twice per sample, by two pipelines over the same field
(`pipelines={'image': ..., 'image2': PipelineSpec('image', decoder=...)}`): each decode draws its own
crop, so the views are independent as MoCo v2 requires. The alternative (decode once at full size and
crop twice on the device) needs same-size images, which FFCV's batch buffers require; decoding twice
costs one extra JPEG decode per sample, the same price as the reference torchvision loader.

Sample order is our own (`shard_indices`: the same permutation and rank sharding as every backend,
resumable at start_step), handed to FFCV as a custom TraversalOrder. FFCV's crop/flip draws use numba's
per-thread RNG, which FFCV does not seed: ffcv batches are reproducible in order and photometric
augmentation, not in crop geometry.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from fastvpd.config import UserError
from fastvpd.data import Batch, LoaderBase
from fastvpd.data import gpu_aug as G
from fastvpd.data.spec import AugSpec, RandomResizedCrop, ResizeCenterCrop

INSTALL_HINT = "pip install -e '.[ffcv]'"


def _import_ffcv() -> Any:
    try:
        import ffcv  # noqa: F401
        from ffcv import fields, loader, pipeline, transforms  # noqa: F401
        from ffcv.fields import decoders  # noqa: F401
        from ffcv.traversal_order.base import TraversalOrder  # noqa: F401
    except Exception as e:  # ImportError, or a broken native build
        raise UserError(f"data.backend=ffcv needs FFCV ({type(e).__name__}: {e}): {INSTALL_HINT}") from None
    return ffcv


class FFCVLoader(LoaderBase):
    """ffcv.loader.Loader over OUT/<split>/<split>.beton, finished on the device by gpu_aug."""

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
        _import_ffcv()
        from ffcv.fields.decoders import (
            CenterCropRGBImageDecoder,
            IntDecoder,
            RandomResizedCropRGBImageDecoder,
        )
        from ffcv.loader import Loader
        from ffcv.pipeline import PipelineSpec
        from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToDevice, ToTensor, ToTorchImage
        from ffcv.traversal_order.base import TraversalOrder

        super().__init__(
            spec,
            manifest.count(split),
            manifest.num_classes,
            batch_size,
            device,
            dtype,
            seed,
            rank,
            world_size,
            train,
        )
        dev = self.device
        owner = self

        class _SharedOrder(TraversalOrder):
            """Our rank's order (shard_indices from start_step); FFCV only batches and decodes it."""

            def __init__(self) -> None:  # FFCV instantiates orders as order(loader)
                self.loader = None

            def __call__(self, loader: Any) -> _SharedOrder:
                self.loader = loader
                self.indices = loader.indices
                self.seed = loader.seed
                self.distributed = False
                self.sampler = None
                return self

            def sample_order(self, epoch: int) -> Sequence[int]:
                return owner.order().numpy()

        pipelines: dict[str, Any] = {}
        self._image_keys: list[str] = []
        for vi, view in enumerate(spec.views):
            if isinstance(view.crop, ResizeCenterCrop):
                if view.crop.ten_crop:
                    raise UserError(
                        "ten-crop eval is not available with data.backend=ffcv: use cache or torchvision"
                    )
                decoder: Any = CenterCropRGBImageDecoder(
                    (view.res, view.res), ratio=view.res / view.crop.resize
                )
            else:
                c: RandomResizedCrop = view.crop
                decoder = RandomResizedCropRGBImageDecoder((view.res, view.res), scale=c.scale, ratio=c.ratio)
            ops: list[Any] = []
            if view.hflip_p > 0:
                ops.append(RandomHorizontalFlip(flip_prob=view.hflip_p))
            ops += [ToTensor(), ToDevice(dev, non_blocking=True), ToTorchImage(channels_last=True)]
            key = "image" if vi == 0 else f"image{vi + 1}"
            pipelines[key] = (
                [decoder, *ops] if vi == 0 else PipelineSpec("image", decoder=decoder, transforms=ops)
            )
            self._image_keys.append(key)
        for f in ("label", "index"):
            pipelines[f] = [IntDecoder(), ToTensor(), Squeeze(1), ToDevice(dev, non_blocking=True)]
        path = manifest.path(split, "ffcv")
        try:
            self.loader = Loader(
                str(path),
                batch_size=batch_size,
                num_workers=workers if workers > 0 else -1,
                order=_SharedOrder(),
                drop_last=train,
                pipelines=pipelines,
                batches_ahead=2,
                seed=seed,
            )
        except (OSError, ValueError) as e:
            raise UserError(
                f"cannot open {path} ({e}): "
                "re-run `python data_tools/convert.py SRC OUT --formats ffcv --force`"
            ) from None
        # FFCV yields outputs in pipeline order: the beton's fields first, then the extra views
        self._names = list(self.loader.pipeline_specs)
        self._norm = [
            (torch.tensor(v.normalize.mean, device=dev), torch.tensor(v.normalize.std, device=dev))
            for v in spec.views
        ]
        self.gen = torch.Generator(device=dev)

    def __iter__(self) -> Iterator[Batch]:
        for k, out in enumerate(self.loader):
            named = dict(zip(self._names, out))
            self.gen.manual_seed(self.step_seed(self.start_step + k))
            if G.cpu_kernel_ok(self.device, self.spec.views):
                # CPU: one fused pass per sample (numba); draws as below. It copies out of FFCV's buffer.
                images = [named[key] for key in self._image_keys]
                params = [
                    G.sample_photometric(view, x.shape[0], self.gen, self.device)
                    for view, x in zip(self.spec.views, images)
                ]
                views = G.render_cpu_images(images, list(self.spec.views), params, self._norm, self.dtype)
                labels = named["label"].to(torch.int64, copy=True)
                indices = named["index"].to(torch.int64, copy=True)
                yield Batch(views, labels, indices)
                continue
            views = []
            for vi, view in enumerate(self.spec.views):
                # .to(float32) copies out of FFCV's ring buffer, which it reuses batches_ahead later
                x = named[self._image_keys[vi]].to(torch.float32).div_(255.0)
                if view.autoaugment:
                    x = G.autoaugment_(x, self.step_seed(self.start_step + k) + vi)
                ph = G.sample_photometric(view, x.shape[0], self.gen, self.device)
                x = G.photometric(x, view, ph)
                mean, std = self._norm[vi]
                views.append(G.normalize(x, mean, std, self.dtype))
            labels = named["label"].to(torch.int64, copy=True)
            indices = named["index"].to(torch.int64, copy=True)
            yield Batch(views, labels, indices)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "generator": self.gen.get_state()}

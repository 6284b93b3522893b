"""The `ffcv` backend: FFCV decodes + crops + flips in JIT-compiled host threads; the rest of the spec
(jitter, grayscale, blur, normalise) runs on the loader's device through the shared
`augment.ViewFinisher`, with the cache backend's draws and renderings.

Two views, decoded twice or once (`data.ffcv_decode`). `twice` (default) is FFCV's usual layout, one
pipeline per view over the same field (`PipelineSpec('image', decoder=...)`): one JPEG decode per view,
as the reference torchvision loader pays. `once`: FFCV's batch buffers need fixed-size outputs, so our
decoder declares one output of shape [V, R, R, 3] per sample, decodes the JPEG once into its scratch
buffer and cuts the V crops (each with its own crop and flip draw) from it; the loader slices the views
out of that buffer in place. `twice` keeps more host cores busy and is faster on hosts with many cores per
GPU (the default); `once` halves the decode work and is faster where the cores are the limit (figures in
benchmarks/results/).

Sample order is our own (`shard_indices`: the same permutation and rank sharding as every backend,
resumable at start_step), handed to FFCV as a custom TraversalOrder.

Reproducible crops and flips. FFCV 1.0's `RandomResizedCropRGBImageDecoder` and `RandomHorizontalFlip`
draw with numba's `np.random` inside `prange` loops, i.e. from per-thread Mersenne Twister states that
FFCV never seeds (`Loader(seed=)` only seeds the traversal order; the only `np.random.seed` in FFCV's
compiled code is in the mixup transforms), and which thread decodes which sample is not fixed. So
`_seeded_decoder()` subclasses FFCV's `ResizedCropRGBImageDecoder` (FFCV itself is not patched): its
decode loop reseeds the worker thread's RNG per sample from (seed, epoch, decode group, sample index)
before the first crop draw, and draws each view's flip right after its crop (the flip is fused into the
decoder, replacing the unseeded `RandomHorizontalFlip`). Numba freezes closure arrays as constants, so
the per-epoch seed reaches the compiled loop through a raw pointer to a 1-element array that `__iter__`
writes before each epoch. A sample's geometry is thus a function of (seed, epoch, group, index) only:
independent of threads, batch position, rank and resume point.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from fastvpd.config import UserError
from fastvpd.data.augment import ViewFinisher
from fastvpd.data.base import Batch, LoaderBase, mix_seed
from fastvpd.data.spec import AugSpec, ResizeCenterCrop
from fastvpd.extras import require_ffcv

# the FFCV modules the loader uses: all must import (a broken native build fails in some of them)
FFCV_MODULES = (
    "ffcv.fields",
    "ffcv.loader",
    "ffcv.pipeline",
    "ffcv.transforms",
    "ffcv.fields.decoders",
    "ffcv.traversal_order.base",
)


def _import_ffcv() -> Any:
    return require_ffcv("data.backend=ffcv", FFCV_MODULES)


@lru_cache(maxsize=1)
def _seeded_decoder() -> type:
    """FFCV crop decoder: one JPEG decode, V seeded crops (+ flips) of it; see module doc."""
    from ffcv.fields.rgb_image import (
        IMAGE_MODES,
        ResizedCropRGBImageDecoder,
        get_center_crop,
        get_random_crop,
    )
    from ffcv.libffcv import imdecode, resize_crop
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler
    from numba import carray, types
    from numba.extending import intrinsic

    @intrinsic
    def _as_i64_ptr(typingctx: Any, addr: Any) -> Any:
        """int64 address -> int64* (a mutable view the compiled loop reads: closure arrays are frozen)."""
        sig = types.CPointer(types.int64)(types.int64)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

        return sig, codegen

    class SeededCropDecoder(ResizedCropRGBImageDecoder):
        """ResizedCropRGBImageDecoder (FFCV 1.0 decode loop) + per-sample np.random.seed + fused flip,
        cutting `len(flip_p)` crops from each decoded image: output uint8 [V, R, R, 3] per sample."""

        def __init__(
            self,
            size: int,
            random: bool,
            scale: np.ndarray,  # [V, 2] (random) or unused
            ratio: np.ndarray,  # [V, 2] (random) or [V] (centre crop: res / resize)
            flip_p: np.ndarray,  # [V]
            epoch_seed: np.ndarray,
        ) -> None:
            super().__init__((size, size))
            self.random, self.scale, self.ratio = random, scale, ratio
            self.flip_p = flip_p
            self.epoch_seed = epoch_seed  # int64[1], written by FFCVLoader.__iter__; kept alive here

        @property
        def get_crop_generator(self) -> Any:
            return get_random_crop if self.random else get_center_crop

        def declare_state_and_memory(self, previous_state: Any) -> Any:
            state, (_, temp) = super().declare_state_and_memory(previous_state)
            shape = (len(self.flip_p), *self.output_size, 3)
            return replace(state, shape=shape), (AllocationQuery(shape, state.dtype), temp)

        def generate_code(self) -> Any:
            jpg = IMAGE_MODES["jpg"]
            mem_read = self.memory_read
            my_range = Compiler.get_iterator()
            imdecode_c = Compiler.compile(imdecode)
            resize_crop_c = Compiler.compile(resize_crop)
            get_crop_c = Compiler.compile(self.get_crop_generator)
            scale, ratio, flip_p = self.scale, self.ratio, self.flip_p
            n_views, addr = len(self.flip_p), int(self.epoch_seed.ctypes.data)

            def decode(batch_indices, my_storage, metadata, storage_state):  # noqa: ANN001, ANN202
                destination, temp_storage = my_storage
                base = carray(_as_i64_ptr(addr), 1)[0]
                for dst_ix in my_range(len(batch_indices)):
                    source_ix = batch_indices[dst_ix]
                    # 32-bit per-sample seed (numba's np.random.seed takes uint32): odd-multiplier hash
                    np.random.seed(np.uint32((base + (source_ix + 1) * 0x9E3779B1) & 0xFFFFFFFF))
                    field = metadata[source_ix]
                    image_data = mem_read(field["data_ptr"], storage_state)
                    height = np.uint32(field["height"])
                    width = np.uint32(field["width"])
                    if field["mode"] == jpg:
                        temp_buffer = temp_storage[dst_ix]
                        imdecode_c(
                            image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1, False, False
                        )
                        selected_size = 3 * height * width
                        temp_buffer = temp_buffer.reshape(-1)[:selected_size]
                        temp_buffer = temp_buffer.reshape(height, width, 3)
                    else:
                        temp_buffer = image_data.reshape(height, width, 3)
                    for v in range(n_views):  # crop, then flip, per view: the draw order is fixed
                        i, j, h, w = get_crop_c(height, width, scale[v], ratio[v])
                        img = destination[dst_ix, v]
                        resize_crop_c(temp_buffer, i, i + h, j, j + w, img)
                        if flip_p[v] > 0 and np.random.random() < flip_p[v]:
                            wd = img.shape[1]
                            for y in range(img.shape[0]):
                                for x in range(wd // 2):
                                    for c in range(3):
                                        t = img[y, x, c]
                                        img[y, x, c] = img[y, wd - 1 - x, c]
                                        img[y, wd - 1 - x, c] = t
                return destination[: len(batch_indices)]

            decode.is_parallel = True
            return decode

    return SeededCropDecoder


DECODE_MODES = ("once", "twice")


def _decode_groups(spec: AugSpec, decode: str) -> list[list[int]]:
    """Which views share one JPEG decode: `once` groups views of the same size and crop kind (MoCo's two
    views are one group), `twice` gives every view its own decode (FFCV's usual one-pipeline-per-view)."""
    if decode not in DECODE_MODES:
        raise UserError(f"data.ffcv_decode={decode!r} is not one of {', '.join(DECODE_MODES)}")
    if decode == "twice":
        return [[vi] for vi in range(len(spec.views))]
    groups: dict[tuple[int, bool], list[int]] = {}
    for vi, v in enumerate(spec.views):
        groups.setdefault((v.res, isinstance(v.crop, ResizeCenterCrop)), []).append(vi)
    return list(groups.values())


def _with_ast_race_retries(build: Callable[[], Any], tries: int = 3) -> Any:
    """build(), again when CPython <= 3.11.7 / 3.12.1 raises its AST race (gh-106905: one global recursion
    counter for every thread's ast.parse). FFCV's Loader generates its code with ast.parse while another
    loader's thread may be compiling with numba, which parses its functions' source too; the clash is a
    spurious SystemError, and a new attempt parses the same source cleanly."""
    for _ in range(tries - 1):
        try:
            return build()
        except SystemError as e:
            if "recursion depth mismatch" not in str(e):
                raise
    return build()  # the last try: whatever it raises goes up


class FFCVLoader(LoaderBase):
    """ffcv.loader.Loader over OUT/<split>/<split>.beton, finished on the device by `ViewFinisher`."""

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
        decode: str = "twice",
        aug_kernel: str = "auto",
    ) -> None:
        _import_ffcv()
        from ffcv.fields.decoders import IntDecoder
        from ffcv.loader import Loader
        from ffcv.pipeline import PipelineSpec
        from ffcv.transforms import Squeeze, ToDevice, ToTensor
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
        groups = _decode_groups(spec, decode)
        # view vi is slot j of pipeline key k: self._slots[vi] = (k, j)
        self._slots: list[tuple[str, int]] = [("", 0)] * len(spec.views)
        # per-group epoch seeds, read by the compiled decoders (see module doc); set in __iter__
        self._epoch_seeds = [np.zeros(1, dtype=np.int64) for _ in groups]
        seeded = _seeded_decoder()
        for gi, members in enumerate(groups):
            views = [spec.views[vi] for vi in members]
            flips = np.array([v.hflip_p for v in views], dtype=np.float64)
            if isinstance(views[0].crop, ResizeCenterCrop):
                if any(v.crop.ten_crop for v in views):  # type: ignore[union-attr]
                    raise UserError(
                        "ten-crop eval is not available with data.backend=ffcv: use cache or torchvision"
                    )
                ratios = np.array([v.res / v.crop.resize for v in views])  # type: ignore[union-attr]
                unused = np.zeros((len(views), 2))
                decoder: Any = seeded(views[0].res, False, unused, ratios, flips, self._epoch_seeds[gi])
            else:
                scales = np.array([v.crop.scale for v in views], dtype=np.float64)  # type: ignore[union-attr]
                ratios = np.array([v.crop.ratio for v in views], dtype=np.float64)  # type: ignore[union-attr]
                decoder = seeded(views[0].res, True, scales, ratios, flips, self._epoch_seeds[gi])
            ops: list[Any] = [ToTensor(), ToDevice(dev, non_blocking=True)]
            key = "image" if gi == 0 else f"image{gi + 1}"
            pipelines[key] = (
                [decoder, *ops] if gi == 0 else PipelineSpec("image", decoder=decoder, transforms=ops)
            )
            for j, vi in enumerate(members):
                self._slots[vi] = (key, j)
        self._group_first = [members[0] for members in groups]
        for f in ("label", "index"):
            pipelines[f] = [IntDecoder(), ToTensor(), Squeeze(1), ToDevice(dev, non_blocking=True)]
        path = manifest.path(split, "ffcv")
        try:
            self.loader = _with_ast_race_retries(
                lambda: Loader(
                    str(path),
                    batch_size=batch_size,
                    num_workers=workers if workers > 0 else -1,
                    order=_SharedOrder(),
                    drop_last=train,
                    pipelines=pipelines,
                    batches_ahead=2,
                    seed=seed,
                )
            )
        except (OSError, ValueError) as e:
            raise UserError(
                f"cannot open {path} ({e}): re-run `python -m fastvpd.convert SRC OUT --formats ffcv --force`"
            ) from None
        # FFCV yields outputs in pipeline order: the beton's fields first, then the extra views
        self._names = list(self.loader.pipeline_specs)
        # jitter, grayscale, blur, normalise on the device, reading the views from FFCV's buffer
        self._finisher = ViewFinisher(spec.views, dev, dtype, aug_kernel)
        self.gen = self._finisher.gen

    def _images(self, named: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """uint8 [B, 3, R, R] channels-last views (NHWC memory), slices of the decoders' [B, V, R, R, 3]."""
        return [named[key][:, j].permute(0, 3, 1, 2) for key, j in self._slots]

    def __iter__(self) -> Iterator[Batch]:
        for gi, cell in enumerate(self._epoch_seeds):  # before FFCV starts decoding ahead
            cell[0] = mix_seed(self.seed, self.epoch, self._group_first[gi]) & 0xFFFFFFFF
        for k, out in enumerate(self.loader):
            named = dict(zip(self._names, out))
            images = self._images(named)
            views = self._finisher(images, self.step_seed(self.start_step + k))
            labels = named["label"].to(torch.int64, copy=True)
            indices = named["index"].to(torch.int64, copy=True)
            yield Batch(views, labels, indices)

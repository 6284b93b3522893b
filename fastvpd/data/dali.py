"""The `dali` backend: NVIDIA DALI pipelines over the WebDataset shards, in one of three renderings
(`data.dali_jitter`): the whole spec inside DALI (`exact`, `fused`), or only its geometry (`device`).

Geometry of a view (every mode; all draws per sample by DALI's seeded random operators):
decoders.image_random_crop or random_resized_crop (area/ratio/10 attempts = torchvision RRC) and resize
to res (eval views: the shorter side to `resize`) -> [photometric ops, `exact`/`fused` only] ->
crop_mirror_normalize (flip with hflip_p, the eval views' centre crop, mean/std). Decoding is "mixed"
(nvJPEG) on a GPU, "cpu" otherwise. Output layout is HWC, so the torch view is channels-last NCHW
without a copy.

`exact` (default) and `fused` render the rest in DALI, between the crop and crop_mirror_normalize:
[autoaugment] -> colour jitter with prob p -> grayscale with prob grayscale_p -> gaussian_blur (sigma ~ U, a
delta kernel when off). `exact` follows torchvision's ColorJitter per sample: the image goes to float [0,
1]; brightness x*f, contrast blend with the mean of the image's grey level, saturation blend with the
pixel's grey level (torchvision's weights), hue as torchvision's exact rgb->hsv->shift->rgb (DALI's
fn.hue/fn.hsv are a linear approximation), each clamped to [0, 1], in a per-sample random order of the four
(one of the 24 permutations drawn per sample). DALI runs every arithmetic step as an operator of its own,
and its executor's per-operator cost, not the pixels, set the speed on a GPU: the first rendering
(conditionals routing each sample through its order, per-channel arithmetic: 1236 operators in the two-view
pipeline) ran 802 two-view samples/s on an H100 (319 ms a batch for 25 ms of GPU work, the host 16 % busy).
So the three blends are each one coord_transform (a per-sample 3x3 matrix over the channel axis, from the
CPU) plus the contrast's mean, the hue's steps work on whole pixels (broadcasting), and the order is six
blend slots around one hue (`_slot_table`), idle slots being the identity exactly: 248 operators in the
two-view pipeline, no conditionals (not yet timed on a GPU). On 2 CPU cores it is 1.9x the first rendering
where the operators are the cost, as on a GPU (337 against 178 two-view samples/s at 32 px), and slower
where the pixels are, the idle slots costing their passes (31 against 41 at 224 px; `device` is the CPU path
there, 220). `fused` is the older, cheaper rendering, one fn.color_twist (fixed order, contrast pivot at
mid-grey, linear hue): on 2 CPU cores it was 2.8x the first `exact` rendering at 96 px and 8.8x at 32 px.

`device` renders the photometric half as the ffcv backend does: DALI decodes, crops, resizes and flips
into uint8 (crop_mirror_normalize with dtype UINT8, no normalisation; the same random operators, in the
same order, as a view with no photometric ops in the other modes, so with none in the spec its crops and
flips are `exact` mode's), and the loader's device finishes each view with `gpu_aug.ViewFinisher`:
jitter, grayscale, blur, normalise with torchvision's formulas and `gpu_aug.sample_photometric`'s draws
(a torch generator on the device, seeded per batch from `step_seed`, so resume is exact), by the numba
kernel on CPU, and on a GPU by triton_aug's kernels (`data.aug_kernel=triton`, or `auto` where Triton
loads; only this mode takes them) or the torch ops (`data.compile_aug`: through torch.compile);
AutoAugment views run torchvision's AutoAugment eagerly on the device first.
On 2 CPU cores (1024 synthetic ImageNet-like JPEGs, batch 64, 2 DALI threads, 2 torch threads, three
interleaved rounds) the first `exact` rendering / `fused` / `device` fed 37.1-38.4 / 65.0-72.7 / 155-191
two-view samples/s at 224 px and 119-131 / 338-349 / 442-542 at 96 px. Not yet timed on a GPU. Ten-crop
eval is not rendered here (use cache or torchvision).

Decoding (`data.dali_decode`): `once` (default) decodes each JPEG whole, once, and cuts every view from
it with `random_resized_crop` (same area/ratio sampler and fallback as the cropped decoder); `twice`
decodes each random-crop view's region of the JPEG on its own (`decoders.image_random_crop`). On 2 CPU
cores at 224 px `once` fed 47.7-54.9 two-view samples/s against 42.6-46.4 for `twice` (three
interleaved rounds); on a GPU nvJPEG's hardware engine decodes whole images anyway (not yet timed).

Epochs and sharding: DALI shards the stored samples contiguously (`shard_id=rank`, `num_shards=world`,
shard r holds positions [r*N//world, (r+1)*N//world) of the tar files' order), so shards differ by at
most one sample. A training epoch is defined as floor(N/world) // batch_size batches per rank (what every
backend reports as len()); each epoch the pipeline is rebuilt with seed mix(seed, epoch) and shard
(rank + epoch) % world, so an epoch is a deterministic function of (seed, epoch, rank) and resume at
start_step re-reads (and drops) the first start_step batches (DALI readers cannot seek). Shuffling is
DALI's buffer shuffle (`initial_fill` samples) over the converter's fixed random order of the samples;
the buffer holds the whole shard up to SHUFFLE_BUFFER.

Pipelines side by side (`data.dali_pipelines=P`, training): pipeline p of rank r reads sub-shard r*P + p
of world*P (together exactly rank r's shard, as floor(rP*N/(wP)) = floor(r*N/w)), with its own seed
mix(seed, epoch, rank, P, p), and renders rows [p*B/P, (p+1)*B/P) of every batch: P executors launch
operators at once (the limit of the `exact` rendering on an H100: its host was 84 % idle). An epoch is
(N // (world*P)) // (B/P) batches, the smallest sub-shard's: as P divides B, that is (N // world) // B, one
pipeline's count. Eval loaders keep one pipeline.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from fastvpd.config import UserError
from fastvpd.data import Batch, LoaderBase, mix_seed, num_batches
from fastvpd.data import gpu_aug as G
from fastvpd.data.spec import AugSpec, ColorJitter, RandomResizedCrop, ResizeCenterCrop, ViewSpec

INSTALL_HINT = "pip install -e '.[dali]'"
SHUFFLE_BUFFER = 16384  # samples held for DALI's shuffle (encoded JPEGs in host memory)
# colour-jitter renderings: "exact" (torchvision's per-sample op order and ops), "fused" (one color_twist),
# or "device" (DALI only crops and flips; the loader's device renders the photometric ops, as ffcv's)
JITTER_MODES = ("exact", "fused", "device")
# random-crop views: "twice" (one cropped decode per view, fn.decoders.image_random_crop) or "once" (one
# full decode per sample, each view's crop and resize by fn.random_resized_crop on the decoded image)
DECODE_MODES = ("once", "twice")
_GREY = np.asarray(G._GRAY_W, np.float32)  # torchvision rgb_to_grayscale weights (one definition)
_EYE = np.eye(3, dtype=np.float32)
_TO_GREY = np.tile(_GREY, (3, 1))  # every output channel the pixel's grey level
# the hue's three sector formulas from q = ((max - r), (max - g), (max - b)) / (max - min): torchvision's
# hr = bc - gc, hg = 2 + rc - bc, hb = 4 + gc - rc, as one affine map of the channel axis
_SECTORS_M = [0.0, -1.0, 1.0, 1.0, 0.0, -1.0, -1.0, 1.0, 0.0]
_SECTORS_T = [0.0, 2.0, 4.0]
_PRECEDENCE = np.asarray([4.0, 2.0, 1.0], np.float32)  # torchvision's max-channel test order: r, g, b
_HSV_OFFSETS = np.asarray([5.0, 3.0, 1.0], np.float32)  # hsv -> rgb: channel n of (R, G, B) uses k = n + 6h


def _import_dali() -> Any:
    try:
        import nvidia.dali  # noqa: F401
        from nvidia.dali import fn, pipeline_def, types  # noqa: F401
    except Exception as e:
        raise UserError(
            f"data.backend=dali needs NVIDIA DALI ({type(e).__name__}: {e}): {INSTALL_HINT}"
        ) from None
    return nvidia.dali


def _clamp01(x: Any) -> Any:
    import nvidia.dali.math as dmath

    return dmath.clamp(x, 0.0, 1.0)


def _const(a: np.ndarray) -> Any:
    from nvidia.dali import types

    return types.Constant(np.ascontiguousarray(a, dtype=np.float32))


def _slot_table() -> np.ndarray:
    """[24, 6, 3]: for each order of (brightness, contrast, saturation, hue), which blend each of six
    slots applies (one-hot over the three blends; zeros: the slot is the identity).

    The hue is the only op not of the blend form, so it runs once, between slots 0-2 and slots 3-5: the
    blends before it (in their order) fill slots 0.., those after it slots ..5; each blend has exactly
    one active slot. Row i is `itertools.permutations(range(4))[i]`, position -> op.
    """
    table = np.zeros((24, 6, 3), np.float32)
    for i, order in enumerate(itertools.permutations(range(4))):
        blends = [op for op in order if op != 3]
        before = order.index(3)  # how many blends precede the hue
        for j, op in enumerate(blends):
            table[i, j if j < before else 3 + j, op] = 1.0
    return table


def _blend(img: Any, m: Any, offset: Any) -> Any:
    """One of torchvision's blends, clamped: brightness f*x, contrast f*x + (1-f)*mean(grey(x)), saturation
    f*x + (1-f)*grey(x) are all x -> clamp(M x + b . mean_hw(x)): M (3x3) and b (1x3) per sample, a
    coord_transform over the channel axis each (the identity M and a zero b leave x as it is, exactly)."""
    from nvidia.dali import fn

    mean = fn.reductions.mean(img, axes=[0, 1], keep_dims=True)  # [1, 1, 3]: the channels' means
    return _clamp01(fn.coord_transform(img, M=m) + fn.coord_transform(mean, M=offset))


def _hue(img: Any, shift6: Any) -> Any:
    """torchvision adjust_hue on float [0, 1] HWC: its _rgb2hsv, the shift, its _hsv2rgb, channel-wise ops
    over the whole image (broadcasting) so each step is one DALI operator (28 in all).

    `shift6` = 6 * (hue factor) + 6 per sample, on the op device. Exact rewrites of torchvision's maths:
    - rgb -> hsv: its three sector formulas as one affine map of q = (max - c) / (max - min); the sector
      test (max = r, else max = g, else b) as a priority code: the largest of (c = max) * (4, 2, 1);
    - hsv -> rgb without the six sectors: channel n (R 5, G 3, B 1) is v - v*s*clamp(min(k, 4 - k), 0, 1)
      with k = (n + 6h) mod 6, torchvision's p/q/t/v pick in every sector;
    - the two `mod 1` of the hue go into that `mod 6`: k = (n + 6 + h_raw + 6f) mod 6, where h_raw in
      [-1, 5] is the hue before torchvision's `/6 + 1` and the shift.
    Where max = min (grey), torchvision sets s = 0 and the divisors to 1: here s = cr/(max + eq) and the
    divisor cr + eq, the same values since cr = 0 there.
    """
    import nvidia.dali.math as dmath
    from nvidia.dali import fn

    maxc = fn.reductions.max(img, axes=2, keep_dims=True)  # [H, W, 1]
    minc = fn.reductions.min(img, axes=2, keep_dims=True)
    cr = maxc - minc
    eqc = maxc == minc  # bool, promoted to float below
    s = cr / (maxc + eqc)
    q = (maxc - img) / (cr + eqc)  # (rc, gc, bc)
    sectors = fn.coord_transform(q, M=_SECTORS_M, T=_SECTORS_T)  # (hr, hg, hb) before the masks
    code = fn.reductions.max((img == maxc) * _const(_PRECEDENCE), axes=2, keep_dims=True)
    h_raw = fn.reductions.sum((code == _const(_PRECEDENCE)) * sectors, axes=2, keep_dims=True)
    x = (h_raw + shift6) + _const(_HSV_OFFSETS)  # [H, W, 3]
    k = x - 6.0 * dmath.floor(x * (1.0 / 6.0))  # x mod 6 (floor and * are documented on GPU; % is not)
    return maxc - (maxc * s) * dmath.clamp(dmath.min(k, 4.0 - k), 0.0, 1.0)


def jitter_ranges(j: ColorJitter) -> list[tuple[float, float]]:
    """torchvision ColorJitter factor ranges: brightness, contrast, saturation (multipliers), hue (turns)."""
    bounds = [(max(0.0, 1.0 - x), 1.0 + x) for x in (j.brightness, j.contrast, j.saturation)]
    return [*bounds, (-j.hue, j.hue)]


def jitter_torchvision(img: Any, ranges: list[tuple[float, float]], p: float, op_dev: str) -> Any:
    """ColorJitter applied with probability p, per-sample factors ~ U(ranges[k]) and a per-sample uniformly
    random order of the four ops (torchvision's torch.randperm(4)); float [0, 1] HWC in and out.

    No conditionals: the order is a draw of one of the 24 permutations, and `_slot_table` turns it into
    six blend slots around one hue, each slot's 3x3 matrix and offset computed per sample on the CPU from
    the factors (identity where the slot is idle or the jitter is off); the hue is mixed in by the coin
    (x + on * (hue(x) - x): exactly x when off) and left out of the graph when its range is 0.
    """
    from nvidia.dali import fn, types

    on = fn.cast(fn.random.coin_flip(probability=p), dtype=types.FLOAT)
    order = fn.random.choice(24)
    slots = _const(_slot_table())[order]  # [6, 3]
    lo = np.asarray([r[0] for r in ranges[:3]], np.float32)
    hi = np.asarray([r[1] for r in ranges[:3]], np.float32)
    u = fn.random.uniform(range=[0.0, 1.0], shape=[3])
    df = on * (_const(lo - 1.0) + u * _const(hi - lo))  # factor - 1 of each blend; 0 when off
    coef = slots * df  # [6, 3]: slot s applies blend k with factor 1 + coef[s, k]
    # M_s = a_s I + b_s grey: a = 1 + sum_k coef[s, k] (the factor), b = -coef[s, 2] (saturation's 1 - f)
    ab = fn.coord_transform(coef, M=[1.0, 1.0, 1.0, 0.0, 0.0, -1.0], T=[1.0, 0.0])  # [6, 2]
    flat = ab[:, 0:1] * _const(_EYE.reshape(1, 9)) + ab[:, 1:2] * _const(_TO_GREY.reshape(1, 9))
    mats = fn.reshape(flat, shape=[6, 3, 3])
    # contrast's offset: (1 - f) * mean grey = -coef[s, 1] * (grey weights . channel means)
    offs = np.zeros((3, 3), np.float32)
    offs[:, 1] = -_GREY
    offsets = fn.reshape(fn.coord_transform(coef, M=offs.ravel().tolist()), shape=[6, 1, 3])
    for slot in range(3):
        img = _blend(img, mats[slot], offsets[slot])
    lo_h, hi_h = ranges[3]
    if (lo_h, hi_h) != (0.0, 0.0):  # torchvision skips a zero hue range
        f_h = fn.random.uniform(range=[lo_h, hi_h]) if lo_h != hi_h else fn.random.uniform(values=[lo_h])
        shift6, gate = 6.0 * f_h + 6.0, on
        if op_dev == "gpu":
            shift6, gate = shift6.gpu(), gate.gpu()
        img = img + gate * (_hue(img, shift6) - img)
    for slot in range(3, 6):
        img = _blend(img, mats[slot], offsets[slot])
    return img


def grayscale(img: Any, p: float) -> Any:
    """torchvision RandomGrayscale on float HWC: the grey level in all three channels with probability p
    (one coord_transform per sample: the identity, exactly, otherwise)."""
    from nvidia.dali import fn, types

    grey = fn.cast(fn.random.coin_flip(probability=p), dtype=types.FLOAT)
    return fn.coord_transform(img, M=_const(_EYE) + grey * _const(_TO_GREY - _EYE))


def _crop(jpegs: Any, view: ViewSpec, decode_dev: str, op_dev: str, decoded: Any = None) -> Any:
    """The view's decode + crop + resize (uint8 HWC; eval views still need their centre crop, which
    `_mirror_crop` takes); `decoded`: the whole images, already decoded (`data.dali_decode=once`), to cut
    this view from instead of decoding its own."""
    from nvidia.dali import fn, types

    res = view.res
    if isinstance(view.crop, RandomResizedCrop) and decoded is not None:
        return fn.random_resized_crop(
            decoded,
            device=op_dev,
            size=[res, res],
            random_area=list(view.crop.scale),
            random_aspect_ratio=list(view.crop.ratio),
            num_attempts=10,
            interp_type=types.INTERP_LINEAR,
        )
    if isinstance(view.crop, RandomResizedCrop):
        img = fn.decoders.image_random_crop(
            jpegs,
            device=decode_dev,
            output_type=types.RGB,
            random_area=list(view.crop.scale),
            random_aspect_ratio=list(view.crop.ratio),
            num_attempts=10,
        )
        return fn.resize(img, device=op_dev, resize_x=res, resize_y=res, interp_type=types.INTERP_LINEAR)
    if decoded is None:
        decoded = fn.decoders.image(jpegs, device=decode_dev, output_type=types.RGB)
    return fn.resize(decoded, device=op_dev, resize_shorter=view.crop.resize, interp_type=types.INTERP_LINEAR)


def _mirror_crop(img: Any, view: ViewSpec, op_dev: str, dtype: Any, mean: Any = 0.0, std: Any = 1.0) -> Any:
    """The view's last op, crop_mirror_normalize: the flip (a coin per sample with hflip_p), the eval
    views' centre crop, (x - mean) / std into `dtype`, HWC out."""
    from nvidia.dali import fn

    kw: dict[str, Any] = {}
    if isinstance(view.crop, ResizeCenterCrop):
        kw = {"crop": (view.res, view.res), "crop_pos_x": 0.5, "crop_pos_y": 0.5}
    mirror = fn.random.coin_flip(probability=view.hflip_p) if view.hflip_p > 0 else 0
    return fn.crop_mirror_normalize(
        img, device=op_dev, dtype=dtype, output_layout="HWC", mean=mean, std=std, mirror=mirror, **kw
    )


def _render_view(
    jpegs: Any, view: ViewSpec, decode_dev: str, op_dev: str, jitter: str = "exact", decoded: Any = None
) -> Any:
    """DALI graph of one view (called inside the pipeline definition): the whole view, normalised float
    HWC, or with `jitter="device"` only its geometry, uint8 HWC (the loader finishes it on the device).
    `decoded`: see `_crop`."""
    from nvidia.dali import fn, types

    img = _crop(jpegs, view, decode_dev, op_dev, decoded)
    if jitter == "device":  # the same random ops in the same order as a view with no photometric ops
        return _mirror_crop(img, view, op_dev, types.UINT8)
    f32 = types.FLOAT
    res = view.res
    if view.autoaugment:
        from nvidia.dali.auto_aug import auto_augment

        img = auto_augment.auto_augment_image_net(img, shape=[res, res])
    scale = 255.0  # pixel range of img: uint8 0..255, or float 0..1 after the torchvision-exact jitter
    if view.jitter is not None and jitter == "exact":
        img = fn.cast(img, dtype=f32) * (1.0 / 255.0)
        img = jitter_torchvision(img, jitter_ranges(view.jitter), view.jitter.p, op_dev)
        scale = 1.0
        if view.grayscale_p > 0:
            img = grayscale(img, view.grayscale_p)
    else:
        sat_scale = None
        if view.grayscale_p > 0:
            sat_scale = 1.0 - fn.cast(fn.random.coin_flip(probability=view.grayscale_p), dtype=f32)
        if view.jitter is not None:
            bri, con, sat_range, (h_lo, h_hi) = jitter_ranges(view.jitter)
            on = fn.cast(fn.random.coin_flip(probability=view.jitter.p), dtype=f32)

            def factor(rng: tuple[float, float]) -> Any:
                return on * fn.random.uniform(range=list(rng)) + (1.0 - on)

            sat = factor(sat_range)
            img = fn.color_twist(
                img,
                device=op_dev,
                brightness=factor(bri),
                contrast=factor(con),
                saturation=sat if sat_scale is None else sat * sat_scale,
                hue=on * fn.random.uniform(range=[360.0 * h_lo, 360.0 * h_hi]),  # degrees
            )
        elif sat_scale is not None:
            img = fn.color_twist(img, device=op_dev, saturation=sat_scale)
    if view.blur is not None:
        on = fn.cast(fn.random.coin_flip(probability=view.blur.p), dtype=f32)
        sigma = fn.random.uniform(range=list(view.blur.sigma))
        img = fn.gaussian_blur(
            img, device=op_dev, sigma=on * sigma + (1.0 - on) * 1e-3, window_size=view.blur.kernel_size(res)
        )
    mean = [scale * m for m in view.normalize.mean]
    return _mirror_crop(img, view, op_dev, f32, mean, [scale * s for s in view.normalize.std])


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
        jitter: str = "exact",
        decode: str = "once",
        compile_aug: bool = False,
        aug_kernel: str = "torch",
        pipelines: int = 1,
    ) -> None:
        _import_dali()
        if jitter not in JITTER_MODES:
            raise UserError(f"data.dali_jitter={jitter!r} is not one of {', '.join(JITTER_MODES)}")
        if aug_kernel == "triton" and jitter != "device":  # `auto` falls back to DALI's own rendering
            raise UserError(
                f"data.aug_kernel=triton with data.backend=dali needs data.dali_jitter=device "
                f"(got {jitter}: DALI renders that whole view itself)"
            )
        if decode not in DECODE_MODES:
            raise UserError(f"data.dali_decode={decode!r} is not one of {', '.join(DECODE_MODES)}")
        self.jitter, self.decode = jitter, decode
        for v in spec.views:
            if isinstance(v.crop, ResizeCenterCrop) and v.crop.ten_crop:
                raise UserError(
                    "ten-crop eval is not available with data.backend=dali: use cache or torchvision"
                )
        if pipelines < 1:
            raise UserError(f"data.dali_pipelines must be >= 1 (got {pipelines})")
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
                    f"{p} is missing: re-run `python data_tools/convert.py SRC OUT --formats dali --force`"
                )
        if not train:  # DALI's contiguous eval shard of this rank
            self._per_rank = (rank + 1) * n // world_size - rank * n // world_size
        if batch_size % self.pipelines:
            raise UserError(
                f"data.dali_pipelines={pipelines} must divide the batch size ({batch_size}): each pipeline "
                "renders an equal slice of every batch"
            )
        # each pipeline's samples: its sub-shard of world*P (the smallest one, for P > 1: DALI's shard sizes
        # differ by one at most), or with one pipeline this rank's shard
        self._per_pipe = self._per_rank if self.pipelines == 1 else n // (world_size * self.pipelines)
        self.workers = workers if workers > 0 else max(1, torch.get_num_threads())
        self._pipes: list[Any] = []
        # data.dali_jitter=device: DALI hands over uint8 crops; jitter, grayscale, blur, normalise (and
        # AutoAugment) run here on the loader's device, as the ffcv backend does it
        self._finisher = None
        if jitter == "device":
            self._finisher = G.ViewFinisher(spec.views, self.device, dtype, compile_aug, aug_kernel)
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
        # one pipeline keeps the seeds it always had (resumable runs from before data.dali_pipelines)
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
            enable_conditionals=self.jitter != "device" and any(v.autoaugment for v in spec.views),
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
            whole = None
            if self.decode == "once":  # one decode per sample, every view cut from it
                whole = fn.decoders.image(jpegs, device=decode_dev, output_type=types.RGB)
            views = [_render_view(jpegs, v, decode_dev, op_dev, self.jitter, whole) for v in spec.views]
            return (*views, cls)

        p = pipe()
        p.build()
        return p

    def _to_torch(self, tls: list[Any]) -> torch.Tensor:
        """The pipelines' DALI HWC slices of one view as one [B, 3, R, R] channels-last batch: the loader's
        dtype, or with `data.dali_jitter=device` DALI's uint8 itself (NHWC memory, no copy past the one
        out of DALI, each slice straight into its rows)."""
        from nvidia.dali.plugin.pytorch import feed_ndarray

        ts = [tl.as_tensor() for tl in tls]
        shape = list(ts[0].shape())
        shape[0] = sum(t.shape()[0] for t in ts)
        raw = torch.uint8 if self._finisher is not None else torch.float32
        out = torch.empty(shape, dtype=raw, device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        row = 0
        for t in ts:
            n = t.shape()[0]
            feed_ndarray(t, out[row : row + n], cuda_stream=stream)
            row += n
        out = out.permute(0, 3, 1, 2)
        if self._finisher is not None:
            return out
        return out.to(dtype=self.dtype, memory_format=torch.channels_last)

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
            if self._finisher is not None:  # the batch's draws from its own seed, as the ffcv backend
                views = self._finisher(views, self.step_seed(step))
            yield Batch(views, lab, idx)

    def __len__(self) -> int:
        # each pipeline's epoch: its sub-shard's whole slices of batch/P; as P divides B,
        # (N // (W*P)) // (B/P) = (N // W) // B: the same epoch length as one pipeline's
        return num_batches(self._per_pipe, self.batch_size // self.pipelines, self.train)

"""Batched, sync-free augmentation in torch (GPU first, runs on CPU too).

Everything here works on whole batches with per-sample parameters drawn from a caller-owned
`torch.Generator`: fixed shapes, no host synchronisation, no data-dependent control flow (except the
optional AutoAugment path), so the training step can capture it in a CUDA graph.

Geometry: crop + resize + flip are one bilinear resampling straight from a ragged flat pixel store
(`pixels[P, 3]` uint8, image i at rows offsets[i] .. offsets[i] + h*w); it reproduces
`torchvision.transforms.functional.resized_crop(..., antialias=False)` (PyTorch's align_corners=False
bilinear on the crop). Photometric ops follow `torchvision.transforms.functional` on float images.

On CPU (where graph capture is moot) two faster renderings give the same pixels up to float rounding:
with numba installed, `render_cpu` runs the whole view per sample in one nogil kernel over host threads
(the CPU default of `PixelAugmenter`, and of the ffcv backend's finishing ops); without it, the torch ops
take a `subset` form that applies each random op only to the samples drawn for it.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from fastvpd.data.spec import ColorJitter, RandomResizedCrop, ResizeCenterCrop, ViewSpec

RRC_TRIES = 10
_GRAY_W = (0.2989, 0.587, 0.114)  # torchvision rgb_to_grayscale weights


# --------------------------------------------------------------------------------------- crop sampling
def sample_rrc(
    heights: Tensor, widths: Tensor, crop: RandomResizedCrop, gen: torch.Generator | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Vectorised torchvision `RandomResizedCrop.get_params`: (top, left, h, w) int64 [B] each.

    Draws RRC_TRIES candidates per sample at once and keeps the first valid one (torchvision's loop
    order); samples with no valid candidate take torchvision's fallback centre crop.
    """
    dev = heights.device
    b = heights.shape[0]
    H = heights.to(torch.float64)
    W = widths.to(torch.float64)
    u = torch.rand(b, RRC_TRIES, 4, generator=gen, device=dev, dtype=torch.float64)
    s0, s1 = crop.scale
    lr0, lr1 = math.log(crop.ratio[0]), math.log(crop.ratio[1])
    target = (H * W)[:, None] * (s0 + (s1 - s0) * u[..., 0])
    aspect = torch.exp(lr0 + (lr1 - lr0) * u[..., 1])
    cw = torch.round(torch.sqrt(target * aspect))
    ch = torch.round(torch.sqrt(target / aspect))
    valid = (cw > 0) & (cw <= W[:, None]) & (ch > 0) & (ch <= H[:, None])
    first = torch.argmax(valid.to(torch.int8), dim=1, keepdim=True)  # first True (0 if none)
    any_valid = valid.any(dim=1)
    ch_t = ch.gather(1, first)[:, 0]
    cw_t = cw.gather(1, first)[:, 0]
    top_t = torch.floor(u[..., 2].gather(1, first)[:, 0] * (H - ch_t + 1)).clamp_max(H - ch_t)
    left_t = torch.floor(u[..., 3].gather(1, first)[:, 0] * (W - cw_t + 1)).clamp_max(W - cw_t)
    # torchvision fallback: centre crop clipped to the ratio range
    rmin, rmax = min(crop.ratio), max(crop.ratio)
    in_ratio = W / H
    fw = torch.where(in_ratio < rmin, W, torch.where(in_ratio > rmax, torch.round(H * rmax), W))
    fh = torch.where(in_ratio < rmin, torch.round(W / rmin), H)
    ch_f, cw_f = fh, fw
    top_f = torch.div(H - ch_f, 2, rounding_mode="floor")
    left_f = torch.div(W - cw_f, 2, rounding_mode="floor")
    pick = [
        torch.where(any_valid, a, c)
        for a, c in ((top_t, top_f), (left_t, left_f), (ch_t, ch_f), (cw_t, cw_f))
    ]
    return tuple(t.to(torch.int64) for t in pick)  # type: ignore[return-value]


def resize_center_boxes(
    heights: Tensor, widths: Tensor, crop: ResizeCenterCrop
) -> list[tuple[Tensor, Tensor, Tensor, Tensor, bool]]:
    """Eval geometry: for each output view, (top, left, new_h, new_w, flip) in resized-image coordinates.

    Short side -> `crop.resize` (long side int(resize*long/short), as torchvision), then the centre crop,
    or for ten_crop torchvision's order: five_crop(img) then five_crop(hflip(img)).
    """
    S = crop.resize
    H, W = heights.to(torch.int64), widths.to(torch.int64)
    portrait = H <= W
    nh = torch.where(portrait, torch.full_like(H, S), torch.div(S * H, W, rounding_mode="floor"))
    nw = torch.where(portrait, torch.div(S * W, H, rounding_mode="floor"), torch.full_like(W, S))
    r = crop.size
    # torchvision center_crop: int(round((n - r) / 2)) (round half to even)
    ct = torch.round((nh - r).to(torch.float64) / 2).to(torch.int64)
    cl = torch.round((nw - r).to(torch.float64) / 2).to(torch.int64)
    if not crop.ten_crop:
        return [(ct, cl, nh, nw, False)]
    z = torch.zeros_like(ct)
    corners = [(z, z), (z, nw - r), (nh - r, z), (nh - r, nw - r), (ct, cl)]
    out = [(t, l, nh, nw, False) for t, l in corners]
    # crops of the mirrored image: column l' there is column nw - r - l' here, then flipped
    out += [(t, nw - r - l, nh, nw, True) for t, l in corners]
    return out


# ------------------------------------------------------------------------------------------ resampling
@dataclass
class AxisMap:
    """Per-sample source coordinates along one axis: neighbours i0/i1 and lerp weight, each [B, res]."""

    i0: Tensor
    i1: Tensor
    frac: Tensor


def axis_map(
    lo: Tensor, hi: Tensor, off: Tensor, step: Tensor, res: int, flip: Tensor | None = None
) -> AxisMap:
    """PyTorch bilinear (align_corners=False) source index: src = lo + max(off + (o+.5)*step - .5, 0).

    `lo..hi` is the region the resize sees (crop box for RRC, whole image for eval, where `off` is the
    centre-crop start in source units). `flip` [B] bool mirrors the output along this axis.
    """
    o = torch.arange(res, device=lo.device, dtype=torch.float32)
    src = (off.float()[:, None] + (o[None] + 0.5) * step.float()[:, None] - 0.5).clamp_min(0.0)
    i0f = torch.floor(src)
    frac = src - i0f
    i0 = (i0f.to(torch.int64) + lo[:, None]).minimum(hi[:, None])
    i1 = (i0 + 1).minimum(hi[:, None])
    if flip is not None:
        f = flip[:, None]
        i0, i1, frac = (torch.where(f, t.flip(-1), t) for t in (i0, i1, frac))
    return AxisMap(i0, i1, frac)


def resample(pixels: Tensor, base: Tensor, width: Tensor, ys: AxisMap, xs: AxisMap) -> Tensor:
    """Bilinear gather from the flat store: float32 [B, 3, R, R] in [0, 1], channels-last memory.

    Sample b, output (y, x) blends pixels[base[b] + Y*width[b] + X] for Y in {y0, y1}, X in {x0, x1}.
    """
    rowbase0 = base[:, None] + ys.i0 * width[:, None]  # [B, R]
    rowbase1 = base[:, None] + ys.i1 * width[:, None]

    def gather(rb: Tensor, xi: Tensor) -> Tensor:
        idx = rb[:, :, None] + xi[:, None, :]  # [B, R, R]
        return pixels[idx].to(torch.float32)  # [B, R, R, 3]

    fx = xs.frac[:, None, :, None]
    top = torch.lerp(gather(rowbase0, xs.i0), gather(rowbase0, xs.i1), fx)
    bot = torch.lerp(gather(rowbase1, xs.i0), gather(rowbase1, xs.i1), fx)
    out = torch.lerp(top, bot, ys.frac[:, :, None, None]).mul_(1.0 / 255.0)
    return out.permute(0, 3, 1, 2)  # NHWC memory == channels-last NCHW view


def rrc_maps(top: Tensor, left: Tensor, ch: Tensor, cw: Tensor, res: int, flip: Tensor | None) -> tuple:
    """Axis maps of resized_crop(img, top, left, ch, cw, res) (+ hflip)."""
    z = torch.zeros_like(top)
    ys = axis_map(top, top + ch - 1, z, ch.float() / res, res)
    xs = axis_map(left, left + cw - 1, z, cw.float() / res, res, flip)
    return ys, xs


def eval_maps(heights: Tensor, widths: Tensor, box: tuple, res: int) -> tuple:
    """Axis maps of resize(short side) + crop at (top, left) of the resized image (+ hflip)."""
    t, l, nh, nw, flip = box
    H, W = heights.to(torch.int64), widths.to(torch.int64)
    z = torch.zeros_like(H)
    sy = H.to(torch.float64) / nh.to(torch.float64)
    sx = W.to(torch.float64) / nw.to(torch.float64)
    ys = axis_map(z, H - 1, t.to(torch.float64) * sy, sy, res)
    fl = torch.full_like(H, bool(flip), dtype=torch.bool) if flip else None
    xs = axis_map(z, W - 1, l.to(torch.float64) * sx, sx, res, fl)
    return ys, xs


# ---------------------------------------------------------------------------------- photometric ops
def rgb_to_gray(x: Tensor) -> Tensor:
    """[B, 1, H, W] luma, torchvision weights."""
    return x[:, 0:1] * _GRAY_W[0] + x[:, 1:2] * _GRAY_W[1] + x[:, 2:3] * _GRAY_W[2]


def _bcast(f: Tensor) -> Tensor:
    return f.view(-1, 1, 1, 1)


def blend(x: Tensor, ref: Tensor | float, f: Tensor) -> Tensor:
    """torchvision `_blend`: clamp(f*x + (1-f)*ref, 0, 1) with per-sample f."""
    f = _bcast(f)
    return (f * x + (1.0 - f) * ref).clamp_(0.0, 1.0)


def adjust_brightness(x: Tensor, f: Tensor) -> Tensor:
    return blend(x, 0.0, f)


def adjust_contrast(x: Tensor, f: Tensor) -> Tensor:
    return blend(x, rgb_to_gray(x).mean(dim=(1, 2, 3), keepdim=True), f)


def adjust_saturation(x: Tensor, f: Tensor) -> Tensor:
    return blend(x, rgb_to_gray(x), f)


def rgb_to_hsv(x: Tensor) -> Tensor:
    """torchvision `_rgb2hsv` (Pillow's algorithm), batched."""
    r, g, b = x.unbind(dim=-3)
    maxc = torch.max(x, dim=-3).values
    minc = torch.min(x, dim=-3).values
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    crd = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / crd, (maxc - g) / crd, (maxc - b) / crd
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc), dim=-3)


def hsv_to_rgb(hsv: Tensor) -> Tensor:
    """HSV -> RGB (= torchvision `_hsv2rgb`) in closed form: c = v - v*s*clamp(min(k, 4-k), 0, 1)."""
    h, s, v = hsv.unbind(dim=-3)
    h6 = h * 6.0
    vs = v * s
    chans = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(n + h6, 6.0)
        chans.append(v - vs * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))
    return torch.stack(chans, dim=-3)


def adjust_hue(x: Tensor, f: Tensor) -> Tensor:
    """torchvision adjust_hue with per-sample hue shift f in [-0.5, 0.5]."""
    hsv = rgb_to_hsv(x)
    h = torch.remainder(hsv[:, 0] + f.view(-1, 1, 1), 1.0)
    return hsv_to_rgb(torch.stack((h, hsv[:, 1], hsv[:, 2]), dim=1))


def gaussian_kernels(sigma: Tensor, k: int) -> Tensor:
    """[B, k] normalised 1-D Gaussian kernels (torchvision `_get_gaussian_kernel1d`)."""
    half = (k - 1) * 0.5
    xs = torch.linspace(-half, half, k, device=sigma.device, dtype=torch.float32)
    pdf = torch.exp(-0.5 * (xs[None] / sigma.float()[:, None]).pow(2))
    return pdf / pdf.sum(dim=1, keepdim=True)


def gaussian_blur(x: Tensor, sigma: Tensor, k: int) -> Tensor:
    """Per-sample separable Gaussian blur (reflect padding, as torchvision) via grouped convolutions."""
    b, c, h, w = x.shape
    ker = gaussian_kernels(sigma, k).repeat_interleave(c, dim=0)  # [B*C, k]
    p = k // 2
    y = F.pad(x.contiguous().view(1, b * c, h, w), (p, p, p, p), mode="reflect")
    y = F.conv2d(y, ker.view(b * c, 1, k, 1), groups=b * c)
    y = F.conv2d(y, ker.view(b * c, 1, 1, k), groups=b * c)
    return y.view(b, c, h, w)


# ------------------------------------------------------------------------------------ per-view params
@dataclass
class Photometric:
    """Per-sample photometric parameters of one view (all [B] or [B, 4] tensors on the device)."""

    jitter_on: Tensor | None = None  # bool [B]
    factors: Tensor | None = None  # float [B, 4]: brightness, contrast, saturation, hue
    order: Tensor | None = None  # int64 [B, 4]: op index applied at each step (0 b, 1 c, 2 s, 3 h)
    gray_on: Tensor | None = None  # bool [B]
    blur_on: Tensor | None = None  # bool [B]
    sigma: Tensor | None = None  # float [B]


def sample_photometric(
    view: ViewSpec, b: int, gen: torch.Generator | None, device: torch.device
) -> Photometric:
    """Draw jitter/grayscale/blur parameters for a batch (fixed number of draws: resumable, capturable)."""
    p = Photometric()
    if view.jitter is not None:
        j: ColorJitter = view.jitter
        u = torch.rand(b, 9, generator=gen, device=device)
        p.jitter_on = u[:, 0] < j.p
        # python-float bounds (no host->device copy: capturable in a CUDA graph)
        bounds = [(max(0.0, 1 - x), 1 + x) for x in (j.brightness, j.contrast, j.saturation)]
        bounds.append((-j.hue, j.hue))
        p.factors = torch.stack([lo + (hi - lo) * u[:, 1 + c] for c, (lo, hi) in enumerate(bounds)], dim=1)
        p.order = torch.argsort(u[:, 5:9], dim=1)  # a uniformly random permutation per sample
    if view.grayscale_p > 0:
        p.gray_on = torch.rand(b, generator=gen, device=device) < view.grayscale_p
    if view.blur is not None:
        u = torch.rand(b, 2, generator=gen, device=device)
        p.blur_on = u[:, 0] < view.blur.p
        s0, s1 = view.blur.sigma
        p.sigma = s0 + (s1 - s0) * u[:, 1]
    return p


def color_jitter(x: Tensor, factors: Tensor, order: Tensor, on: Tensor, subset: bool | None = None) -> Tensor:
    """torchvision ColorJitter with per-sample factors and per-sample op order; identity where not `on`.

    Fixed-shape form (GPU default, capturable): brightness/contrast/saturation are blends (identity at
    factor 1, exactly), so each step is one blend with a per-sample reference. Hue, by far the dearest op
    (rgb -> hsv -> rgb), runs once for the whole batch: first the blends each sample draws *before* its
    hue (steps 0-2), then hue, then the blends it draws *after* it (steps 1-3). Six blend passes and one
    hue instead of four of each; every sample still sees its own op order, so the pixels are the same.
    `subset` form (CPU default): each step applies each op only to the samples drawn for it
    (data-dependent shapes, a host sync). Both give the same pixels.
    """
    if subset is None:
        subset = x.device.type == "cpu"
    if subset:
        x = x.clone()
        ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
        for step in range(4):
            op = order[:, step]
            for code, fn in enumerate(ops):
                sel = (on & (op == code)).nonzero()[:, 0]
                if sel.numel():
                    x[sel] = fn(x[sel], factors[sel, code])
        return x
    hue_at = (order == 3).to(torch.int64).argmax(dim=1)  # [B] position of hue in each sample's order

    def blend_step(x: Tensor, step: int, active: Tensor) -> Tensor:
        op = order[:, step]
        gray = rgb_to_gray(x)
        mean = gray.mean(dim=(1, 2, 3), keepdim=True)
        opb = op.view(-1, 1, 1, 1)
        ref = torch.where(opb == 1, mean, torch.where(opb == 2, gray, torch.zeros_like(gray)))
        f = factors.gather(1, op.clamp_max(2)[:, None])[:, 0]
        f = torch.where(active & on & (op < 3), f, torch.ones_like(f))
        return blend(x, ref, f)

    for step in range(3):  # the blends before hue (hue at position 0..3, so only steps 0..2 can precede it)
        x = blend_step(x, step, hue_at > step)
    x = torch.where(on.view(-1, 1, 1, 1), adjust_hue(x, factors[:, 3]), x)
    for step in range(1, 4):  # the blends after hue
        x = blend_step(x, step, hue_at < step)
    return x


def photometric(x: Tensor, view: ViewSpec, p: Photometric, subset: bool | None = None) -> Tensor:
    """Jitter -> grayscale -> blur on float [B, 3, H, W] in [0, 1] (the MoCo v2 order).

    `subset` (CPU default) blurs only the samples drawn for it; see `color_jitter`.
    """
    if subset is None:
        subset = x.device.type == "cpu"
    if p.jitter_on is not None:
        x = color_jitter(x, p.factors, p.order, p.jitter_on, subset)  # type: ignore[arg-type]
    if p.gray_on is not None:
        x = torch.where(p.gray_on.view(-1, 1, 1, 1), rgb_to_gray(x).expand_as(x), x)
    if p.blur_on is not None and view.blur is not None:
        k = view.blur.kernel_size(x.shape[-1])
        if subset:
            sel = p.blur_on.nonzero()[:, 0]
            if sel.numel():
                x = x.clone()
                x[sel] = gaussian_blur(x[sel], p.sigma[sel], k)  # type: ignore[index]
        else:
            x = torch.where(p.blur_on.view(-1, 1, 1, 1), gaussian_blur(x, p.sigma, k), x)  # type: ignore[arg-type]
    return x


def normalize(x: Tensor, mean: Tensor, std: Tensor, dtype: torch.dtype) -> Tensor:
    """(x - mean) / std, cast to the training dtype, channels-last."""
    y = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    return y.to(dtype=dtype, memory_format=torch.channels_last)


def autoaugment_(x: Tensor, seed: int) -> Tensor:
    """ImageNet AutoAugment per sample (torchvision's, on uint8), its policy draws seeded by `seed`.

    torchvision draws the sub-policy on the global CPU RNG and loops over images: correct but a host-side
    loop, so a spec with AutoAugment is not graph-capturable (the default recipes do not use it).
    """
    from torchvision.transforms import AutoAugment, AutoAugmentPolicy

    aa = AutoAugment(AutoAugmentPolicy.IMAGENET)
    u8 = (x * 255.0).round_().clamp_(0, 255).to(torch.uint8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = torch.stack([aa(img) for img in u8.contiguous()])
    return out.to(torch.float32).div_(255.0).contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------------------------------- the augmenter
class PixelAugmenter:
    """Renders an AugSpec from a ragged flat pixel store living on `device` (the cache backend's engine).

    `augment(indices)` is a pure device function of (store, indices, generator state): fixed shapes, no
    host sync unless the spec asks for AutoAugment.
    """

    def __init__(
        self,
        spec,  # AugSpec
        pixels: Tensor,
        offsets: Tensor,
        heights: Tensor,
        widths: Tensor,
        dtype: torch.dtype,
        generator: torch.Generator | None,
    ) -> None:
        self.spec = spec
        self.pixels, self.offsets, self.heights, self.widths = pixels, offsets, heights, widths
        self.dtype = dtype
        self.gen = generator
        dev = pixels.device
        self.device = dev
        self._norm = [
            (torch.tensor(v.normalize.mean, device=dev), torch.tensor(v.normalize.std, device=dev))
            for v in spec.views
        ]

    def augment(self, indices: Tensor) -> list[Tensor]:
        """Views for store rows `indices` (int64 [B] on the device)."""
        return self.render(self.pixels, self.offsets[indices], self.heights[indices], self.widths[indices])

    def render(self, pixels: Tensor, base: Tensor, H: Tensor, W: Tensor) -> list[Tensor]:
        """Views of the H x W images starting at flat rows `base` of `pixels` (store or staged batch)."""
        outs: list[Tensor] = []
        b = base.shape[0]
        if cpu_kernel_ok(pixels.device, self.spec.views):
            return self._render_cpu(pixels, base, H, W)
        for vi, view in enumerate(self.spec.views):
            mean, std = self._norm[vi]
            for ys, xs in self._geometry(view, H, W):
                x = resample(pixels, base, W, ys, xs)
                if view.autoaugment:
                    seed = int(torch.randint(1 << 62, (1,), generator=self.gen, device=self.device).item())
                    x = autoaugment_(x, seed)
                ph = sample_photometric(view, b, self.gen, self.device)
                x = photometric(x, view, ph)
                outs.append(normalize(x, mean, std, self.dtype))
        return outs

    def _render_cpu(self, pixels: Tensor, base: Tensor, H: Tensor, W: Tensor) -> list[Tensor]:
        """`render` through the numba kernel: the same generator draws, in the same order, per view."""
        b = base.shape[0]
        views: list[CPUView] = []
        for vi, view in enumerate(self.spec.views):
            mean, std = self._norm[vi]
            geoms = self._geometry(view, H, W)
            for ys, xs in geoms:
                ph = sample_photometric(view, b, self.gen, self.device)
                views.append(CPUView(ys, xs, view, ph, mean, std))
        return render_cpu(pixels, base, W, views, self.dtype)

    def _geometry(self, view: ViewSpec, H: Tensor, W: Tensor) -> list[tuple[AxisMap, AxisMap]]:
        if isinstance(view.crop, RandomResizedCrop):
            t, l, ch, cw = sample_rrc(H, W, view.crop, self.gen)
            flip = None
            if view.hflip_p > 0:
                flip = torch.rand(H.shape[0], generator=self.gen, device=H.device) < view.hflip_p
            return [rrc_maps(t, l, ch, cw, view.res, flip)]
        return [eval_maps(H, W, box, view.res) for box in resize_center_boxes(H, W, view.crop)]


# ------------------------------------------------------------------------------- CPU fast path (numba)
# On CPU the batched ops above stream every intermediate of the whole batch through memory and evaluate
# hue for every sample at each of the four jitter positions. When numba is installed (the ffcv extra),
# the CPU path instead renders one sample at a time in cache-resident buffers, applying each op only
# where its draw says so, in nogil kernels spread over torch.get_num_threads() host threads. The draws
# are the same generator calls as the batched path and every op is the same float32 formula, so both
# paths give the same pixels up to float rounding (tests/test_gpu_aug.py checks one against the other).
try:
    import numba as _nb
except Exception:  # not installed (it comes with the ffcv extra) or a broken build: batched torch path
    _nb = None

_F0, _F1, _FH = np.float32(0.0), np.float32(1.0), np.float32(0.5)
_F2, _F4, _F6 = np.float32(2.0), np.float32(4.0), np.float32(6.0)
_F5, _F3 = np.float32(5.0), np.float32(3.0)
_F16 = np.float32(1.0 / 6.0)
_INV255 = np.float32(1.0 / 255.0)
_GW0, _GW1, _GW2 = (np.float32(w) for w in _GRAY_W)
CPU_KERNEL = _nb is not None and os.environ.get("FASTVPD_CPU_KERNEL", "1") != "0"

if _nb is not None:

    @_nb.njit(inline="always", cache=True)
    def _lerp(a, b, w):  # noqa: ANN001, ANN202 - torch.lerp's formula
        if abs(w) < _FH:
            return a + w * (b - a)
        return b - (b - a) * (_F1 - w)

    @_nb.njit(inline="always", cache=True)
    def _clamp01(v):  # noqa: ANN001, ANN202
        return min(max(v, _F0), _F1)

    @_nb.njit(inline="always", cache=True)
    def _gray(r, g, b):  # noqa: ANN001, ANN202
        return r * _GW0 + g * _GW1 + b * _GW2

    @_nb.njit(inline="always", cache=True)
    def _rem(a, m):  # noqa: ANN001, ANN202 - torch.remainder
        return a - np.floor(a / m) * m

    @_nb.njit(inline="always", cache=True)
    def _rem6(a):  # noqa: ANN001, ANN202 - torch.remainder(a, 6) with a reciprocal (same up to an ulp)
        return a - np.floor(a * _F16) * _F6

    @_nb.njit(inline="always", cache=True)
    def _hue_px(r, g, b, f):  # noqa: ANN001, ANN202
        """adjust_hue of one pixel: rgb_to_hsv, shift, closed-form hsv_to_rgb (same formulas as above)."""
        maxc = max(r, max(g, b))
        minc = min(r, min(g, b))
        eqc = maxc == minc
        cr = maxc - minc
        s = cr / (_F1 if eqc else maxc)
        crd = _F1 if eqc else cr
        inv = _F1 / crd  # reciprocals instead of 6 more divisions: within an ulp, and hue is the hot op
        rc = (maxc - r) * inv
        gc = (maxc - g) * inv
        bc = (maxc - b) * inv
        if maxc == r:
            h = bc - gc
        elif maxc == g:
            h = _F2 + rc - bc
        else:
            h = _F4 + gc - rc
        h = h * _F16 + _F1  # in [5/6, 11/6): fmod(h, 1) is exactly this select (no libm call)
        h = h - _F1 if h >= _F1 else h
        h6 = _rem(h + f, _F1) * _F6
        vs = maxc * s
        k = _rem6(_F5 + h6)
        r2 = maxc - vs * min(max(min(k, _F4 - k), _F0), _F1)
        k = _rem6(_F3 + h6)
        g2 = maxc - vs * min(max(min(k, _F4 - k), _F0), _F1)
        k = _rem6(_F1 + h6)
        b2 = maxc - vs * min(max(min(k, _F4 - k), _F0), _F1)
        return r2, g2, b2

    @_nb.njit(nogil=True, cache=True, fastmath={"nsz", "contract"})
    def _hue_pass(img, f):  # noqa: ANN001, ANN202
        """adjust_hue over one image [n, 3] in place (no NaNs/infs can occur: safe to relax signed zeros)."""
        for q in range(img.shape[0]):
            img[q, 0], img[q, 1], img[q, 2] = _hue_px(img[q, 0], img[q, 1], img[q, 2], f)

    @_nb.njit(nogil=True, cache=True)
    def _render_rows(  # noqa: ANN202, PLR0913
        pixels,
        base,
        width,
        y0,
        y1,
        fy,
        x0,
        x1,
        fx,
        jit_on,
        factors,
        order,
        gray_on,
        blur_on,
        kernels,
        mean,
        std,
        out,
        lo,
        hi,
    ):  # noqa: ANN001
        """Samples lo..hi of one view: resample -> jitter (per-sample order) -> grey -> blur -> normalise."""
        R = out.shape[1]
        n = R * R
        img = np.empty((n, 3), np.float32)
        tmp = np.empty((R, R * 3), np.float32)
        k = kernels.shape[1]
        p = k // 2
        row = np.empty((R + 2 * p) * 3, np.float32)
        hrow = np.empty((2, R * 3), np.float32)
        tags = np.full(2, -1, np.int64)
        flat = img.reshape(n * 3)
        for bi in range(lo, hi):
            b0 = base[bi]
            w = width[bi]
            # separable as torch evaluates it: lerp along x within the two source rows, then along y;
            # the x-lerped source rows are kept (two slots), since neighbouring output rows share them
            tags[0] = -1
            tags[1] = -1
            for i in range(R):
                r0 = b0 + y0[bi, i] * w
                r1 = b0 + y1[bi, i] * w
                s0 = 0 if tags[0] == r0 else (1 if tags[1] == r0 else -1)
                s1 = 0 if tags[0] == r1 else (1 if tags[1] == r1 else -1)
                for want in range(2):
                    if want == 0 and s0 < 0:
                        s0 = 1 if s1 == 0 else 0
                        slot, src = s0, r0
                    elif want == 1 and s1 < 0:
                        s1 = 1 if s0 == 0 else 0
                        slot, src = s1, r1
                    else:
                        continue
                    tags[slot] = src
                    for j in range(R):
                        c0 = src + x0[bi, j]
                        c1 = src + x1[bi, j]
                        wx = fx[bi, j]
                        for c in range(3):
                            hrow[slot, j * 3 + c] = _lerp(
                                np.float32(pixels[c0, c]), np.float32(pixels[c1, c]), wx
                            )
                wy = fy[bi, i]
                o = i * R * 3
                for q in range(R * 3):
                    flat[o + q] = _lerp(hrow[s0, q], hrow[s1, q], wy) * _INV255
            if jit_on[bi]:
                for step in range(4):
                    op = order[bi, step]
                    f = factors[bi, op]
                    if op == 0:  # brightness: blend with black
                        for q in range(n):
                            for c in range(3):
                                img[q, c] = _clamp01(f * img[q, c])
                    elif op == 1:  # contrast: blend with the mean grey level
                        acc = 0.0
                        for q in range(n):
                            acc += _gray(img[q, 0], img[q, 1], img[q, 2])
                        ref = np.float32(acc / n)
                        for q in range(n):
                            for c in range(3):
                                img[q, c] = _clamp01(f * img[q, c] + (_F1 - f) * ref)
                    elif op == 2:  # saturation: blend with the pixel's grey
                        for q in range(n):
                            ref = _gray(img[q, 0], img[q, 1], img[q, 2])
                            for c in range(3):
                                img[q, c] = _clamp01(f * img[q, c] + (_F1 - f) * ref)
                    else:
                        _hue_pass(img, f)
            if gray_on[bi]:
                for q in range(n):
                    ref = _gray(img[q, 0], img[q, 1], img[q, 2])
                    img[q, 0] = ref
                    img[q, 1] = ref
                    img[q, 2] = ref
            if blur_on[bi]:  # separable, reflect padding; rows (H) first, then columns, as gaussian_blur
                kern = kernels[bi]
                img2 = img.reshape(R, R * 3)
                for i in range(R):
                    for q in range(R * 3):
                        tmp[i, q] = _F0
                    for t in range(k):
                        si = i + t - p
                        si = -si if si < 0 else (2 * (R - 1) - si if si >= R else si)
                        wt = kern[t]
                        for q in range(R * 3):
                            tmp[i, q] += wt * img2[si, q]
                for i in range(R):
                    for j in range(R + 2 * p):  # the row, reflect-padded, so the taps need no branches
                        sj = j - p
                        sj = -sj if sj < 0 else (2 * (R - 1) - sj if sj >= R else sj)
                        for c in range(3):
                            row[j * 3 + c] = tmp[i, sj * 3 + c]
                    for q in range(R * 3):  # every tap is one contiguous (vectorisable) row update
                        img2[i, q] = _F0
                    for t in range(k):
                        wt = kern[t]
                        sh = t * 3
                        for q in range(R * 3):
                            img2[i, q] += wt * row[q + sh]
            o = out[bi].reshape(n, 3)
            for q in range(n):
                for c in range(3):
                    o[q, c] = (img[q, c] - mean[c]) / std[c]


_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0


def _forget_pool() -> None:
    """In a forked child the pool's threads do not exist: start a fresh pool there if one is needed."""
    global _POOL, _POOL_SIZE
    _POOL, _POOL_SIZE = None, 0


os.register_at_fork(after_in_child=_forget_pool)


def _pool(threads: int) -> ThreadPoolExecutor:
    global _POOL, _POOL_SIZE
    if _POOL is None or _POOL_SIZE != threads:
        if _POOL is not None:
            _POOL.shutdown(wait=True)
        _POOL = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fastvpd-cpu-aug")
        _POOL_SIZE = threads
    return _POOL


@dataclass
class CPUView:
    """One view's resampling maps, photometric draws and normalisation, ready for the CPU kernel."""

    ys: AxisMap
    xs: AxisMap
    view: ViewSpec
    params: Photometric
    mean: Tensor
    std: Tensor


def cpu_kernel_ok(device: torch.device, views: list[ViewSpec] | tuple[ViewSpec, ...]) -> bool:
    """Whether the numba CPU path can render these views here (CPU, numba present, no AutoAugment)."""
    return CPU_KERNEL and device.type == "cpu" and not any(v.autoaugment for v in views)


def identity_maps(b: int, res: int) -> tuple[AxisMap, AxisMap]:
    """Axis maps that copy a res x res image unchanged (for batches already cropped, e.g. by FFCV)."""
    i = torch.arange(res).expand(b, res).contiguous()
    z = torch.zeros(b, res)
    return AxisMap(i, i, z), AxisMap(i, i, z)


def render_cpu_images(
    images: Tensor, views: list[ViewSpec], params: list[Photometric], norms: list, dtype: torch.dtype
) -> list[Tensor]:
    """Photometric ops + normalise of already-cropped uint8 views through the CPU kernel.

    images[v] is uint8 [B, 3, R, R] channels-last (HWC memory) on the CPU; same results as
    `photometric(x / 255)` + `normalize`, up to float rounding. Each sample must be one dense HWC image;
    the batch stride is free (a view slot of FFCV's [B, V, R, R, 3] buffer is read in place).
    """
    outs = []
    for x, view, ph, (mean, std) in zip(images, views, params, norms):
        b, res = x.shape[0], x.shape[-1]
        hwc = x.permute(0, 2, 3, 1)
        sb, off = hwc.stride(0), hwc.storage_offset()
        if hwc.stride()[1:] != (res * 3, 3, 1) or sb % 3 or off % 3:
            hwc = hwc.contiguous()
            sb, off = hwc.stride(0), hwc.storage_offset()
        # the whole storage seen as [P, 3] pixels; sample i starts at pixel base[i]
        pixels = hwc.as_strided((hwc.untyped_storage().nbytes() // 3, 3), (3, 1), 0)
        base = torch.arange(b, dtype=torch.int64) * (sb // 3) + off // 3
        ys, xs = identity_maps(b, res)
        width = torch.full((b,), res, dtype=torch.int64)
        outs += render_cpu(pixels, base, width, [CPUView(ys, xs, view, ph, mean, std)], dtype)
    return outs


def render_cpu(
    pixels: Tensor, base: Tensor, width: Tensor, views: list[CPUView], dtype: torch.dtype
) -> list[Tensor]:
    """Render views with the numba kernel: float32 [B, 3, R, R] channels-last each, cast to `dtype`.

    `pixels` is a uint8 [P, 3] store (or a batch of HWC images seen as one) on the CPU; the work is split
    into sample chunks over torch.get_num_threads() threads (the kernels release the GIL).
    """
    pix = pixels.numpy()
    b = int(base.shape[0])
    bn = base.numpy()
    wn = width.to(torch.int64).numpy()
    jobs = []
    outs = []
    for cv in views:
        res = cv.ys.i0.shape[1]
        p = cv.params
        out = torch.empty((b, res, res, 3), dtype=torch.float32)
        none = torch.zeros(b, dtype=torch.bool)
        jit_on = p.jitter_on if p.jitter_on is not None else none
        factors = p.factors if p.factors is not None else torch.ones(b, 4)
        order = p.order if p.order is not None else torch.zeros(b, 4, dtype=torch.int64)
        gray_on = p.gray_on if p.gray_on is not None else none
        if p.blur_on is not None and cv.view.blur is not None:
            blur_on = p.blur_on
            kernels = gaussian_kernels(p.sigma, cv.view.blur.kernel_size(res))  # type: ignore[arg-type]
        else:
            blur_on, kernels = none, torch.ones(b, 1)
        args = (
            pix,
            bn,
            wn,
            cv.ys.i0.numpy(),
            cv.ys.i1.numpy(),
            cv.ys.frac.to(torch.float32).numpy(),
            cv.xs.i0.numpy(),
            cv.xs.i1.numpy(),
            cv.xs.frac.to(torch.float32).numpy(),
            jit_on.numpy(),
            factors.to(torch.float32).contiguous().numpy(),
            order.contiguous().numpy(),
            gray_on.numpy(),
            blur_on.numpy(),
            kernels.to(torch.float32).contiguous().numpy(),
            cv.mean.to(torch.float32).numpy(),
            cv.std.to(torch.float32).numpy(),
            out.numpy(),
        )
        jobs.append(args)
        outs.append(out)
    threads = max(1, torch.get_num_threads())
    chunk = max(1, -(-b // (8 * threads)))  # small chunks: balances blur/jitter-heavy samples
    tasks = [(a, lo, min(b, lo + chunk)) for a in jobs for lo in range(0, b, chunk)]
    if threads == 1 or len(tasks) == 1:
        for a, lo, hi in tasks:
            _render_rows(*a, lo, hi)
    else:
        for f in [_pool(threads).submit(_render_rows, *a, lo, hi) for a, lo, hi in tasks]:
            f.result()
    return [o.permute(0, 3, 1, 2).to(dtype=dtype, memory_format=torch.channels_last) for o in outs]

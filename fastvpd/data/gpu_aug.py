"""Batched, sync-free augmentation in torch (GPU first, runs on CPU too).

Everything here works on whole batches with per-sample parameters drawn from a caller-owned
`torch.Generator`: fixed shapes, no host synchronisation, no data-dependent control flow (except the
optional AutoAugment path), so the training step can capture it in a CUDA graph.

Geometry: crop + resize + flip are one bilinear resampling straight from a ragged flat pixel store
(`pixels[P, 3]` uint8, image i at rows offsets[i] .. offsets[i] + h*w); it reproduces
`torchvision.transforms.functional.resized_crop(..., antialias=False)` (PyTorch's align_corners=False
bilinear on the crop). Photometric ops follow `torchvision.transforms.functional` on float images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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


def color_jitter(x: Tensor, factors: Tensor, order: Tensor, on: Tensor) -> Tensor:
    """torchvision ColorJitter with per-sample factors and per-sample op order; identity where not `on`.

    Brightness/contrast/saturation are blends (identity at factor 1), so each step is one blend with a
    per-sample reference; hue is evaluated for the whole batch at each step and selected with `where`.
    """
    for step in range(4):
        op = order[:, step]
        gray = rgb_to_gray(x)
        mean = gray.mean(dim=(1, 2, 3), keepdim=True)
        opb = op.view(-1, 1, 1, 1)
        ref = torch.where(opb == 1, mean, torch.where(opb == 2, gray, torch.zeros_like(gray)))
        f = factors.gather(1, op.clamp_max(2)[:, None])[:, 0]
        f = torch.where(on & (op < 3), f, torch.ones_like(f))
        x = blend(x, ref, f)
        do_hue = (on & (op == 3)).view(-1, 1, 1, 1)
        x = torch.where(do_hue, adjust_hue(x, factors[:, 3]), x)
    return x


def photometric(x: Tensor, view: ViewSpec, p: Photometric) -> Tensor:
    """Jitter -> grayscale -> blur on float [B, 3, H, W] in [0, 1] (the MoCo v2 order)."""
    if p.jitter_on is not None:
        x = color_jitter(x, p.factors, p.order, p.jitter_on)  # type: ignore[arg-type]
    if p.gray_on is not None:
        x = torch.where(p.gray_on.view(-1, 1, 1, 1), rgb_to_gray(x).expand_as(x), x)
    if p.blur_on is not None and view.blur is not None:
        k = view.blur.kernel_size(x.shape[-1])
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

    def _geometry(self, view: ViewSpec, H: Tensor, W: Tensor) -> list[tuple[AxisMap, AxisMap]]:
        if isinstance(view.crop, RandomResizedCrop):
            t, l, ch, cw = sample_rrc(H, W, view.crop, self.gen)
            flip = None
            if view.hflip_p > 0:
                flip = torch.rand(H.shape[0], generator=self.gen, device=H.device) < view.hflip_p
            return [rrc_maps(t, l, ch, cw, view.res, flip)]
        return [eval_maps(H, W, box, view.res) for box in resize_center_boxes(H, W, view.crop)]

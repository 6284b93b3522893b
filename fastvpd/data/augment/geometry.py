"""Geometry of the views: crop sampling, per-axis source maps and the bilinear resample.

Crop + resize + flip are one bilinear resampling straight from a ragged flat pixel store (`pixels[P, 3]`
uint8, image i at rows offsets[i] .. offsets[i] + h*w). It reproduces
`torchvision.transforms.functional.resized_crop(..., antialias=False)`: PyTorch's align_corners=False
bilinear on the crop, without the antialiasing filter torchvision's PIL path applies when it shrinks an
image (METHOD.md, "Resampling", gives the measured difference). Every draw takes a caller-owned
`torch.Generator`, fixed shapes, no host sync: a CUDA graph captures it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fastvpd.data.spec import RandomResizedCrop, ResizeCenterCrop, ViewSpec

RRC_TRIES = 10


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
    tried = torch.stack((top_t, left_t, ch_t, cw_t))
    pick = torch.where(any_valid, tried, torch.stack((top_f, left_f, ch_f, cw_f))).to(torch.int64)
    return tuple(pick.unbind(0))  # type: ignore[return-value]


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
    if flip is not None:  # mirrored samples read output column res-1-o (same values as flipping the maps)
        o = torch.where(flip[:, None], (res - 1) - o, o)
    src = (off.float()[:, None] + (o + 0.5) * step.float()[:, None] - 0.5).clamp_min(0.0)
    i0f = torch.floor(src)
    frac = src - i0f
    i0 = (i0f.to(torch.int64) + lo[:, None]).minimum(hi[:, None])
    i1 = (i0 + 1).minimum(hi[:, None])
    return AxisMap(i0, i1, frac)


def store_window(heights: Tensor, widths: Tensor) -> tuple[int, int]:
    """(K, rows): the widest image K, and the store size from which `resample(..., window=K)` is safe.

    Host values, computed once per store (one sync, outside any captured region).
    """
    if heights.numel() == 0:
        return 1, 1
    k = int(widths.max())
    return k, int(((heights.to(torch.int64) - 1) * widths.to(torch.int64)).max()) + k


def resample(
    pixels: Tensor, base: Tensor, width: Tensor, ys: AxisMap, xs: AxisMap, window: int | None = None
) -> Tensor:
    """Bilinear gather from the flat store: float32 [B, 3, R, R] in [0, 1], channels-last memory.

    Sample b, output (y, x) blends pixels[base[b] + Y*width[b] + X] for Y in {y0, y1}, X in {x0, x1}.
    One gather fetches all four corners as uint8 [B, R, 2, R, 2, 3]. With `window` = K (see
    `store_window`: K >= every width and pixels.shape[0] >= (h-1)*w + K for every image read) it indexes
    an overlapping [P-K+1, K] view of the store with a row vector and a column vector that broadcast, so no
    per-pixel index tensor is written; otherwise a flat int64 index [B, R, 2, R, 2] is built. Then a lerp
    along x (weights scaled by 1/255, the uint8 -> float cast folded in) and one along y.
    """
    rows = torch.stack((ys.i0, ys.i1), dim=2)  # [B, R, 2]
    cols = torch.stack((xs.i0, xs.i1), dim=2)
    p = pixels.shape[0]
    wd = width[:, None, None]
    if window is not None and pixels.stride() == (3, 1) and p >= window:
        k = window
        # shift each sample's row starts back (and its columns forward) so the last row read still has a
        # full K-wide window inside the store; exact, because row + column is unchanged
        shift = (base + ys.i1.amax(dim=1) * width + k - p).clamp_min(0)
        r = (base - shift)[:, None, None] + rows * wd
        c = cols + shift[:, None, None]
        win = pixels.as_strided((p - k + 1, k, 3), (3, 3, 1))
        g = win[r[:, :, :, None, None], c[:, None, None]]
    else:
        g = pixels[(base[:, None, None] + rows * wd)[:, :, :, None, None] + cols[:, None, None]]
    fx = xs.frac[:, None, None, :, None]
    t = g[..., 0, :] * ((1.0 - fx) * (1.0 / 255.0))  # [B, R, 2, R, 3] float32
    t.addcmul_(g[..., 1, :], fx * (1.0 / 255.0))
    out = torch.lerp(t[:, :, 0], t[:, :, 1], ys.frac[:, :, None, None])  # [B, R, R, 3]
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


def images_as_store(x: Tensor) -> tuple[Tensor, Tensor, Tensor, AxisMap, AxisMap]:
    """Already-cropped uint8 views [B, 3, R, R] with NHWC memory seen as a pixel store, without a copy
    when each sample is one dense HWC image (the batch stride is free: a view slot of FFCV's
    [B, V, R, R, 3] buffer): (pixels [P, 3], base [B], width [B], ys, xs), where sample i starts at
    pixel base[i] and the axis maps copy each R x R image unchanged. The renderers then read in place."""
    b, res = x.shape[0], x.shape[-1]
    hwc = x.permute(0, 2, 3, 1)
    if hwc.stride()[1:] != (res * 3, 3, 1) or hwc.stride(0) % 3 or hwc.storage_offset() % 3:
        hwc = hwc.contiguous()
    pixels = hwc.as_strided((hwc.untyped_storage().nbytes() // 3, 3), (3, 1), 0)  # the whole storage
    base = torch.arange(b, dtype=torch.int64, device=x.device) * (hwc.stride(0) // 3)
    base += hwc.storage_offset() // 3
    i = torch.arange(res, device=x.device).expand(b, res).contiguous()
    z = torch.zeros(b, res, device=x.device)
    width = torch.full((b,), res, dtype=torch.int64, device=x.device)
    return pixels, base, width, AxisMap(i, i, z), AxisMap(i, i, z)


def view_maps(
    view: ViewSpec, H: Tensor, W: Tensor, gen: torch.Generator | None
) -> list[tuple[AxisMap, AxisMap]]:
    """A view's axis maps for images H x W [B]: a random resized crop (+ flip) drawn from `gen`, or the
    eval resize + centre crop (ten maps for ten-crop)."""
    if isinstance(view.crop, RandomResizedCrop):
        t, l, ch, cw = sample_rrc(H, W, view.crop, gen)
        flip = None
        if view.hflip_p > 0:
            flip = torch.rand(H.shape[0], generator=gen, device=H.device) < view.hflip_p
        return [rrc_maps(t, l, ch, cw, view.res, flip)]
    return [eval_maps(H, W, box, view.res) for box in resize_center_boxes(H, W, view.crop)]

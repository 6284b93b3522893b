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
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fastvpd.config import UserError
from fastvpd.data import triton_aug
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


# ---------------------------------------------------------------------------------- photometric ops
# Every op below streams whole [B, 3, H, W] float32 batches through memory, so they are written to make
# few passes: a brightness/contrast/saturation blend is one per-sample 3x3 colour matrix (one batched
# matmul + clamp), grayscale and normalisation fold into one more matrix, the blur is two batched matmuls
# with banded per-sample matrices, and hue runs a short closed form. Matmuls run in IEEE fp32 (TF32 off,
# see `exact_matmul`): they must give the same pixels as torchvision's elementwise formulas.
@contextmanager
def exact_matmul(device: torch.device) -> Iterator[None]:
    """Turn TF32 off for CUDA matmuls inside (the trainer may allow it globally); restore it after.

    A process-wide flag: a matmul another thread launches meanwhile also runs in full fp32 (slower, not
    less exact). CPU matmuls are fp32 unless the user lowered torch's fp32 matmul precision.
    """
    if device.type != "cuda":
        yield
        return
    m = torch.backends.cuda.matmul
    try:
        prev: Any = m.allow_tf32
        legacy = True
    except RuntimeError:  # the new fp32_precision API was used: stay on it
        prev, legacy = m.fp32_precision, False
    if legacy:
        m.allow_tf32 = False
    else:
        m.fp32_precision = "ieee"
    try:
        yield
    finally:
        if legacy:
            m.allow_tf32 = prev
        else:
            m.fp32_precision = prev


@dataclass
class _Consts:
    """Small device constants, built with kernels only (a host->device copy would break graph capture)."""

    gray: Tensor  # [3] torchvision luma weights
    eye: Tensor  # [3, 3]
    diff: Tensor  # [3, 3]: (diff @ rgb)[c] = rgb[c+1] - rgb[c+2] (hue numerators)
    hue_off: Tensor  # [3]: where r, g, b sit on the hue hexagon, shifted for the closed form in `_hue`

    @staticmethod
    def make(device: torch.device) -> _Consts:
        gray = torch.full((3,), _GRAY_W[2], device=device)
        gray[0], gray[1] = _GRAY_W[0], _GRAY_W[1]
        eye = torch.eye(3, device=device)
        diff = eye.roll(1, dims=1) - eye.roll(2, dims=1)
        hue_off = torch.arange(3, device=device, dtype=torch.float32).mul_(4.0).remainder_(6.0)  # 0, 4, 2
        return _Consts(gray, eye, diff, hue_off)


def _flat(x: Tensor) -> Tensor:
    """[B, 3, H, W] -> [B, H*W, 3] pixel rows (a view when x is channels-last)."""
    return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])


def _unflat(y: Tensor, h: int, w: int) -> Tensor:
    """[B, H*W, C] -> [B, C, H, W] channels-last view."""
    return y.view(y.shape[0], h, w, y.shape[2]).permute(0, 3, 1, 2)


# How the per-sample 3x3 colour matrices, hue's channel differences and the blur run *inside torch.compile*
# (`data.compile_aug`). "matmul" (the default) keeps the batched matmuls: what the H100 run 3 timed, 15.3 ms
# of GPU time per two-view batch of 256 at 224 px. "pointwise" spells them as short elementwise sums (the
# blur as a 1-D stencil of gathered taps), which Inductor can fuse with the clamps, hue, normalisation and
# cast around them, so no extern GEMM makes its own pass over the image. Not yet timed on a GPU (on the
# 2-core CPU, Inductor's C++ ran it 2.2x slower than "matmul"); benchmarks/throughput.py times it as the
# `cache_compiled_pointwise` loader row, and the faster becomes the default. Eager always runs the
# matmuls: spelled elementwise they would materialise 3x (colour) or k x (blur) temporaries.
COMPILED_FORM = "matmul"


def _fusable() -> bool:
    """True while torch.compile traces and the pointwise form is chosen (COMPILED_FORM)."""
    return COMPILED_FORM == "pointwise" and torch.compiler.is_compiling()


def mix_rows(xf: Tensor, mix: Tensor) -> Tensor:
    """Pixel rows times per-sample colour matrices: [B, N, 3] @ [B, 3, J] -> [B, N, J] (fp32)."""
    if _fusable():  # a size-3 sum Inductor unrolls into the surrounding pointwise kernel
        return (xf[:, :, :, None] * mix[:, None]).sum(dim=2)
    return torch.bmm(xf, mix)


def rgb_to_gray(x: Tensor) -> Tensor:
    """[B, 1, H, W] luma, torchvision weights."""
    return x[:, 0:1] * _GRAY_W[0] + x[:, 1:2] * _GRAY_W[1] + x[:, 2:3] * _GRAY_W[2]


def blend_matrices(f: Tensor, op: Tensor, act: Tensor, c: _Consts) -> tuple[Tensor, Tensor]:
    """torchvision's blends as colour matrices, any batch shape [...]: (mix, mean_w), [..., 3, 3] each.

    Row-vector pixels: blend(x) = clamp(x @ mix + mean3 @ mean_w, 0, 1), mean3 = the image's channel means.
    op 0 brightness (f x), 1 contrast (f x + (1-f) mean(gray)), 2 saturation (f x + (1-f) gray(x));
    identity where not `act` (exactly: f = 1).
    """
    f = torch.where(act, f, 1.0)
    one_m = 1.0 - f
    sat = torch.where(op == 2, one_m, 0.0)[..., None, None]
    con = torch.where(op == 1, one_m, 0.0)[..., None, None]
    w1 = c.gray[:, None].expand(3, 3)  # column j = the luma weights: x @ w1 = gray in every channel
    mix = torch.addcmul(f[..., None, None] * c.eye, sat, w1)
    return mix, con * w1


def blend_apply(x: Tensor, mix: Tensor, mean_w: Tensor) -> Tensor:
    """clamp(x @ mix + mean3 @ mean_w, 0, 1) per sample: one matmul pass and an in-place clamp."""
    b, _, h, w = x.shape
    xf = _flat(x)
    bias = torch.bmm(xf.mean(dim=1, keepdim=True), mean_w)  # [B, 1, 3]
    return _unflat(torch.baddbmm(bias, xf, mix).clamp_(0.0, 1.0), h, w)


def blend_lazy(x: Tensor, beta: Tensor, mix: Tensor, mean_w: Tensor, colsum: Tensor) -> tuple[Tensor, Tensor]:
    """`blend_apply` on the image x + beta (beta [B, 1, 1]: a per-sample offset common to all channels,
    carried instead of added), returning the result in the same form.

    (x + beta) @ mix = x @ mix + beta * colsum(mix), and the contrast term is also the same in every
    channel, so the offset stays channel-free; the clamp to [0, 1] becomes a clamp of the stored values to
    [-beta', 1 - beta']. One matmul with no bias operand (a GEMM with a broadcast bias first copies it into
    its output) and one in-place clamp per blend.
    """
    b, _, h, w = x.shape
    xf = _flat(x)
    mean3 = xf.mean(dim=1, keepdim=True).add_(beta)  # the true image's channel means
    beta = torch.addcmul(mix_rows(mean3, mean_w[:, :, :1]), beta, colsum)  # colsum [B, 1, 1] of mix
    y = mix_rows(xf, mix).clamp_(min=beta.neg(), max=1.0 - beta)
    return _unflat(y, h, w), beta


def _blend(x: Tensor, f: Tensor, op: int) -> Tensor:
    c = _Consts.make(x.device)
    ops = torch.full_like(f, op, dtype=torch.int64)
    with exact_matmul(x.device):
        return blend_apply(x, *blend_matrices(f, ops, torch.ones_like(ops, dtype=torch.bool), c))


def adjust_brightness(x: Tensor, f: Tensor) -> Tensor:
    return _blend(x, f, 0)


def adjust_contrast(x: Tensor, f: Tensor) -> Tensor:
    return _blend(x, f, 1)


def adjust_saturation(x: Tensor, f: Tensor) -> Tensor:
    return _blend(x, f, 2)


def hue_apply(x: Tensor, f: Tensor, c: _Consts, on: Tensor | None = None) -> Tensor:
    """torchvision adjust_hue (its `_rgb2hsv`, shift mod 1, `_hsv2rgb`) in closed form; x where not `on`.

    With M/m/C the max/min/range over channels and a the first channel holding M, hue*6 is
    h6 = 2a + (x[a+1] - x[a+2]) / C (mod 6), and `_hsv2rgb`'s v - v*s*clamp(min(k, 4-k), 0, 1) with
    k = (n + h6 + 6f) mod 6 (n = 5, 3, 1) equals (M - 2C) + C * clamp(|((h6 + 6f + off) mod 6) - 3|, 1, 2).
    Grey pixels (C = 0) come back unchanged, as in torchvision.
    """
    b, _, h, w = x.shape
    xf = _flat(x)
    mx, arg = xf.max(dim=2)  # [B, HW]; the first maximal channel, as torchvision's r-then-g order
    cr = mx - xf.amin(dim=2)
    if _fusable():  # d[b, j, n] = sum_i diff[j, i] x[b, n, i]
        d = mix_rows(xf, c.diff.mT.expand(b, 3, 3)).mT
    else:
        d = torch.bmm(c.diff.expand(b, 3, 3), xf.mT)  # [B, 3, HW] planar
    h6 = d.gather(1, arg[:, None])[:, 0].div_(cr.clamp_min(1e-30)).add_(arg, alpha=2)
    u = torch.add(h6[:, :, None], torch.add(c.hue_off, f[:, None, None], alpha=6.0))
    u.remainder_(6.0).sub_(3.0).abs_().clamp_(1.0, 2.0)
    out = torch.addcmul(torch.sub(mx, cr, alpha=2.0)[:, :, None], cr[:, :, None], u, out=u)
    if on is not None:
        out = torch.where(on[:, None, None], out, xf, out=out)
    return _unflat(out, h, w)


def adjust_hue(x: Tensor, f: Tensor) -> Tensor:
    """torchvision adjust_hue with per-sample hue shift f in [-0.5, 0.5]."""
    return hue_apply(x, f, _Consts.make(x.device))


def gaussian_kernels(sigma: Tensor, k: int) -> Tensor:
    """[B, k] normalised 1-D Gaussian kernels (torchvision `_get_gaussian_kernel1d`)."""
    half = (k - 1) * 0.5
    xs = torch.linspace(-half, half, k, device=sigma.device, dtype=torch.float32)
    pdf = torch.exp(-0.5 * (xs[None] / sigma.float()[:, None]).pow(2))
    return pdf / pdf.sum(dim=1, keepdim=True)


def blur_matrices(kernels: Tensor, n: int) -> Tensor:
    """[B, n, n] matrices A with (A @ v) = v convolved with each 1-D kernel, reflect padding folded in.

    A[b, i, j] sums kernels[b, t] over the taps t whose reflected source row reflect(i + t - k//2) is j.
    A delta kernel gives the identity exactly.
    """
    k = kernels.shape[1]
    src = reflect_taps(n, k, kernels.device)
    taps = (src[:, :, None] == torch.arange(n, device=kernels.device)).to(torch.float32)  # [t, i, j]
    return torch.mm(kernels.float(), taps.view(k, n * n)).view(-1, n, n)


def reflect_taps(n: int, k: int, device: torch.device) -> Tensor:
    """[k, n] int64: the row that tap t of a centred k-tap kernel reads for output row i, with torch's
    "reflect" padding (-1 -> 1, n -> n-2), periodic beyond one reflection."""
    i = torch.arange(n, device=device)
    src = torch.arange(-(k // 2), k - k // 2, device=device)[:, None] + i  # [t, i]
    if n > 1:
        src = src.remainder(2 * n - 2)
        return torch.where(src >= n, 2 * n - 2 - src, src)
    return torch.zeros_like(src)


def blur_stencil(x: Tensor, kernels: Tensor) -> Tensor:
    """The separable blur as gathered taps (rows, then columns; the same sums as the banded matrices of
    `blur_matrices`), for torch.compile: Inductor turns each pass into one kernel that reads k taps per
    output pixel. x [B, C, H, W], kernels [B, k] -> [B, C, H, W]."""
    _, _, h, w = x.shape
    k = kernels.shape[1]
    ker = kernels.float()
    rows = (x[:, :, reflect_taps(h, k, x.device)] * ker[:, None, :, None, None]).sum(dim=2)  # [B, C, H, W]
    return (rows[..., reflect_taps(w, k, x.device)] * ker[:, None, None, :, None]).sum(dim=3)


def _blur_planar(x: Tensor, ay: Tensor, ax: Tensor) -> Tensor:
    """Separable blur of channels-last x [B, C, H, W] by rows (ay [B, H, H]) then columns (ax [B, W, W]).

    Two batched matmuls whose operand orders turn the layout around for free: the first reads the (y, x, c)
    memory and writes (x, c, y), the second writes (c, y, x). Returns planar [B, C, H*W].
    """
    b, ch, h, w = x.shape
    rows = x.permute(0, 2, 3, 1).reshape(b, h, w * ch)  # [B, H, W*C] (a view when channels-last)
    o = torch.bmm(rows.mT, ay.mT)  # [B, W*C, H]: o[(x, c), y] = sum_y' ay[y, y'] x[y', x, c]
    z = torch.bmm(o.view(b, w, ch * h).mT, ax.mT)  # [B, C*H, W]
    return z.view(b, ch, h * w)


def blur_rows(x: Tensor, kernels: Tensor) -> Tensor:
    """x [B, C, H, W] channels-last blurred along both axes by each sample's 1-D kernel ([B, k]), as pixel
    rows [B, H*W, C]: banded matmuls (call under `exact_matmul`), or gathered taps inside torch.compile
    when COMPILED_FORM is "pointwise"."""
    h, w = x.shape[-2:]
    if _fusable():
        return _flat(blur_stencil(x, kernels).contiguous(memory_format=torch.channels_last))
    ay = blur_matrices(kernels, h)
    return _blur_planar(x, ay, ay if w == h else blur_matrices(kernels, w)).mT


def gaussian_blur(x: Tensor, sigma: Tensor, k: int) -> Tensor:
    """Per-sample separable Gaussian blur (reflect padding, as torchvision), channels-last out."""
    h, w = x.shape[-2:]
    with exact_matmul(x.device):
        rows = blur_rows(x, gaussian_kernels(sigma, k))
    return _unflat(rows, h, w).contiguous(memory_format=torch.channels_last)


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


def color_jitter(
    x: Tensor,
    factors: Tensor,
    order: Tensor,
    on: Tensor,
    subset: bool | None = None,
    consts: _Consts | None = None,
) -> Tensor:
    """torchvision ColorJitter with per-sample factors and per-sample op order; identity where not `on`.

    Fixed-shape form (GPU default, capturable): brightness/contrast/saturation are per-sample colour
    matrices (identity at factor 1, exactly), so each step is one matmul pass for the whole batch. Hue,
    the dearest op, runs once for the whole batch: first the blends each sample draws *before* its hue
    (steps 0-2), then hue, then the blends it draws *after* it (steps 1-3). Six blend passes and one hue
    instead of four of each; every sample still sees its own op order, so the pixels are the same.
    `subset` form (CPU default): each step applies each op only to the samples drawn for it
    (data-dependent shapes, a host sync), with the same formulas. Both give the same pixels.
    """
    if subset is None:
        subset = x.device.type == "cpu"
    c = consts if consts is not None else _Consts.make(x.device)
    with exact_matmul(x.device):
        if subset:
            x = x.clone(memory_format=torch.channels_last)
            for step in range(4):
                op = order[:, step]
                for code in range(4):
                    sel = (on & (op == code)).nonzero()[:, 0]
                    if not sel.numel():
                        continue
                    f = factors[sel, code]
                    if code == 3:
                        x[sel] = hue_apply(x[sel], f, c)
                    else:
                        x[sel] = blend_apply(x[sel], *blend_matrices(f, op[sel], on[sel], c))
            return x
        x, beta = jitter_fixed(x, factors, order, on, c)
        return x + beta[:, :, :, None]


def jitter_fixed(x: Tensor, factors: Tensor, order: Tensor, on: Tensor, c: _Consts) -> tuple[Tensor, Tensor]:
    """The fixed-shape `color_jitter` as (stored, beta [B, 1, 1]): the image is stored + beta (`blend_lazy`).

    Hue is unchanged by a common offset (h, s and the max-min range only see channel differences), so its
    formula applies to the stored values as they are.
    """
    with exact_matmul(x.device):
        x = x.contiguous(memory_format=torch.channels_last)
        dev = x.device
        hue_at = (order == 3).to(torch.int64).argmax(dim=1)  # [B] position of hue in each sample's order
        ops = torch.cat((order.T[0:3], order.T[1:4]))  # [6, B]: steps 0, 1, 2 before hue, then 1, 2, 3
        before = hue_at > torch.arange(3, device=dev)[:, None]
        after = hue_at < torch.arange(1, 4, device=dev)[:, None]
        act = torch.cat((before, after)) & on & (ops < 3)
        f = factors.gather(1, ops.T.clamp_max(2)).T
        mix, mean_w = blend_matrices(f, ops, act, c)  # [6, B, 3, 3] each: all passes' matrices at once
        colsum = mix[..., :1].sum(dim=-2, keepdim=True)  # [6, B, 1, 1]: every column of a mix sums alike
        beta = x.new_zeros(x.shape[0], 1, 1)
        for s in range(6):
            if s == 3:
                x = hue_apply(x, factors[:, 3], c, on)
            x, beta = blend_lazy(x, beta, mix[s], mean_w[s], colsum[s])
        return x, beta


def finish(
    x: Tensor,
    view: ViewSpec,
    p: Photometric,
    mean: Tensor | None = None,
    std: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    subset: bool = False,
    consts: _Consts | None = None,
    beta: Tensor | None = None,
) -> Tensor:
    """Grayscale -> blur -> normalise (each where the view and draws ask), channels-last `dtype` out.

    Fixed-shape form: the blur is two banded matmuls (a delta kernel, i.e. the identity, for samples not
    drawn for it), and grayscale and normalisation are one per-sample colour matrix applied after it (both
    are per-pixel linear maps, which commute with a blur that treats every channel alike). `subset` form:
    grayscale and blur only on the samples drawn for them, then `normalize`. `beta` [B, 1, 1]: x stands
    for x + beta (see `jitter_fixed`); the blur keeps the offset (its kernels sum to 1), the matrix maps it
    to a per-sample bias added in the pass that casts to `dtype`.
    """
    gray_on = p.gray_on
    blur_on = p.blur_on if view.blur is not None else None
    if subset:
        sel_mask = gray_on if blur_on is None else (blur_on if gray_on is None else gray_on | blur_on)
        if sel_mask is not None:
            sel = sel_mask.nonzero()[:, 0]
            if sel.numel():
                sub = Photometric(
                    gray_on=None if gray_on is None else gray_on[sel],
                    blur_on=None if blur_on is None else blur_on[sel],
                    sigma=None if blur_on is None else p.sigma[sel],  # type: ignore[index]
                )
                x = x.clone(memory_format=torch.channels_last)
                x[sel] = finish(x[sel], view, sub, consts=consts)
        return x if mean is None else normalize(x, mean, std, dtype)  # type: ignore[arg-type]
    if gray_on is None and blur_on is None and mean is None:
        x = x if beta is None else x + beta[:, :, :, None]
        return x.to(dtype=dtype, memory_format=torch.channels_last)
    b, ch, h, w = x.shape
    c = consts if consts is not None else _Consts.make(x.device)
    mix = c.eye.expand(b, 3, 3)
    if gray_on is not None:
        mix = torch.where(gray_on[:, None, None], c.gray[:, None].expand(3, 3), mix)
    with exact_matmul(x.device):
        if blur_on is not None:
            k = view.blur.kernel_size(h)  # type: ignore[union-attr]
            ker = gaussian_kernels(p.sigma, k)  # type: ignore[arg-type]
            delta = (torch.arange(k, device=x.device) == k // 2).to(torch.float32)
            src = blur_rows(x, torch.where(blur_on[:, None], ker, delta))  # [B, HW, 3]
        else:
            src = _flat(x)
        bias = None
        if mean is not None:
            inv = 1.0 / std  # type: ignore[operator]
            mix, bias = mix * inv, (-mean * inv).view(1, 1, 3)
        if beta is not None:
            off = beta * mix.sum(dim=1, keepdim=True)  # [B, 1, 3]
            bias = off if bias is None else off + bias
        y = mix_rows(src, mix)
    if bias is not None or dtype != torch.float32:
        out = torch.empty(y.shape, dtype=dtype, device=y.device)
        y = out.copy_(y) if bias is None else torch.add(y, bias, out=out)
    return _unflat(y, h, w)


def photometric(  # noqa: PLR0913
    x: Tensor,
    view: ViewSpec,
    p: Photometric,
    subset: bool | None = None,
    mean: Tensor | None = None,
    std: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    consts: _Consts | None = None,
) -> Tensor:
    """Jitter -> grayscale -> blur on float [B, 3, H, W] in [0, 1] (the MoCo v2 order), channels-last;
    with `mean`/`std` also normalised and cast to `dtype` (the fixed-shape form folds the normalisation
    into `finish`'s colour matrix).

    `subset` (CPU default) applies each op only to the samples drawn for it; see `color_jitter`.
    """
    if subset is None:
        subset = x.device.type == "cpu"
    c = consts if consts is not None else _Consts.make(x.device)
    x, beta = _jitter(x, p, subset, c)
    return finish(x, view, p, mean, std, dtype, subset, c, beta)


def _jitter(x: Tensor, p: Photometric, subset: bool, c: _Consts) -> tuple[Tensor, Tensor | None]:
    """Colour jitter where drawn: (image, None) in subset form, (stored, beta) in fixed-shape form."""
    if p.jitter_on is None:
        return x, None
    if subset:
        return color_jitter(x, p.factors, p.order, p.jitter_on, True, c), None  # type: ignore[arg-type]
    return jitter_fixed(x, p.factors, p.order, p.jitter_on, c)  # type: ignore[arg-type]


def normalize(x: Tensor, mean: Tensor, std: Tensor, dtype: torch.dtype) -> Tensor:
    """(x - mean) / std as one pass (x * (1/std) - mean/std), cast on store to the training dtype."""
    out = torch.empty(x.shape, dtype=dtype, device=x.device, memory_format=torch.channels_last)
    inv = 1.0 / std
    return torch.addcmul((-mean * inv).view(1, 3, 1, 1), x, inv.view(1, 3, 1, 1), out=out)


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
def render_pixels(  # noqa: PLR0913
    pixels: Tensor,
    base: Tensor,
    width: Tensor,
    ys: AxisMap,
    xs: AxisMap,
    window: int | None,
    view: ViewSpec,
    p: Photometric,
    mean: Tensor,
    std: Tensor,
    dtype: torch.dtype,
    c: _Consts,
) -> Tensor:
    """One view's pixels, fixed-shape form, from drawn geometry and photometric parameters: no random
    draws inside, so `torch.compile` can fuse it whole (`PixelAugmenter(compile=True)`)."""
    x = resample(pixels, base, width, ys, xs, window)
    return photometric(x, view, p, False, mean, std, dtype, c)


class PixelAugmenter:
    """Renders an AugSpec from a ragged flat pixel store living on `device` (the cache backend's engine).

    `augment(indices)` is a pure device function of (store, indices, generator state): fixed shapes, no
    host sync unless the spec asks for AutoAugment. `compile=True` runs the fixed-shape pixel work of each
    view (`render_pixels`, everything after the random draws) through `torch.compile`, for Inductor to fuse
    its elementwise chains (`data.compile_aug`); the draws stay eager, so the pixels come from the same
    parameters.
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
        compile: bool = False,
        kernel: str = "torch",
    ) -> None:
        self.spec = spec
        self._pixels_fn = torch.compile(render_pixels, dynamic=False) if compile else render_pixels
        # the fixed-shape views by `triton_aug` (compile is then unused): `triton`, or `auto` on a GPU
        self.triton = use_triton(kernel, pixels.device)
        self.pixels, self.offsets, self.heights, self.widths = pixels, offsets, heights, widths
        self.dtype = dtype
        self.gen = generator
        dev = pixels.device
        self.device = dev
        self._norm = [
            (torch.tensor(v.normalize.mean, device=dev), torch.tensor(v.normalize.std, device=dev))
            for v in spec.views
        ]
        self._window = store_window(heights, widths)  # (K, rows): the window gather's bound, see resample
        self._consts = _Consts.make(dev)

    def augment(self, indices: Tensor) -> list[Tensor]:
        """Views for store rows `indices` (int64 [B] on the device)."""
        return self.render(self.pixels, self.offsets[indices], self.heights[indices], self.widths[indices])

    def render(
        self, pixels: Tensor, base: Tensor, H: Tensor, W: Tensor, fixed_shape: bool = False
    ) -> list[Tensor]:
        """Views of the H x W images starting at flat rows `base` of `pixels` (store or staged batch).

        `fixed_shape` forces the capturable batched path the GPU runs, on CPU too (to test or measure it).
        """
        outs: list[Tensor] = []
        b = base.shape[0]
        if not fixed_shape and not self.triton and cpu_kernel_ok(pixels.device, self.spec.views):
            return self._render_cpu(pixels, base, H, W)
        subset = pixels.device.type == "cpu" and not fixed_shape and not self.triton
        k, rows = self._window
        window = k if pixels.shape[0] >= rows else None
        c = self._consts
        for vi, view in enumerate(self.spec.views):
            mean, std = self._norm[vi]
            for ys, xs in self._geometry(view, H, W):
                if not subset and not view.autoaugment:
                    ph = sample_photometric(view, b, self.gen, self.device)
                    if self.triton:
                        args = (view, ph, mean, std, self.dtype)
                        outs.append(triton_aug.render(pixels, base, W, ys, xs, *args))
                        continue
                    outs.append(
                        self._pixels_fn(pixels, base, W, ys, xs, window, view, ph, mean, std, self.dtype, c)
                    )
                    continue
                x = resample(pixels, base, W, ys, xs, window)
                if view.autoaugment:
                    seed = int(torch.randint(1 << 62, (1,), generator=self.gen, device=self.device).item())
                    x = autoaugment_(x, seed)
                ph = sample_photometric(view, b, self.gen, self.device)
                outs.append(photometric(x, view, ph, subset, mean, std, self.dtype, c))
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
        """adjust_hue of one pixel: torchvision's _rgb2hsv, shift, closed-form _hsv2rgb (cf. `hue_apply`)."""
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
        pixels, base, width, ys, xs = images_as_store(x)
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


# ------------------------------------------------------------------- finishing host-cropped uint8 views
def finish_view(
    x: Tensor,
    view: ViewSpec,
    p: Photometric,
    mean: Tensor,
    std: Tensor,
    dtype: torch.dtype,
    consts: _Consts,
    subset: bool | None = None,
) -> Tensor:
    """One decoded uint8 view [B, 3, R, R] finished on the device: jitter, grayscale, blur, normalise,
    `dtype` channels-last out. With `subset=False` (fixed shapes, no draws inside) `torch.compile` can
    fuse it whole; None is the device's default form (`photometric`). The float copy also takes the
    pixels out of the decoder's buffer (FFCV reuses its ring buffer `batches_ahead` later)."""
    x = x.to(torch.float32, memory_format=torch.channels_last).div_(255.0)
    return photometric(x, view, p, subset, mean, std, dtype, consts)


def use_triton(aug_kernel: str, device: torch.device) -> bool:
    """Whether `data.aug_kernel` picks triton_aug's kernels on `device`: `triton` (a UserError where they
    cannot run), or `auto` on a CUDA device where Triton loads; `torch` never."""
    if aug_kernel == "auto":
        return device.type == "cuda" and not triton_aug.unavailable(device)
    if aug_kernel != "triton":
        return False
    why = triton_aug.unavailable(device)
    if why:
        raise UserError(why)
    return True


class ViewFinisher:
    """The photometric half of the views a host decoder has cropped and flipped (the ffcv backend; dali
    with `data.dali_jitter=device`): uint8 [B, 3, R, R] views with NHWC memory in, each finished with
    jitter, grayscale, blur and normalise into `dtype` channels-last, with the cache backend's draws and
    ops: on CPU the numba kernel (`render_cpu_images`), with `aug_kernel="triton"` triton_aug's kernels,
    else `finish_view` (through torch.compile with `compile_aug`); AutoAugment views eagerly first.

    `__call__(images, seed)` reseeds `gen` with the batch's seed, so a batch's draws are a function of
    that seed alone (resume at any step is exact)."""

    def __init__(
        self,
        views: tuple[ViewSpec, ...] | list[ViewSpec],
        device: torch.device,
        dtype: torch.dtype,
        compile_aug: bool = False,
        aug_kernel: str = "torch",
    ) -> None:
        self.views = list(views)
        self.device, self.dtype = device, dtype
        self.norms = [
            (torch.tensor(v.normalize.mean, device=device), torch.tensor(v.normalize.std, device=device))
            for v in self.views
        ]
        self.gen = torch.Generator(device=device)
        self.consts = _Consts.make(device)
        # data.compile_aug: the fixed-shape finishing work through torch.compile, as the cache backend's
        # pixel work (the draws stay eager, so the pixels come from the same parameters)
        self.finish = torch.compile(finish_view, dynamic=False) if compile_aug else finish_view
        self.subset = False if compile_aug else None
        # data.aug_kernel=triton: the fixed-shape views by triton_aug's kernels, read where they lie
        self.triton = use_triton(aug_kernel, device)

    def __call__(self, images: list[Tensor], seed: int) -> list[Tensor]:
        self.gen.manual_seed(seed)
        if not self.triton and cpu_kernel_ok(self.device, self.views):
            # CPU: one fused pass per sample (numba); the draws as below. It copies out of the buffer.
            b = [x.shape[0] for x in images]
            params = [sample_photometric(v, n, self.gen, self.device) for v, n in zip(self.views, b)]
            return render_cpu_images(images, self.views, params, self.norms, self.dtype)
        out = []
        for vi, (view, x) in enumerate(zip(self.views, images)):
            mean, std = self.norms[vi]
            ph = sample_photometric(view, x.shape[0], self.gen, self.device)
            if view.autoaugment:  # data-dependent: eager (its own seed: the draws above are unchanged)
                xf = x.to(torch.float32, memory_format=torch.channels_last).div_(255.0)
                xf = autoaugment_(xf, seed + vi)
                out.append(photometric(xf, view, ph, None, mean, std, self.dtype, self.consts))
                continue
            if self.triton:
                out.append(triton_aug.render_images(x, view, ph, mean, std, self.dtype))
                continue
            out.append(self.finish(x, view, ph, mean, std, self.dtype, self.consts, self.subset))
        return out

"""The CPU rendering of the views: one numba kernel runs each sample's whole chain (resample -> jitter in
its own order -> grayscale -> blur -> normalise) in cache-resident buffers, applying each op only where
its draw says so, in nogil kernels spread over torch.get_num_threads() host threads.

On a CPU the batched torch ops (`photometric`) stream every intermediate of the whole batch through
memory and evaluate hue for every sample at each jitter position; this kernel does a fraction of that
work. The draws are the same generator calls and every op is the same float32 formula as the torch
reference, so both give the same pixels up to float rounding (tests/test_gpu_aug.py checks one against
the other). numba comes with the `cpu` extra; without it the CPU runs the torch reference.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fastvpd.data.augment.draws import Photometric
from fastvpd.data.augment.geometry import AxisMap, images_as_store
from fastvpd.data.augment.photometric import GRAY_W, gaussian_kernels
from fastvpd.data.spec import ViewSpec
from fastvpd.extras import probe

_nb = probe("numba")  # None: not installed (the `cpu` extra) or a broken build


_F0, _F1, _FH = np.float32(0.0), np.float32(1.0), np.float32(0.5)
_F2, _F4, _F6 = np.float32(2.0), np.float32(4.0), np.float32(6.0)
_F5, _F3 = np.float32(5.0), np.float32(3.0)
_F16 = np.float32(1.0 / 6.0)
_INV255 = np.float32(1.0 / 255.0)
_GW0, _GW1, _GW2 = (np.float32(w) for w in GRAY_W)
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

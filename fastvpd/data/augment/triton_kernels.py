"""Triton kernels of `augment.triton` (imported by `triton.load()`, which picks the interpreter without a
GPU). Each pixel runs the whole chain in registers; the formulas are the torch reference's (torchvision's)."""
# ruff: noqa: ANN001, ANN202, PLR0913, PLR0915, N803

from __future__ import annotations

import triton
import triton.language as tl

GW0 = tl.constexpr(0.2989)  # torchvision rgb_to_grayscale weights (photometric.GRAY_W)
GW1 = tl.constexpr(0.587)
GW2 = tl.constexpr(0.114)
UNROLL_TAPS = tl.constexpr(64)  # blur kernels up to this many taps (45 at 448 px) are unrolled


@triton.jit
def _clamp01(v):
    return tl.minimum(tl.maximum(v, 0.0), 1.0)


@triton.jit
def _gray(r, g, b):
    return r * GW0 + g * GW1 + b * GW2


@triton.jit
def _rem6(a):
    """torch.remainder(a, 6) with a reciprocal (as the numba kernel: same up to an ulp)."""
    return a - tl.floor(a * (1.0 / 6.0)) * 6.0


@triton.jit
def _hue(r, g, b, f):
    """torchvision adjust_hue of each pixel: _rgb2hsv, shift, closed-form _hsv2rgb (as cpu._hue_px)."""
    maxc = tl.maximum(r, tl.maximum(g, b))
    minc = tl.minimum(r, tl.minimum(g, b))
    eqc = maxc == minc
    cr = maxc - minc
    s = cr / tl.where(eqc, 1.0, maxc)
    inv = 1.0 / tl.where(eqc, 1.0, cr)
    rc = (maxc - r) * inv
    gc = (maxc - g) * inv
    bc = (maxc - b) * inv
    h = tl.where(maxc == r, bc - gc, tl.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = h * (1.0 / 6.0) + 1.0  # in [5/6, 11/6): fmod(h, 1) is this select
    h = tl.where(h >= 1.0, h - 1.0, h)
    hf = h + f
    h6 = (hf - tl.floor(hf)) * 6.0
    vs = maxc * s
    k = _rem6(5.0 + h6)
    r2 = maxc - vs * _clamp01(tl.minimum(k, 4.0 - k))
    k = _rem6(3.0 + h6)
    g2 = maxc - vs * _clamp01(tl.minimum(k, 4.0 - k))
    k = _rem6(1.0 + h6)
    b2 = maxc - vs * _clamp01(tl.minimum(k, 4.0 - k))
    return r2, g2, b2


@triton.jit
def _sample(pix, r0, r1, x0, x1, a0, a1, wy, big, c, ok):
    """One channel of the bilinear resample, as geometry.resample: lerp along x, then torch.lerp along y."""
    p00 = tl.load(pix + (r0 + x0) * 3 + c, mask=ok, other=0).to(tl.float32)
    p01 = tl.load(pix + (r0 + x1) * 3 + c, mask=ok, other=0).to(tl.float32)
    p10 = tl.load(pix + (r1 + x0) * 3 + c, mask=ok, other=0).to(tl.float32)
    p11 = tl.load(pix + (r1 + x1) * 3 + c, mask=ok, other=0).to(tl.float32)
    t0 = p00 * a0 + p01 * a1
    t1 = p10 * a0 + p11 * a1
    return tl.where(big, t1 - (t1 - t0) * (1.0 - wy), t0 + wy * (t1 - t0))


@triton.jit
def _store_final(out, sb, offs, r, g, b, mean, inv, R: tl.constexpr, ok):
    """Normalise and cast on store to `out`'s dtype: NHWC memory, the channels-last view."""
    o = out + (sb * R * R + offs) * 3
    ty = out.dtype.element_ty
    i0 = tl.load(inv)
    i1 = tl.load(inv + 1)
    i2 = tl.load(inv + 2)
    tl.store(o, (r * i0 - tl.load(mean) * i0).to(ty), mask=ok)
    tl.store(o + 1, (g * i1 - tl.load(mean + 1) * i1).to(ty), mask=ok)
    tl.store(o + 2, (b * i2 - tl.load(mean + 2) * i2).to(ty), mask=ok)


@triton.jit
def colour(
    pix,
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
    cpos,
    gray_on,
    blur_on,
    cmean,
    part,
    out,
    planes,
    mean,
    inv,
    R: tl.constexpr,
    NBLK: tl.constexpr,
    BLOCK: tl.constexpr,
    PHASE: tl.constexpr,
    JITTER: tl.constexpr,
    GRAY: tl.constexpr,
    FINAL: tl.constexpr,
):
    """Resample + jitter (+ grey). PHASE 0: per-block sums of the grey level just before each sample's
    contrast (into part [B, NBLK]); PHASE 1: the pixels, with cmean [B] the contrast's mean grey, stored
    normalised into `out` (FINAL, or a sample not drawn for the blur) or as float32 planar [B, 3, R, R]
    `planes` for the blur kernel."""
    sb = tl.program_id(0)
    blk = tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    ok = offs < R * R
    oy = offs // R
    ox = offs % R
    row = sb * R
    iy0 = tl.load(y0 + row + oy, mask=ok, other=0)
    iy1 = tl.load(y1 + row + oy, mask=ok, other=0)
    wy = tl.load(fy + row + oy, mask=ok, other=0.0)
    ix0 = tl.load(x0 + row + ox, mask=ok, other=0)
    ix1 = tl.load(x1 + row + ox, mask=ok, other=0)
    wx = tl.load(fx + row + ox, mask=ok, other=0.0)
    b0 = tl.load(base + sb)
    w = tl.load(width + sb)
    r0 = b0 + iy0 * w
    r1 = b0 + iy1 * w
    a0 = (1.0 - wx) * (1.0 / 255.0)
    a1 = wx * (1.0 / 255.0)
    big = tl.abs(wy) >= 0.5
    r = _sample(pix, r0, r1, ix0, ix1, a0, a1, wy, big, 0, ok)
    g = _sample(pix, r0, r1, ix0, ix1, a0, a1, wy, big, 1, ok)
    b = _sample(pix, r0, r1, ix0, ix1, a0, a1, wy, big, 2, ok)
    if JITTER:
        lim = 4
        if PHASE == 0:
            lim = tl.load(cpos + sb)  # the contrast's step: PHASE 0 stops before it
        if tl.load(jit_on + sb) != 0:
            for step in tl.static_range(4):
                if step < lim:
                    op = tl.load(order + sb * 4 + step)
                    f = tl.load(factors + sb * 4 + op)
                    if op == 0:  # brightness: blend with black
                        r = _clamp01(f * r)
                        g = _clamp01(f * g)
                        b = _clamp01(f * b)
                    elif op == 1:  # contrast: blend with the image's mean grey (from PHASE 0)
                        m = (1.0 - f) * tl.load(cmean + sb)
                        r = _clamp01(f * r + m)
                        g = _clamp01(f * g + m)
                        b = _clamp01(f * b + m)
                    elif op == 2:  # saturation: blend with the pixel's grey
                        m = (1.0 - f) * _gray(r, g, b)
                        r = _clamp01(f * r + m)
                        g = _clamp01(f * g + m)
                        b = _clamp01(f * b + m)
                    else:
                        r, g, b = _hue(r, g, b, f)
    if PHASE == 0:
        tl.store(part + sb * NBLK + blk, tl.sum(tl.where(ok, _gray(r, g, b), 0.0), axis=0))
    else:
        if GRAY:
            if tl.load(gray_on + sb) != 0:
                r = _gray(r, g, b)
                g = r
                b = r
        if FINAL:
            _store_final(out, sb, offs, r, g, b, mean, inv, R, ok)
        elif tl.load(blur_on + sb) != 0:  # for the blur: float32 planar [B, 3, R, R]
            o = planes + sb * 3 * R * R + offs
            tl.store(o, r, mask=ok)
            tl.store(o + R * R, g, mask=ok)
            tl.store(o + 2 * R * R, b, mask=ok)
        else:  # not drawn for the blur: done here, and the blur kernels skip the sample
            _store_final(out, sb, offs, r, g, b, mean, inv, R, ok)


@triton.jit
def _tap(p, kern, sb, oy, ox, t, ok, R: tl.constexpr, K: tl.constexpr, ALONG_W: tl.constexpr):
    """Tap t of the blur: its weight times the pixel it reads, with torch's reflect padding. While the
    kernel's half-width is below the side (always, for the recipes' ~10 % kernels) one bounce is all
    there is: two selects. Beyond it the padding is periodic, a remainder (the same under C's and
    Python's signs)."""
    if ALONG_W:
        s = ox + (t - K // 2)
    else:
        s = oy + (t - K // 2)
    if R == 1:
        s = s * 0
    elif K // 2 < R:
        s = tl.where(s < 0, -s, s)
        s = tl.where(s >= R, 2 * R - 2 - s, s)
    else:
        period = 2 * R - 2
        s = (s % period + period) % period
        s = tl.where(s >= R, period - s, s)
    if ALONG_W:
        v = tl.load(p + oy * R + s, mask=ok, other=0.0)
    else:
        v = tl.load(p + s * R + ox, mask=ok, other=0.0)
    return tl.load(kern + sb * K + t) * v


@triton.jit
def blur(
    src,
    dst,
    kern,
    blur_on,
    K: tl.constexpr,
    mean,
    inv,
    R: tl.constexpr,
    BLOCK: tl.constexpr,
    ALONG_W: tl.constexpr,
    FINAL: tl.constexpr,
):
    """One separable pass of the blur over float32 planes (program axis 0: sample * 3 + channel), with
    torch's reflect padding (periodic beyond one bounce), for the samples drawn for it (the others were
    finished by `colour`). FINAL also normalises and writes NHWC `dst`. The taps K are a constant, as R
    is (both follow from the resolution): the loop unrolls, the padding needs no remainder, and Triton
    3.6's interpreter (torch 2.11's) cannot index a runtime `range` bound anyway."""
    plane = tl.program_id(0)
    sb = plane // 3
    c = plane % 3
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < R * R
    oy = offs // R
    ox = offs % R
    p = src + plane * R * R
    if tl.load(blur_on + sb) != 0:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        if K <= UNROLL_TAPS:  # unrolled: each tap's offset is a constant
            for t in tl.static_range(K):
                acc += _tap(p, kern, sb, oy, ox, t, ok, R, K, ALONG_W)
        else:
            for t in range(0, K):
                acc += _tap(p, kern, sb, oy, ox, t, ok, R, K, ALONG_W)
        if FINAL:
            iv = tl.load(inv + c)
            y = acc * iv - tl.load(mean + c) * iv
            tl.store(dst + (sb * R * R + offs) * 3 + c, y.to(dst.dtype.element_ty), mask=ok)
        else:
            tl.store(dst + plane * R * R + offs, acc, mask=ok)

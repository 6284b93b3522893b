"""The reference rendering of the photometric ops in torch: colour jitter (brightness, contrast,
saturation, hue, in each sample's own order), grayscale, Gaussian blur and normalisation.

Every op is torchvision.transforms.functional's float32 formula, on whole [B, 3, H, W] batches with
per-sample parameters (drawn by `draws.sample_photometric`): fixed shapes, no host sync, no
data-dependent control flow, so the training step can capture it in a CUDA graph. The numba CPU kernel
(`cpu`) and the Triton kernels (`triton`) render the same formulas; tests compare them with this one.

The ops stream whole batches through memory, so they are written to make few passes: a
brightness/contrast/saturation blend is one per-sample 3x3 colour matrix (one batched matmul + clamp),
grayscale and normalisation fold into one more matrix, the blur is two batched matmuls with banded
per-sample matrices, and hue runs a short closed form. Matmuls run in IEEE fp32 (TF32 off, see
`exact_matmul`): they must give the same pixels as torchvision's elementwise formulas.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fastvpd.data.augment.draws import Photometric
from fastvpd.data.spec import ViewSpec

GRAY_W = (0.2989, 0.587, 0.114)  # torchvision rgb_to_grayscale weights


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
class Consts:
    """Small device constants, built with kernels only (a host->device copy would break graph capture)."""

    gray: Tensor  # [3] torchvision luma weights
    eye: Tensor  # [3, 3]
    diff: Tensor  # [3, 3]: (diff @ rgb)[c] = rgb[c+1] - rgb[c+2] (hue numerators)
    hue_off: Tensor  # [3]: where r, g, b sit on the hue hexagon, shifted for the closed form in `hue_apply`

    @staticmethod
    def make(device: torch.device) -> Consts:
        gray = torch.full((3,), GRAY_W[2], device=device)
        gray[0], gray[1] = GRAY_W[0], GRAY_W[1]
        eye = torch.eye(3, device=device)
        diff = eye.roll(1, dims=1) - eye.roll(2, dims=1)
        hue_off = torch.arange(3, device=device, dtype=torch.float32).mul_(4.0).remainder_(6.0)  # 0, 4, 2
        return Consts(gray, eye, diff, hue_off)


def _flat(x: Tensor) -> Tensor:
    """[B, 3, H, W] -> [B, H*W, 3] pixel rows (a view when x is channels-last)."""
    return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])


def _unflat(y: Tensor, h: int, w: int) -> Tensor:
    """[B, H*W, C] -> [B, C, H, W] channels-last view."""
    return y.view(y.shape[0], h, w, y.shape[2]).permute(0, 3, 1, 2)


def rgb_to_gray(x: Tensor) -> Tensor:
    """[B, 1, H, W] luma, torchvision weights."""
    return x[:, 0:1] * GRAY_W[0] + x[:, 1:2] * GRAY_W[1] + x[:, 2:3] * GRAY_W[2]


# ------------------------------------------------------------------------------------------ colour jitter
def blend_matrices(f: Tensor, op: Tensor, act: Tensor, c: Consts) -> tuple[Tensor, Tensor]:
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


def blend(x: Tensor, beta: Tensor, mix: Tensor, mean_w: Tensor, colsum: Tensor) -> tuple[Tensor, Tensor]:
    """One blend, clamp(x' @ mix + mean3 @ mean_w, 0, 1) per sample, of the image x' = x + beta (beta
    [B, 1, 1]: a per-sample offset common to all channels, carried instead of added), returning the result
    in the same form.

    (x + beta) @ mix = x @ mix + beta * colsum(mix), and the contrast term is also the same in every
    channel, so the offset stays channel-free; the clamp to [0, 1] becomes a clamp of the stored values to
    [-beta', 1 - beta']. One matmul with no bias operand (a GEMM with a broadcast bias first copies it into
    its output) and one in-place clamp per blend.
    """
    b, _, h, w = x.shape
    xf = _flat(x)
    mean3 = xf.mean(dim=1, keepdim=True).add_(beta)  # the true image's channel means
    beta = torch.addcmul(torch.bmm(mean3, mean_w[:, :, :1]), beta, colsum)  # colsum [B, 1, 1] of mix
    y = torch.bmm(xf, mix).clamp_(min=beta.neg(), max=1.0 - beta)
    return _unflat(y, h, w), beta


def hue_apply(x: Tensor, f: Tensor, c: Consts, on: Tensor | None = None) -> Tensor:
    """torchvision adjust_hue (its `_rgb2hsv`, shift mod 1, `_hsv2rgb`) in closed form; x where not `on`.

    With M/m/C the max/min/range over channels and a the first channel holding M, hue*6 is
    h6 = 2a + (x[a+1] - x[a+2]) / C (mod 6), and `_hsv2rgb`'s v - v*s*clamp(min(k, 4-k), 0, 1) with
    k = (n + h6 + 6f) mod 6 (n = 5, 3, 1) equals (M - 2C) + C * clamp(|((h6 + 6f + off) mod 6) - 3|, 1, 2).
    Grey pixels (C = 0) come back unchanged, as in torchvision. Unchanged by an offset common to all
    channels (only channel differences and the max-min range enter), so it reads `blend`'s stored form.
    """
    b, _, h, w = x.shape
    xf = _flat(x)
    mx, arg = xf.max(dim=2)  # [B, HW]; the first maximal channel, as torchvision's r-then-g order
    cr = mx - xf.amin(dim=2)
    d = torch.bmm(c.diff.expand(b, 3, 3), xf.mT)  # [B, 3, HW] planar
    h6 = d.gather(1, arg[:, None])[:, 0].div_(cr.clamp_min(1e-30)).add_(arg, alpha=2)
    u = torch.add(h6[:, :, None], torch.add(c.hue_off, f[:, None, None], alpha=6.0))
    u.remainder_(6.0).sub_(3.0).abs_().clamp_(1.0, 2.0)
    out = torch.addcmul(torch.sub(mx, cr, alpha=2.0)[:, :, None], cr[:, :, None], u, out=u)
    if on is not None:
        out = torch.where(on[:, None, None], out, xf, out=out)
    return _unflat(out, h, w)


def jitter_lazy(x: Tensor, factors: Tensor, order: Tensor, on: Tensor, c: Consts) -> tuple[Tensor, Tensor]:
    """torchvision ColorJitter with per-sample factors [B, 4] (brightness, contrast, saturation, hue) and
    per-sample op order [B, 4]; identity where not `on`. Returns (stored, beta [B, 1, 1]): the image is
    stored + beta (`blend`).

    Brightness/contrast/saturation are per-sample colour matrices (identity at factor 1, exactly), so each
    step is one matmul pass for the whole batch. Hue, the dearest op, runs once for the whole batch: first
    the blends each sample draws *before* its hue (steps 0-2), then hue, then the blends it draws *after*
    it (steps 1-3). Six blend passes and one hue instead of four of each; every sample still sees its own
    op order, so the pixels are torchvision's.
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
            x, beta = blend(x, beta, mix[s], mean_w[s], colsum[s])
        return x, beta


def color_jitter(x: Tensor, factors: Tensor, order: Tensor, on: Tensor) -> Tensor:
    """`jitter_lazy` with the offset added back: the jittered image [B, 3, H, W], channels-last."""
    x, beta = jitter_lazy(x, factors, order, on, Consts.make(x.device))
    return x + beta[:, :, :, None]


def _one_op(x: Tensor, f: Tensor, op: int) -> Tensor:
    """A single jitter op (0 brightness, 1 contrast, 2 saturation, 3 hue) with per-sample factor f [B]."""
    c = Consts.make(x.device)
    x = x.contiguous(memory_format=torch.channels_last)
    if op == 3:
        return hue_apply(x, f, c)
    ops = torch.full_like(f, op, dtype=torch.int64)
    mix, mean_w = blend_matrices(f, ops, torch.ones_like(ops, dtype=torch.bool), c)
    with exact_matmul(x.device):
        colsum = mix[..., :1].sum(dim=-2, keepdim=True)
        y, beta = blend(x, x.new_zeros(x.shape[0], 1, 1), mix, mean_w, colsum)
    return y + beta[:, :, :, None]


def adjust_brightness(x: Tensor, f: Tensor) -> Tensor:
    return _one_op(x, f, 0)


def adjust_contrast(x: Tensor, f: Tensor) -> Tensor:
    return _one_op(x, f, 1)


def adjust_saturation(x: Tensor, f: Tensor) -> Tensor:
    return _one_op(x, f, 2)


def adjust_hue(x: Tensor, f: Tensor) -> Tensor:
    """torchvision adjust_hue with per-sample hue shift f in [-0.5, 0.5]."""
    return _one_op(x, f, 3)


# ------------------------------------------------------------------------------------------------- blur
def gaussian_kernels(sigma: Tensor, k: int) -> Tensor:
    """[B, k] normalised 1-D Gaussian kernels (torchvision `_get_gaussian_kernel1d`)."""
    half = (k - 1) * 0.5
    xs = torch.linspace(-half, half, k, device=sigma.device, dtype=torch.float32)
    pdf = torch.exp(-0.5 * (xs[None] / sigma.float()[:, None]).pow(2))
    return pdf / pdf.sum(dim=1, keepdim=True)


def reflect_taps(n: int, k: int, device: torch.device) -> Tensor:
    """[k, n] int64: the row that tap t of a centred k-tap kernel reads for output row i, with torch's
    "reflect" padding (-1 -> 1, n -> n-2), periodic beyond one reflection."""
    i = torch.arange(n, device=device)
    src = torch.arange(-(k // 2), k - k // 2, device=device)[:, None] + i  # [t, i]
    if n > 1:
        src = src.remainder(2 * n - 2)
        return torch.where(src >= n, 2 * n - 2 - src, src)
    return torch.zeros_like(src)


def blur_matrices(kernels: Tensor, n: int) -> Tensor:
    """[B, n, n] matrices A with (A @ v) = v convolved with each 1-D kernel, reflect padding folded in.

    A[b, i, j] sums kernels[b, t] over the taps t whose reflected source row reflect(i + t - k//2) is j.
    A delta kernel gives the identity exactly.
    """
    k = kernels.shape[1]
    src = reflect_taps(n, k, kernels.device)
    taps = (src[:, :, None] == torch.arange(n, device=kernels.device)).to(torch.float32)  # [t, i, j]
    return torch.mm(kernels.float(), taps.view(k, n * n)).view(-1, n, n)


def blur_rows(x: Tensor, kernels: Tensor) -> Tensor:
    """x [B, C, H, W] channels-last blurred along both axes by each sample's 1-D kernel ([B, k]), as pixel
    rows [B, H*W, C] (call under `exact_matmul`).

    Two batched matmuls with banded matrices whose operand orders turn the layout around for free: the
    first reads the (y, x, c) memory and writes (x, c, y), the second writes (c, y, x).
    """
    b, ch, h, w = x.shape
    ay = blur_matrices(kernels, h)
    ax = ay if w == h else blur_matrices(kernels, w)
    rows = x.permute(0, 2, 3, 1).reshape(b, h, w * ch)  # [B, H, W*C] (a view when channels-last)
    o = torch.bmm(rows.mT, ay.mT)  # [B, W*C, H]: o[(x, c), y] = sum_y' ay[y, y'] x[y', x, c]
    z = torch.bmm(o.view(b, w, ch * h).mT, ax.mT)  # [B, C*H, W]
    return z.view(b, ch, h * w).mT


def gaussian_blur(x: Tensor, sigma: Tensor, k: int) -> Tensor:
    """Per-sample separable Gaussian blur (reflect padding, as torchvision), channels-last out."""
    h, w = x.shape[-2:]
    with exact_matmul(x.device):
        rows = blur_rows(x.contiguous(memory_format=torch.channels_last), gaussian_kernels(sigma, k))
    return _unflat(rows, h, w).contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------------------------------ the view's chain
def finish(
    x: Tensor,
    view: ViewSpec,
    p: Photometric,
    mean: Tensor | None,
    std: Tensor | None,
    dtype: torch.dtype,
    c: Consts,
    beta: Tensor | None = None,
) -> Tensor:
    """Grayscale -> blur -> normalise (each where the view and draws ask), channels-last `dtype` out.

    The blur is two banded matmuls (a delta kernel, i.e. the identity, for samples not drawn for it), and
    grayscale and normalisation are one per-sample colour matrix applied after it (both are per-pixel
    linear maps, which commute with a blur that treats every channel alike). `beta` [B, 1, 1]: x stands
    for x + beta (see `blend`); the blur keeps the offset (its kernels sum to 1), the matrix maps it to a
    per-sample bias added in the pass that casts to `dtype`.
    """
    gray_on = p.gray_on
    blur_on = p.blur_on if view.blur is not None else None
    if gray_on is None and blur_on is None and mean is None:
        x = x if beta is None else x + beta[:, :, :, None]
        return x.to(dtype=dtype, memory_format=torch.channels_last)
    b, ch, h, w = x.shape
    mix = c.eye.expand(b, 3, 3)
    if gray_on is not None:
        mix = torch.where(gray_on[:, None, None], c.gray[:, None].expand(3, 3), mix)
    with exact_matmul(x.device):
        if blur_on is not None:
            k = view.blur.kernel_size(h)  # type: ignore[union-attr]
            ker = gaussian_kernels(p.sigma, k)  # type: ignore[arg-type]
            delta = (torch.arange(k, device=x.device) == k // 2).to(torch.float32)
            x = x.contiguous(memory_format=torch.channels_last)
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
        y = torch.bmm(src, mix)
    if bias is not None or dtype != torch.float32:
        out = torch.empty(y.shape, dtype=dtype, device=y.device)
        y = out.copy_(y) if bias is None else torch.add(y, bias, out=out)
    return _unflat(y, h, w)


def photometric(
    x: Tensor,
    view: ViewSpec,
    p: Photometric,
    mean: Tensor | None = None,
    std: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    consts: Consts | None = None,
) -> Tensor:
    """Jitter -> grayscale -> blur on float [B, 3, H, W] in [0, 1] (the MoCo v2 order), channels-last;
    with `mean`/`std` also normalised and cast to `dtype` (folded into `finish`'s colour matrix)."""
    c = consts if consts is not None else Consts.make(x.device)
    beta = None
    if p.jitter_on is not None:
        x, beta = jitter_lazy(x, p.factors, p.order, p.jitter_on, c)  # type: ignore[arg-type]
    return finish(x, view, p, mean, std, dtype, c, beta)


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

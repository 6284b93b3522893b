"""The GPU rendering of the views: each pixel's whole chain in Triton kernels (`triton_kernels`), the
default on a CUDA device where Triton loads.

Why: the torch reference (`photometric.photometric`) streams the whole batch through memory once per op
(six colour-matrix blends, hue, two blur matmuls, a final colour matrix, each its own pass), and
torch.compile cannot fuse across them (each blend needs the whole image's mean first, and a blur needs its
neighbours). Here each pixel goes through the whole chain in registers, as the numba CPU kernel
(`cpu._render_rows`) does it, with the sample's own op order:

1. `colour` PHASE 0 (only when the view jitters): resample from the uint8 store, the jitter ops the
   sample draws *before* its contrast, then the grey level, summed per block of pixels. Contrast is the
   only op that needs a whole-image value (the mean grey of the image it sees), and this is that value.
2. `colour` PHASE 1: resample, the whole jitter with that mean, grayscale; then normalise and cast to
   the training dtype (no blur in the view, or the sample not drawn for it), or the float32 planar
   image for the blur.
3. `blur` twice (views with a blur): the separable Gaussian with torch's reflect padding, along H then
   along W, the second pass normalising and casting. Samples not drawn for the blur skip it: `colour`
   finished them (their planes are never written, and the blur's programs for them do nothing).

Every op is torchvision's float32 formula, as in the torch reference (tests/test_triton_aug.py checks the
views against it on the same draws). The launch shapes are fixed by the batch and the view, and nothing
is read back to the host, so a CUDA graph captures the kernels with the training step. The block partial
sums are added by torch in a fixed order, so the pixels are deterministic.

Without a GPU they run only in Triton's interpreter (numpy, slow; for tests), which must be chosen
before Triton is first imported: `TRITON_INTERPRET=1` in the environment of a fresh process.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from fastvpd.data.augment.geometry import images_as_store
from fastvpd.data.augment.photometric import gaussian_kernels

# pixels per program, and warps (8 pixels a thread): benchmarks/aug_tune.py times the alternatives
BLOCK = 1024
WARPS = 4

_KERNELS: Any = None
_ERROR = ""


def unavailable(device: torch.device) -> str:
    """'' when the kernels can render tensors on `device`, else why not (one line)."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return (
            f"the Triton kernels need a CUDA device (this run's is {device.type}; TRITON_INTERPRET=1 runs "
            "them in Triton's slow interpreter, for tests)"
        )
    load()
    return _ERROR


def load() -> Any:
    """The kernels (a namespace), imported on first use: compiled for the GPU, or interpreted under
    TRITON_INTERPRET=1 (`unavailable` checks the device)."""
    global _KERNELS, _ERROR
    if _KERNELS is not None or _ERROR:
        return _KERNELS
    try:
        from fastvpd.data.augment import triton_kernels
    except Exception as e:  # noqa: BLE001 - any import failure means no Triton here
        _ERROR = f"the Triton kernels need the triton package ({type(e).__name__}: {e})"
        return None
    _KERNELS = triton_kernels
    return _KERNELS


def render(  # noqa: PLR0913
    pixels: Tensor,
    base: Tensor,
    width: Tensor,
    ys: Any,
    xs: Any,
    view: Any,
    p: Any,
    mean: Tensor,
    std: Tensor,
    dtype: torch.dtype,
) -> Tensor:
    """One view, as the torch reference renders it (channels-last `dtype` [B, 3, R, R]), by the kernels.

    pixels uint8 [P, 3] (a store, or a batch of HWC images seen as one); base/width [B]; ys/xs the
    view's `geometry.AxisMap`s; p its `draws.Photometric`; mean/std [3] on the same device.
    """
    why = unavailable(pixels.device)
    if why:
        raise RuntimeError(why)
    k = _KERNELS
    b, res = base.shape[0], ys.i0.shape[1]
    dev = pixels.device
    nblk = -(-res * res // BLOCK)
    out = torch.empty((b, res, res, 3), dtype=dtype, device=dev)
    inv = (1.0 / std).float().contiguous()
    mean = mean.float().contiguous()
    jitter = p.jitter_on is not None
    gray = p.gray_on is not None
    blur = p.blur_on is not None and view.blur is not None
    dummy = inv  # a pointer for arguments a specialisation never reads
    if jitter:
        jit_on = p.jitter_on.to(torch.int32)
        factors = p.factors.float().contiguous()
        order = p.order.to(torch.int32).contiguous()
        cpos = (order == 1).to(torch.int32).argmax(dim=1).to(torch.int32)
    else:
        jit_on = factors = order = cpos = dummy
    gray_on = p.gray_on.to(torch.int32) if gray else dummy
    maps = (
        pixels.contiguous(),
        base.contiguous(),
        width.to(torch.int64).contiguous(),
        ys.i0.contiguous(),
        ys.i1.contiguous(),
        ys.frac.float().contiguous(),
        xs.i0.contiguous(),
        xs.i1.contiguous(),
        xs.frac.float().contiguous(),
    )
    grid = (b, nblk)
    cmean = dummy
    if jitter:
        part = torch.empty((b, nblk), dtype=torch.float32, device=dev)
        k.colour[grid](
            *maps, jit_on, factors, order, cpos, gray_on, dummy, dummy, part, dummy, dummy, mean, inv,
            R=res, NBLK=nblk, BLOCK=BLOCK, PHASE=0, JITTER=True, GRAY=False, FINAL=False, num_warps=WARPS,
        )  # fmt: skip
        cmean = part.sum(dim=1).div_(res * res)
    # with a blur, the samples drawn for it go through float32 planes; the others are finished here
    planes = torch.empty((b, 3, res, res), dtype=torch.float32, device=dev) if blur else dummy
    blur_on = p.blur_on.to(torch.int32) if blur else dummy
    k.colour[grid](
        *maps, jit_on, factors, order, cpos, gray_on, blur_on, cmean, dummy, out, planes, mean, inv,
        R=res, NBLK=nblk, BLOCK=BLOCK, PHASE=1, JITTER=jitter, GRAY=gray, FINAL=not blur, num_warps=WARPS,
    )  # fmt: skip
    if blur:
        taps = view.blur.kernel_size(res)
        ker = gaussian_kernels(p.sigma, taps).contiguous()
        mid = torch.empty_like(planes)
        pgrid = (b * 3, nblk)
        along_h = dict(R=res, BLOCK=BLOCK, ALONG_W=False, FINAL=False, num_warps=WARPS)
        k.blur[pgrid](planes, mid, ker, blur_on, taps, mean, inv, **along_h)
        k.blur[pgrid](mid, out, ker, blur_on, taps, mean, inv, **{**along_h, "ALONG_W": True, "FINAL": True})
    return out.permute(0, 3, 1, 2)


def render_images(x: Tensor, view: Any, p: Any, mean: Tensor, std: Tensor, dtype: torch.dtype) -> Tensor:
    """Already-cropped uint8 views [B, 3, R, R] with NHWC memory (FFCV's decoder slots) finished by the
    kernels: `render` over `geometry.images_as_store`, reading each sample where it lies (no copy first)."""
    pixels, base, width, ys, xs = images_as_store(x)
    return render(pixels, base, width, ys, xs, view, p, mean, std, dtype)

"""The device side of the loaders: `PixelAugmenter` renders whole views from a pixel store (the cache
backend), `ViewFinisher` finishes views a host decoder has already cropped and flipped (ffcv, dali).

Both draw their parameters the same way (`geometry.view_maps`, `draws.sample_photometric`) and pick one
rendering per device: the Triton kernels on a CUDA device where Triton loads, the numba kernel on a CPU
where numba is installed, else the torch reference. AutoAugment views run torchvision's AutoAugment
eagerly first (a host-side loop), then the torch reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastvpd.config import UserError
from fastvpd.data.augment import cpu
from fastvpd.data.augment import triton as triton_render
from fastvpd.data.augment.draws import sample_photometric
from fastvpd.data.augment.geometry import resample, store_window, view_maps
from fastvpd.data.augment.photometric import Consts, autoaugment_, photometric
from fastvpd.data.spec import ViewSpec

KERNELS = ("auto", "torch", "triton")


def use_triton(kernel: str, device: torch.device) -> bool:
    """Whether the views on `device` go through the Triton kernels: `auto` on a CUDA device where Triton
    loads; `triton` always (a UserError where they cannot run; tests and benchmarks ask for it); `torch`
    never (the torch reference, or numba on a CPU)."""
    if kernel not in KERNELS:
        raise ValueError(f"aug kernel must be one of {', '.join(KERNELS)} (got {kernel!r})")
    if kernel == "auto":
        return device.type == "cuda" and not triton_render.unavailable(device)
    if kernel == "torch":
        return False
    why = triton_render.unavailable(device)
    if why:
        raise UserError(why)
    return True


def _norms(views: list[ViewSpec], device: torch.device) -> list[tuple[Tensor, Tensor]]:
    return [
        (torch.tensor(v.normalize.mean, device=device), torch.tensor(v.normalize.std, device=device))
        for v in views
    ]


class PixelAugmenter:
    """Renders an AugSpec from a ragged flat pixel store living on `device` (the cache backend's engine).

    `augment(indices)` is a pure device function of (store, indices, generator state): fixed shapes, no
    host sync unless the spec asks for AutoAugment, so the training step can capture it in a CUDA graph.
    `kernel`: see `use_triton`.
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
        kernel: str = "auto",
    ) -> None:
        self.spec = spec
        self.pixels, self.offsets, self.heights, self.widths = pixels, offsets, heights, widths
        self.dtype = dtype
        self.gen = generator
        self.device = pixels.device
        self.triton = use_triton(kernel, self.device)
        self._norm = _norms(list(spec.views), self.device)
        self._window = store_window(heights, widths)  # (K, rows): the window gather's bound, see resample
        self._consts = Consts.make(self.device)

    def augment(self, indices: Tensor) -> list[Tensor]:
        """Views for store rows `indices` (int64 [B] on the device)."""
        return self.render(self.pixels, self.offsets[indices], self.heights[indices], self.widths[indices])

    def render(
        self, pixels: Tensor, base: Tensor, H: Tensor, W: Tensor, fixed_shape: bool = False
    ) -> list[Tensor]:
        """Views of the H x W images starting at flat rows `base` of `pixels` (store or staged batch).

        `fixed_shape` forces the torch reference the GPU runs without Triton, on CPU too (to test it).
        """
        if not fixed_shape and not self.triton and cpu.cpu_kernel_ok(pixels.device, self.spec.views):
            return self._render_cpu(pixels, base, H, W)
        outs: list[Tensor] = []
        b = base.shape[0]
        k, rows = self._window
        window = k if pixels.shape[0] >= rows else None
        c = self._consts
        for vi, view in enumerate(self.spec.views):
            mean, std = self._norm[vi]
            for ys, xs in view_maps(view, H, W, self.gen):
                if view.autoaugment:  # data-dependent, on the host: its own seed, then the draws
                    x = resample(pixels, base, W, ys, xs, window)
                    seed = int(torch.randint(1 << 62, (1,), generator=self.gen, device=self.device).item())
                    x = autoaugment_(x, seed)
                    ph = sample_photometric(view, b, self.gen, self.device)
                    outs.append(photometric(x, view, ph, mean, std, self.dtype, c))
                    continue
                ph = sample_photometric(view, b, self.gen, self.device)
                if self.triton:
                    outs.append(
                        triton_render.render(pixels, base, W, ys, xs, view, ph, mean, std, self.dtype)
                    )
                    continue
                x = resample(pixels, base, W, ys, xs, window)
                outs.append(photometric(x, view, ph, mean, std, self.dtype, c))
        return outs

    def _render_cpu(self, pixels: Tensor, base: Tensor, H: Tensor, W: Tensor) -> list[Tensor]:
        """`render` through the numba kernel: the same generator draws, in the same order, per view."""
        b = base.shape[0]
        views: list[cpu.CPUView] = []
        for vi, view in enumerate(self.spec.views):
            mean, std = self._norm[vi]
            for ys, xs in view_maps(view, H, W, self.gen):
                ph = sample_photometric(view, b, self.gen, self.device)
                views.append(cpu.CPUView(ys, xs, view, ph, mean, std))
        return cpu.render_cpu(pixels, base, W, views, self.dtype)


class ViewFinisher:
    """The photometric half of the views a host decoder has cropped and flipped (the ffcv and dali
    backends): uint8 [B, 3, R, R] views with NHWC memory in, each finished with jitter, grayscale, blur
    and normalise into `dtype` channels-last, with the cache backend's draws and renderings.

    `__call__(images, seed)` reseeds `gen` with the batch's seed, so a batch's draws are a function of
    that seed alone (resume at any step is exact). `kernel`: see `use_triton`.
    """

    def __init__(
        self,
        views: tuple[ViewSpec, ...] | list[ViewSpec],
        device: torch.device,
        dtype: torch.dtype,
        kernel: str = "auto",
    ) -> None:
        self.views = list(views)
        self.device, self.dtype = device, dtype
        self.norms = _norms(self.views, device)
        self.gen = torch.Generator(device=device)
        self.consts = Consts.make(device)
        self.triton = use_triton(kernel, device)

    def __call__(self, images: list[Tensor], seed: int) -> list[Tensor]:
        self.gen.manual_seed(seed)
        if not self.triton and cpu.cpu_kernel_ok(self.device, self.views):
            # CPU: one fused pass per sample (numba), the same draws. It copies out of the decoder's buffer.
            b = [x.shape[0] for x in images]
            params = [sample_photometric(v, n, self.gen, self.device) for v, n in zip(self.views, b)]
            return cpu.render_cpu_images(images, self.views, params, self.norms, self.dtype)
        out = []
        for vi, (view, x) in enumerate(zip(self.views, images)):
            mean, std = self.norms[vi]
            ph = sample_photometric(view, x.shape[0], self.gen, self.device)
            if self.triton and not view.autoaugment:
                out.append(triton_render.render_images(x, view, ph, mean, std, self.dtype))
                continue
            # the float copy also takes the pixels out of the decoder's buffer (FFCV reuses it later)
            xf = x.to(torch.float32, memory_format=torch.channels_last).div_(255.0)
            if view.autoaugment:  # data-dependent: eager (its own seed: the draws above are unchanged)
                xf = autoaugment_(xf, seed + vi)
            out.append(photometric(xf, view, ph, mean, std, self.dtype, self.consts))
        return out

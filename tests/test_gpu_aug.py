"""Pixel checks: the torch reference ops (fastvpd.data.augment) equal torchvision.transforms.functional on
the same images, and the numba CPU kernel renders what the torch reference renders."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms.functional as TF

from fastvpd.data.augment import PixelAugmenter
from fastvpd.data.augment import cpu as C
from fastvpd.data.augment import draws as D
from fastvpd.data.augment import geometry as Geo
from fastvpd.data.augment import photometric as P
from fastvpd.data.spec import ColorJitter, GaussianBlur, ResizeCenterCrop, ViewSpec, eval_spec, moco_v2

TOL = 2e-5  # float32 rounding: everything below is evaluated at the same precision as torchvision


pytestmark = pytest.mark.usefixtures("one_thread")


def _images(seed: int = 0) -> list[torch.Tensor]:
    """Smooth-ish random uint8 images of different sizes and aspect ratios (HWC)."""
    g = torch.Generator().manual_seed(seed)
    sizes = [(37, 53), (64, 40), (29, 29), (80, 31)]
    out = []
    for h, w in sizes:
        low = torch.rand(3, h // 4 + 2, w // 4 + 2, generator=g)
        img = torch.nn.functional.interpolate(low[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        img = img + 0.15 * torch.rand(3, h, w, generator=g)
        out.append((img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous())
    return out


def _store(imgs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    pixels = torch.cat([im.reshape(-1, 3) for im in imgs])
    sizes = torch.tensor([im.shape[0] * im.shape[1] for im in imgs])
    offsets = torch.cumsum(sizes, 0) - sizes
    heights = torch.tensor([im.shape[0] for im in imgs])
    widths = torch.tensor([im.shape[1] for im in imgs])
    return pixels, offsets, heights, widths


def _float_chw(im: torch.Tensor) -> torch.Tensor:
    return im.permute(2, 0, 1).float() / 255.0


def test_resized_crop_and_flip_match_torchvision() -> None:
    imgs = _images()
    pixels, offsets, H, W = _store(imgs)
    top = torch.tensor([3, 0, 5, 10])
    left = torch.tensor([7, 2, 0, 1])
    ch = torch.tensor([20, 64, 11, 60])  # includes up- and down-sampling
    cw = torch.tensor([30, 38, 24, 20])
    flip = torch.tensor([False, True, True, False])
    for res in (16, 24, 57):
        ys, xs = Geo.rrc_maps(top, left, ch, cw, res, flip)
        out = Geo.resample(pixels, offsets, W, ys, xs)
        assert out.shape == (4, 3, res, res) and out.is_contiguous(memory_format=torch.channels_last)
        for i, im in enumerate(imgs):
            ref = TF.resized_crop(
                _float_chw(im), int(top[i]), int(left[i]), int(ch[i]), int(cw[i]), [res, res], antialias=False
            )
            if flip[i]:
                ref = TF.hflip(ref)
            torch.testing.assert_close(out[i], ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("ten_crop", [False, True])
def test_eval_resize_center_crop_matches_torchvision(ten_crop: bool) -> None:
    imgs = _images(1)
    pixels, offsets, H, W = _store(imgs)
    crop = ResizeCenterCrop(size=21, resize=24, ten_crop=ten_crop)
    boxes = Geo.resize_center_boxes(H, W, crop)
    outs = [Geo.resample(pixels, offsets, W, *Geo.eval_maps(H, W, box, crop.size)) for box in boxes]
    for i, im in enumerate(imgs):
        resized = TF.resize(_float_chw(im), crop.resize, antialias=False)
        refs = TF.ten_crop(resized, crop.size) if ten_crop else [TF.center_crop(resized, crop.size)]
        assert len(refs) == len(outs)
        for o, ref in zip(outs, refs):
            torch.testing.assert_close(o[i], ref, atol=TOL, rtol=0)


def _batch() -> torch.Tensor:
    imgs = _images(2)
    return torch.stack([TF.resize(_float_chw(im), [24, 24], antialias=False) for im in imgs])


def test_color_ops_match_torchvision() -> None:
    x = _batch()
    f = torch.tensor([0.6, 1.0, 1.3, 1.4])
    hue = torch.tensor([-0.1, 0.05, 0.0, 0.5 - 1e-3])
    cases = [
        (P.adjust_brightness, TF.adjust_brightness, f),
        (P.adjust_contrast, TF.adjust_contrast, f),
        (P.adjust_saturation, TF.adjust_saturation, f),
        (P.adjust_hue, TF.adjust_hue, hue),
    ]
    for ours, theirs, fac in cases:
        out = ours(x, fac)
        for i in range(x.shape[0]):
            torch.testing.assert_close(out[i], theirs(x[i], float(fac[i])), atol=1e-5, rtol=0)
    gray = P.rgb_to_gray(x)
    torch.testing.assert_close(gray, TF.rgb_to_grayscale(x), atol=1e-6, rtol=0)


def test_color_jitter_order_per_sample_matches_sequential_torchvision() -> None:
    x = _batch()
    factors = torch.tensor(
        [[0.7, 1.2, 0.8, 0.07], [1.3, 0.6, 1.4, -0.09], [1.0, 1.1, 0.9, 0.02], [0.9, 0.9, 0.9, 0.1]]
    )
    order = torch.tensor([[3, 0, 2, 1], [0, 1, 2, 3], [2, 3, 1, 0], [1, 0, 3, 2]])
    on = torch.tensor([True, True, True, False])
    out = P.color_jitter(x, factors, order, on)
    fns = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in range(x.shape[0]):
        ref = x[i]
        if on[i]:
            for op in order[i].tolist():
                ref = fns[op](ref, float(factors[i, op]))
        torch.testing.assert_close(out[i], ref, atol=2e-5, rtol=0)


def test_gaussian_blur_and_normalize_match_torchvision() -> None:
    x = _batch()
    sigma = torch.tensor([0.1, 0.7, 1.3, 2.0])
    k = GaussianBlur().kernel_size(x.shape[-1])
    assert k % 2 == 1
    out = P.gaussian_blur(x, sigma, k)
    for i in range(x.shape[0]):
        ref = TF.gaussian_blur(x[i], [k, k], [float(sigma[i])] * 2)
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    n = P.normalize(x, mean, std, torch.float32)
    assert n.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(n, TF.normalize(x, mean.tolist(), std.tolist()), atol=1e-6, rtol=0)


def test_photometric_identity_when_nothing_applied() -> None:
    x = _batch()
    view = ViewSpec(
        crop=moco_v2(24).views[0].crop, jitter=ColorJitter(), grayscale_p=0.2, blur=GaussianBlur()
    )
    p = D.sample_photometric(view, x.shape[0], torch.Generator().manual_seed(0), x.device)
    p.jitter_on = torch.zeros(4, dtype=torch.bool)
    p.gray_on = torch.zeros(4, dtype=torch.bool)
    p.blur_on = torch.zeros(4, dtype=torch.bool)
    assert torch.equal(P.photometric(x, view, p), x)


def _rrc_draws(n: int, h: int, w: int, scale=(0.2, 1.0), seed: int = 0):
    from fastvpd.data.spec import RandomResizedCrop

    H = torch.full((n,), h)
    W = torch.full((n,), w)
    return Geo.sample_rrc(H, W, RandomResizedCrop(32, scale), torch.Generator().manual_seed(seed))


def test_rrc_sampler_distribution_matches_torchvision() -> None:
    import torchvision.transforms as T

    n = 4000
    h, w = 120, 200
    top, left, ch, cw = _rrc_draws(n, h, w)
    assert bool((top >= 0).all() and (left >= 0).all() and (top + ch <= h).all() and (left + cw <= w).all())
    area = (ch * cw).double() / (h * w)
    assert area.min() >= 0.2 - 0.02 and area.max() <= 1.0
    ratio = cw.double() / ch.double()
    assert ratio.min() >= 0.75 - 0.03 and ratio.max() <= 4 / 3 + 0.03
    torch.manual_seed(0)
    img = torch.zeros(1, h, w)
    ref = torch.tensor([T.RandomResizedCrop.get_params(img, [0.2, 1.0], [3 / 4, 4 / 3]) for _ in range(n)])
    ref_area = (ref[:, 2] * ref[:, 3]).double() / (h * w)
    # same distribution: compare quantiles of the area fraction and of the (log) aspect ratio
    qs = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)
    assert torch.allclose(area.quantile(qs), ref_area.quantile(qs), atol=0.03)
    ref_ratio = ref[:, 3].double() / ref[:, 2].double()
    assert torch.allclose(ratio.log().quantile(qs), ref_ratio.log().quantile(qs), atol=0.04)
    # crop position is uniform over the valid range: mean relative offset ~ 0.5
    room = h - ch
    rel = top[room > 0].double() / room[room > 0].double()
    assert abs(rel.mean().item() - 0.5) < 0.03


def test_rrc_fallback_is_torchvision_centre_crop() -> None:
    # a 4x100 strip: no candidate can fit the ratio range -> centre crop clipped to ratio 4/3
    top, left, ch, cw = _rrc_draws(50, 4, 100, scale=(0.9, 1.0))
    assert (ch == 4).all() and (cw == round(4 * 4 / 3)).all()
    assert (left == (100 - cw) // 2).all() and (top == 0).all()


def test_photometric_probabilities() -> None:
    view = moco_v2(32).views[0]
    n = 8000
    p = D.sample_photometric(view, n, torch.Generator().manual_seed(1), torch.device("cpu"))
    se = 4 * math.sqrt(0.25 / n)
    assert abs(p.jitter_on.float().mean().item() - 0.8) < se
    assert abs(p.gray_on.float().mean().item() - 0.2) < se
    assert abs(p.blur_on.float().mean().item() - 0.5) < se
    assert p.sigma.min() >= 0.1 and p.sigma.max() <= 2.0
    f = p.factors
    assert f[:, :3].min() >= 0.6 and f[:, :3].max() <= 1.4 and f[:, 3].abs().max() <= 0.1
    # every op order is a permutation, and each op lands first about 1/4 of the time
    assert torch.equal(p.order.sort(dim=1).values, torch.arange(4).expand(n, 4))
    first = torch.bincount(p.order[:, 0], minlength=4).float() / n
    assert (first - 0.25).abs().max() < 0.03


def test_augmenter_flip_rate_and_eval_determinism() -> None:
    imgs = _images(3)
    pixels, offsets, H, W = _store(imgs)
    g = torch.Generator().manual_seed(0)
    view = moco_v2(16).views[0]
    n = 4000
    flips = torch.rand(n, generator=g) < view.hflip_p  # the draw the augmenter uses
    assert abs(flips.float().mean().item() - 0.5) < 0.03
    aug = PixelAugmenter(
        eval_spec(16), pixels, offsets, H, W, torch.float32, torch.Generator().manual_seed(0)
    )
    a = aug.augment(torch.arange(4))
    b = aug.augment(torch.arange(4))
    assert len(a) == 1 and torch.equal(a[0], b[0])


needs_kernel = pytest.mark.skipif(not C.CPU_KERNEL, reason="numba CPU kernel not available")


def _u8_batch() -> torch.Tensor:
    """uint8 [B, 3, 24, 24] channels-last (HWC memory), as FFCV hands it over."""
    x = (_batch() * 255).round().to(torch.uint8)
    return x.contiguous(memory_format=torch.channels_last)


@needs_kernel
def test_cpu_kernel_photometric_matches_sequential_torchvision() -> None:
    u8 = _u8_batch()
    x = u8.float() / 255.0
    view = moco_v2(24).views[0]
    k = view.blur.kernel_size(24)
    p = D.Photometric(
        jitter_on=torch.tensor([True, True, True, False]),
        factors=torch.tensor(
            [[0.7, 1.2, 0.8, 0.07], [1.3, 0.6, 1.4, -0.09], [1.0, 1.1, 0.9, 0.02], [0.9, 0.9, 0.9, 0.1]]
        ),
        order=torch.tensor([[3, 0, 2, 1], [0, 1, 2, 3], [2, 3, 1, 0], [1, 0, 3, 2]]),
        gray_on=torch.tensor([False, True, False, True]),
        blur_on=torch.tensor([True, False, True, True]),
        sigma=torch.tensor([0.4, 1.0, 1.7, 2.0]),
    )
    mean, std = torch.tensor(view.normalize.mean), torch.tensor(view.normalize.std)
    (out,) = C.render_cpu_images([u8], [view], [p], [(mean, std)], torch.float32)
    assert out.shape == (4, 3, 24, 24) and out.is_contiguous(memory_format=torch.channels_last)
    fns = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in range(4):
        ref = x[i]
        if p.jitter_on[i]:
            for op in p.order[i].tolist():
                ref = fns[op](ref, float(p.factors[i, op]))
        if p.gray_on[i]:
            ref = TF.rgb_to_grayscale(ref, num_output_channels=3)
        if p.blur_on[i]:
            ref = TF.gaussian_blur(ref, [k, k], [float(p.sigma[i])] * 2)
        ref = TF.normalize(ref, view.normalize.mean, view.normalize.std)
        torch.testing.assert_close(out[i], ref, atol=1e-4, rtol=0)  # ~2e-5 before normalising


@needs_kernel
@pytest.mark.parametrize("spec_name", ["moco_v2", "moco_v2_64", "eval_ten_crop"])
def test_cpu_kernel_augmenter_equals_batched_torch_path(
    spec_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same generator draws, same pixels (to float rounding) with and without the numba kernel."""
    imgs = _images(4)
    pixels, offsets, H, W = _store(imgs)
    spec = {"moco_v2": moco_v2(16), "moco_v2_64": moco_v2(64), "eval_ten_crop": eval_spec(16, True)}[
        spec_name
    ]
    idx = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])

    def render(kernel: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(C, "CPU_KERNEL", kernel)
        gen = torch.Generator().manual_seed(11)
        views = PixelAugmenter(spec, pixels, offsets, H, W, torch.float32, gen).augment(idx)
        return [*views, torch.rand(1, generator=gen)]  # the generator ends in the same state

    fast, ref = render(True), render(False)
    assert len(fast) == len(ref) == spec.num_outputs + 1
    for a, b in zip(fast, ref):
        assert a.shape == b.shape and (a.dim() != 4 or a.is_contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_window_gather_equals_flat_gather() -> None:
    """The broadcast gather over an overlapping window of the store reads exactly the flat-index pixels,
    including 1-pixel-wide/tall images and a last image narrower than the window."""
    imgs = [*_images(5), _images(6)[2][:1], _images(6)[0][:, :1], _images(6)[1][:, :7]]
    pixels, offsets, H, W = _store(imgs)
    k, rows = Geo.store_window(H, W)
    assert k == int(W.max()) and pixels.shape[0] >= rows
    g = torch.Generator().manual_seed(3)
    crop = moco_v2(16).views[0].crop
    for res in (5, 16):
        top, left, ch, cw = Geo.sample_rrc(H, W, crop, g)
        flip = torch.rand(len(imgs), generator=g) < 0.5
        ys, xs = Geo.rrc_maps(top, left, ch, cw, res, flip)
        ref = Geo.resample(pixels, offsets, W, ys, xs)
        assert torch.equal(Geo.resample(pixels, offsets, W, ys, xs, window=k), ref)
        ys, xs = Geo.eval_maps(H, W, Geo.resize_center_boxes(H, W, ResizeCenterCrop(res, res + 3))[0], res)
        assert torch.equal(
            Geo.resample(pixels, offsets, W, ys, xs, window=k), Geo.resample(pixels, offsets, W, ys, xs)
        )


@needs_kernel
def test_fixed_shape_render_equals_the_cpu_kernel() -> None:
    """The torch reference (what a GPU without Triton runs, capturable) renders what the numba kernel does."""
    imgs = _images(7)
    pixels, offsets, H, W = _store(imgs)
    idx = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])

    def render(fixed: bool) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(13)
        aug = PixelAugmenter(moco_v2(24), pixels, offsets, H, W, torch.float32, gen)
        return aug.render(pixels, offsets[idx], H[idx], W[idx], fixed_shape=fixed)

    fixed, numba = render(True), render(False)
    for a, b in zip(fixed, numba):
        assert a.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_blur_matrices_identity_and_non_square_blur() -> None:
    delta = torch.zeros(2, 5)
    delta[:, 2] = 1.0
    assert torch.equal(P.blur_matrices(delta, 9), torch.eye(9).expand(2, 9, 9))
    x = _batch()[:, :, :, :17]  # 24 x 17
    sigma = torch.tensor([0.3, 0.9, 1.5, 2.0])
    out = P.gaussian_blur(x, sigma, 7)
    for i in range(x.shape[0]):
        ref = TF.gaussian_blur(x[i], [7, 7], [float(sigma[i])] * 2)
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)


def test_exact_matmul_turns_tf32_off_and_restores_it() -> None:
    """The trainer allows TF32; the augmentation's matmuls must not use it (flags only, no GPU needed)."""
    m = torch.backends.cuda.matmul
    prev = m.allow_tf32
    try:
        m.allow_tf32 = True
        with P.exact_matmul(torch.device("cuda")):
            assert m.allow_tf32 is False
        assert m.allow_tf32 is True
        with P.exact_matmul(torch.device("cpu")):  # CPU: nothing to change
            assert m.allow_tf32 is True
    finally:
        m.allow_tf32 = prev

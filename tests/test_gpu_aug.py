"""Pixel checks: the batched device ops equal torchvision.transforms.functional on the same images."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms.functional as TF

from fastvpd.data import gpu_aug as G
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
        ys, xs = G.rrc_maps(top, left, ch, cw, res, flip)
        out = G.resample(pixels, offsets, W, ys, xs)
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
    boxes = G.resize_center_boxes(H, W, crop)
    outs = [G.resample(pixels, offsets, W, *G.eval_maps(H, W, box, crop.size)) for box in boxes]
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
        (G.adjust_brightness, TF.adjust_brightness, f),
        (G.adjust_contrast, TF.adjust_contrast, f),
        (G.adjust_saturation, TF.adjust_saturation, f),
        (G.adjust_hue, TF.adjust_hue, hue),
    ]
    for ours, theirs, fac in cases:
        out = ours(x, fac)
        for i in range(x.shape[0]):
            torch.testing.assert_close(out[i], theirs(x[i], float(fac[i])), atol=1e-5, rtol=0)
    gray = G.rgb_to_gray(x)
    torch.testing.assert_close(gray, TF.rgb_to_grayscale(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("subset", [False, True])
def test_color_jitter_order_per_sample_matches_sequential_torchvision(subset: bool) -> None:
    x = _batch()
    factors = torch.tensor(
        [[0.7, 1.2, 0.8, 0.07], [1.3, 0.6, 1.4, -0.09], [1.0, 1.1, 0.9, 0.02], [0.9, 0.9, 0.9, 0.1]]
    )
    order = torch.tensor([[3, 0, 2, 1], [0, 1, 2, 3], [2, 3, 1, 0], [1, 0, 3, 2]])
    on = torch.tensor([True, True, True, False])
    out = G.color_jitter(x, factors, order, on, subset=subset)
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
    out = G.gaussian_blur(x, sigma, k)
    for i in range(x.shape[0]):
        ref = TF.gaussian_blur(x[i], [k, k], [float(sigma[i])] * 2)
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    n = G.normalize(x, mean, std, torch.float32)
    assert n.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(n, TF.normalize(x, mean.tolist(), std.tolist()), atol=1e-6, rtol=0)


def test_photometric_identity_when_nothing_applied() -> None:
    x = _batch()
    view = ViewSpec(
        crop=moco_v2(24).views[0].crop, jitter=ColorJitter(), grayscale_p=0.2, blur=GaussianBlur()
    )
    p = G.sample_photometric(view, x.shape[0], torch.Generator().manual_seed(0), x.device)
    p.jitter_on = torch.zeros(4, dtype=torch.bool)
    p.gray_on = torch.zeros(4, dtype=torch.bool)
    p.blur_on = torch.zeros(4, dtype=torch.bool)
    assert torch.equal(G.photometric(x, view, p), x)


def _rrc_draws(n: int, h: int, w: int, scale=(0.2, 1.0), seed: int = 0):
    from fastvpd.data.spec import RandomResizedCrop

    H = torch.full((n,), h)
    W = torch.full((n,), w)
    return G.sample_rrc(H, W, RandomResizedCrop(32, scale), torch.Generator().manual_seed(seed))


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
    p = G.sample_photometric(view, n, torch.Generator().manual_seed(1), torch.device("cpu"))
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
    aug = G.PixelAugmenter(
        eval_spec(16), pixels, offsets, H, W, torch.float32, torch.Generator().manual_seed(0)
    )
    a = aug.augment(torch.arange(4))
    b = aug.augment(torch.arange(4))
    assert len(a) == 1 and torch.equal(a[0], b[0])


def test_photometric_subset_path_equals_fixed_shape_path() -> None:
    """The CPU subset form (ops only on the samples drawn for them) renders what the capturable form does."""
    x = _batch().repeat(4, 1, 1, 1)
    view = moco_v2(24).views[0]
    p = G.sample_photometric(view, x.shape[0], torch.Generator().manual_seed(5), x.device)
    assert p.jitter_on.any() and p.blur_on.any() and not p.blur_on.all()
    fixed = G.photometric(x, view, p, subset=False)
    torch.testing.assert_close(G.photometric(x, view, p, subset=True), fixed, atol=1e-6, rtol=0)
    assert torch.equal(G.photometric(x, view, p), G.photometric(x, view, p, subset=True))  # CPU default


needs_kernel = pytest.mark.skipif(not G.CPU_KERNEL, reason="numba CPU kernel not available")


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
    p = G.Photometric(
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
    (out,) = G.render_cpu_images([u8], [view], [p], [(mean, std)], torch.float32)
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
        monkeypatch.setattr(G, "CPU_KERNEL", kernel)
        gen = torch.Generator().manual_seed(11)
        views = G.PixelAugmenter(spec, pixels, offsets, H, W, torch.float32, gen).augment(idx)
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
    k, rows = G.store_window(H, W)
    assert k == int(W.max()) and pixels.shape[0] >= rows
    g = torch.Generator().manual_seed(3)
    crop = moco_v2(16).views[0].crop
    for res in (5, 16):
        top, left, ch, cw = G.sample_rrc(H, W, crop, g)
        flip = torch.rand(len(imgs), generator=g) < 0.5
        ys, xs = G.rrc_maps(top, left, ch, cw, res, flip)
        ref = G.resample(pixels, offsets, W, ys, xs)
        assert torch.equal(G.resample(pixels, offsets, W, ys, xs, window=k), ref)
        ys, xs = G.eval_maps(H, W, G.resize_center_boxes(H, W, ResizeCenterCrop(res, res + 3))[0], res)
        assert torch.equal(
            G.resample(pixels, offsets, W, ys, xs, window=k), G.resample(pixels, offsets, W, ys, xs)
        )


@needs_kernel
def test_fixed_shape_render_equals_cpu_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """The capturable path the GPU runs renders what the numba kernel and the subset path render."""
    imgs = _images(7)
    pixels, offsets, H, W = _store(imgs)
    idx = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])

    def render(fixed: bool) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(13)
        aug = G.PixelAugmenter(moco_v2(24), pixels, offsets, H, W, torch.float32, gen)
        return aug.render(pixels, offsets[idx], H[idx], W[idx], fixed_shape=fixed)

    fixed, numba = render(True), render(False)
    monkeypatch.setattr(G, "CPU_KERNEL", False)
    subset = render(False)
    for a, b, c in zip(fixed, numba, subset):
        assert a.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
        torch.testing.assert_close(a, c, atol=1e-5, rtol=0)


def test_blur_matrices_identity_and_non_square_blur() -> None:
    delta = torch.zeros(2, 5)
    delta[:, 2] = 1.0
    assert torch.equal(G.blur_matrices(delta, 9), torch.eye(9).expand(2, 9, 9))
    x = _batch()[:, :, :, :17]  # 24 x 17
    sigma = torch.tensor([0.3, 0.9, 1.5, 2.0])
    out = G.gaussian_blur(x, sigma, 7)
    for i in range(x.shape[0]):
        ref = TF.gaussian_blur(x[i], [7, 7], [float(sigma[i])] * 2)
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)


def test_exact_matmul_turns_tf32_off_and_restores_it() -> None:
    """The trainer allows TF32; the augmentation's matmuls must not use it (flags only, no GPU needed)."""
    m = torch.backends.cuda.matmul
    prev = m.allow_tf32
    try:
        m.allow_tf32 = True
        with G.exact_matmul(torch.device("cuda")):
            assert m.allow_tf32 is False
        assert m.allow_tf32 is True
        with G.exact_matmul(torch.device("cpu")):  # CPU: nothing to change
            assert m.allow_tf32 is True
    finally:
        m.allow_tf32 = prev


def test_compiled_pixel_work_renders_the_same_views(monkeypatch: pytest.MonkeyPatch) -> None:
    """PixelAugmenter(compile=True) (data.compile_aug): the fixed-shape pixel work through torch.compile
    (here its aot_eager backend: Inductor's C++ build takes minutes on 2 cores) gives the eager views."""
    imgs = _images(6)
    pixels, offsets, H, W = _store(imgs)
    idx = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, **{**kw, "backend": "aot_eager"}))
    torch._dynamo.reset()
    try:
        out = {}
        for compiled in (False, True):
            gen = torch.Generator().manual_seed(21)
            aug = G.PixelAugmenter(moco_v2(24), pixels, offsets, H, W, torch.float32, gen, compile=compiled)
            out[compiled] = [
                aug.render(pixels, offsets[idx], H[idx], W[idx], fixed_shape=True) for _ in range(2)
            ]
            assert (aug._pixels_fn is not G.render_pixels) == compiled
        for a, b in zip(sum(out[False], []), sum(out[True], [])):
            assert b.is_contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize(("h", "w", "k"), [(24, 24, 3), (17, 29, 5), (6, 9, 11)])
def test_blur_stencil_sums_what_the_banded_matrices_do(h: int, w: int, k: int) -> None:
    """The compiled form of the blur (gathered taps) against the eager one (banded matmuls), including a
    kernel longer than the image (reflection beyond one bounce) and a delta kernel (the identity)."""
    g = torch.Generator().manual_seed(k)
    x = torch.rand(3, 3, h, w, generator=g).contiguous(memory_format=torch.channels_last)
    ker = G.gaussian_kernels(torch.tensor([0.3, 1.0, 2.0]), k)
    ker[2] = (torch.arange(k) == k // 2).float()
    want = G._blur_planar(x, G.blur_matrices(ker, h), G.blur_matrices(ker, w)).view(x.shape)
    got = G.blur_stencil(x, ker)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert torch.equal(got[2], x[2])


def test_compiled_form_leaves_no_matmul_over_the_image(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside torch.compile the colour matrices, hue's differences and the blur are elementwise sums
    (G.COMPILED_FORM = "pointwise": no bmm for Inductor to leave as an extern pass over the image), the
    views equal the eager matmul form's, and "matmul" keeps the matmuls (benchmarks' A/B row)."""
    imgs = _images(4)
    pixels, offsets, H, W = _store(imgs)
    idx = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    real_compile = torch.compile
    ops: list[str] = []

    def recording(gm: torch.fx.GraphModule, _inputs: list[torch.Tensor]) -> object:
        ops.extend(str(n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_method"))
        return gm.forward

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, **{**kw, "backend": recording}))
    views = {}
    try:
        for form in ("eager", "pointwise", "matmul"):
            torch._dynamo.reset()
            ops.clear()
            monkeypatch.setattr(G, "COMPILED_FORM", form if form != "eager" else "pointwise")
            gen = torch.Generator().manual_seed(5)
            aug = G.PixelAugmenter(
                moco_v2(24), pixels, offsets, H, W, torch.float32, gen, compile=form != "eager"
            )
            views[form] = aug.render(pixels, offsets[idx], H[idx], W[idx], fixed_shape=True)
            matmuls = [o for o in ops if "mm" in o]  # bmm, mm, baddbmm
            if form == "pointwise":
                assert ops and not matmuls, matmuls
            if form == "matmul":  # 6 blends x 2 (mean, image), hue's differences, blur x 2 + its matrices...
                assert len(matmuls) >= 6 * 2 + 1 + 2 + 1, matmuls
    finally:
        torch._dynamo.reset()
    for form in ("pointwise", "matmul"):
        for a, b in zip(views["eager"], views[form]):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=0)

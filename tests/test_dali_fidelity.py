"""The dali backend renders ColorJitter with torchvision's semantics: per-sample op order, exact ops."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

pytest.importorskip("nvidia.dali", reason="needs NVIDIA DALI: pip install -e '.[dali]'")

from nvidia.dali import fn, pipeline_def, types  # noqa: E402

from fastvpd.data import dali as D  # noqa: E402

N = 64  # samples per batch
FACTORS = (0.6, 1.7, 1.8, 0.2)  # brightness, contrast, saturation, hue: fixed, none of them identity
TOL = 2.0 / 255.0  # float ops in another order of evaluation: well inside uint8 rounding


def _image(seed: int = 0, size: int = 8) -> np.ndarray:
    """A small colourful float image in [0, 1] (HWC), smooth enough for every op to matter."""
    g = np.random.default_rng(seed)
    return g.uniform(0.05, 0.95, size=(size, size, 3)).astype(np.float32)


def _run(graph: Callable[[Any], Any], img: np.ndarray) -> np.ndarray:
    """Run graph(float HWC image node) over N copies of `img` on the CPU; [N, H, W, 3] float."""

    @pipeline_def(batch_size=N, num_threads=1, device_id=None, seed=123)
    def pipe() -> Any:
        x = fn.external_source(source=lambda: [img] * N, batch=True, layout="HWC", dtype=types.FLOAT)
        return graph(x)

    p = pipe()
    p.build()
    (out,) = p.run()
    return np.stack([np.asarray(out[i]) for i in range(N)])


def _tv(img: np.ndarray, order: tuple[int, ...], f: tuple[float, ...] = FACTORS) -> torch.Tensor:
    """torchvision's functional ops applied in `order` (0 brightness, 1 contrast, 2 saturation, 3 hue)."""
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    x = torch.from_numpy(img).permute(2, 0, 1)
    for k in order:
        x = ops[k](x, f[k])
    return x.permute(1, 2, 0)


@pytest.mark.parametrize("op", range(4))
def test_each_op_matches_torchvision(op: int) -> None:
    """The jitter with one op's factor set and the others at their identity (factor 1, hue 0: idle slots,
    and torchvision's skipped hue) is torchvision's op alone, on every sample, whatever the order."""
    img = _image(op)
    ranges = [(1.0, 1.0)] * 3 + [(0.0, 0.0)]
    ranges[op] = (FACTORS[op], FACTORS[op])
    out = _run(lambda x: D.jitter_torchvision(x, ranges, 1.0, "cpu"), img)
    ref = _tv(img, (op,)).numpy()
    assert np.abs(out - ref[None]).max() < TOL


@pytest.mark.parametrize("factor", [-0.5, -0.37, -0.1, 0.0, 0.05, 0.25, 0.49, 0.5])
def test_hue_matches_torchvision_on_hard_pixels(factor: float) -> None:
    """The rewritten hue (no sectors, one mod 6) against torchvision on the pixels where its branches
    meet: greys (max = min), ties between channels (max = r = g, ...), primaries and secondaries (sector
    edges), black, white, and random colours, at hue shifts across the whole range."""
    greys = [(0, 0, 0), (1, 1, 1), (0.5, 0.5, 0.5)]
    corners = [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (0, 1, 1), (1, 0, 1)]
    ties = [(0.7, 0.7, 0.2), (0.2, 0.7, 0.7), (0.7, 0.2, 0.7), (0.3, 0.3, 0.9), (0.9, 0.1, 0.1)]
    edges = greys + corners + ties
    rng = np.random.default_rng(11)
    pixels = np.concatenate([np.asarray(edges, np.float32), rng.uniform(size=(50, 3)).astype(np.float32)])
    img = pixels.reshape(8, 8, 3)
    out = _run(lambda x: D._hue(x, fn.random.uniform(values=[6.0 * factor + 6.0])), img)
    ref = TF.adjust_hue(torch.from_numpy(img).permute(2, 0, 1), factor).permute(1, 2, 0).numpy()
    assert np.abs(out - ref[None]).max() < 1e-5


def test_jitter_order_is_per_sample_and_each_is_a_torchvision_order() -> None:
    img = _image(7)
    ranges = [(f, f) for f in FACTORS]
    out = _run(lambda x: D.jitter_torchvision(x, ranges, 1.0, "cpu"), img)
    orders = list(itertools.permutations(range(4)))
    refs = torch.stack([_tv(img, o) for o in orders]).numpy()  # [24, H, W, 3]
    err = np.abs(out[:, None] - refs[None]).reshape(N, len(orders), -1).max(-1)  # [N, 24]
    assert (err.min(1) < TOL).all()  # every sample is torchvision's jitter in some order
    # some orders coincide (brightness commutes with hue), but the samples must show many visibly
    # different results, which a fixed-order rendering (one colour transform for all samples) cannot
    assert _clusters(out, 0.05) >= max(4, _clusters(refs, 0.05) // 2)


def _clusters(images: np.ndarray, tol: float) -> int:
    """Number of groups of images equal within `tol` (greedy: each image joins the first close centre)."""
    centres: list[np.ndarray] = []
    for x in images:
        if not any(np.abs(x - c).max() < tol for c in centres):
            centres.append(x)
    return len(centres)


def test_jitter_probability_and_random_factors() -> None:
    """p gates the whole jitter; with ranges the factors vary per sample and stay in [0, 1]."""
    img = _image(3)
    ranges = D.jitter_ranges(D.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.5))
    out = _run(lambda x: D.jitter_torchvision(x, ranges, 0.5, "cpu"), img)
    untouched = np.abs(out - img[None]).reshape(N, -1).max(-1) < 1e-7
    assert 10 < int(untouched.sum()) < N - 10
    assert out.min() >= 0.0 and out.max() <= 1.0
    changed = out[~untouched].reshape(int((~untouched).sum()), -1)
    assert len(np.unique(changed.round(4), axis=0)) == len(changed)  # per-sample factors


@pytest.mark.parametrize("mode", ["exact", "fused"])
def test_loader_renders_either_jitter_mode(digits_converted, mode: str) -> None:  # type: ignore[no-untyped-def]
    """`data.dali_jitter` picks the rendering; both keep the batch contract; a bad name is one clear line."""
    import torch

    from fastvpd.config import DataConfig, UserError
    from fastvpd.data import build_loader, moco_v2

    cfg = DataConfig(root=str(digits_converted), backend="dali", workers=1, dali_jitter=mode)
    loader = build_loader(cfg, moco_v2(16), "train", 8, "cpu", torch.float32, seed=0)
    assert loader.jitter == mode
    b = next(iter(loader))
    assert len(b.views) == 2 and all(v.shape == (8, 3, 16, 16) and torch.isfinite(v).all() for v in b.views)
    with pytest.raises(UserError, match="data.dali_jitter"):
        build_loader(
            DataConfig(root=str(digits_converted), backend="dali", dali_jitter="slow"),
            moco_v2(16),
            "train",
            8,
            "cpu",
        )


def _dali_two_views(root: Any, decode: str, full_crop: bool, seed: int = 3) -> list:
    """MoCo's two views at 16 px with no photometric ops or flip, one epoch, decoded `once` or `twice`."""
    from fastvpd.config import DataConfig
    from fastvpd.data import build_loader, moco_v2
    from fastvpd.data.spec import RandomResizedCrop, replace, with_strength

    spec = with_strength(moco_v2(16), hflip_p=0.0, jitter_p=0, grayscale_p=0, blur_p=0)
    if full_crop:
        crop = RandomResizedCrop(16, (1.0, 1.0), (1.0, 1.0))
        spec = replace(spec, views=tuple(replace(v, crop=crop) for v in spec.views))
    cfg = DataConfig(root=str(root), backend="dali", workers=1, dali_decode=decode)
    return list(build_loader(cfg, spec, "train", 8, "cpu", torch.float32, seed=seed))


def test_decode_once_cuts_the_views_twice_decodes(digits_converted) -> None:  # type: ignore[no-untyped-def]
    """`data.dali_decode=once` (one whole decode, views by random_resized_crop) renders what `twice`
    (a cropped decode per view) renders: with a full-image crop the same pixels in every view slot, and
    random crops that differ between the two views of a sample."""
    once = _dali_two_views(digits_converted, "once", full_crop=True)
    twice = _dali_two_views(digits_converted, "twice", full_crop=True)
    assert len(once) == len(twice) >= 3
    for a, b in zip(once, twice):
        assert torch.equal(a.indices, b.indices)
        for va, vb in zip(a.views, b.views):
            torch.testing.assert_close(va, vb, rtol=0, atol=1e-5)
    crops = _dali_two_views(digits_converted, "once", full_crop=False)
    differ = torch.cat([(b.views[0] - b.views[1]).flatten(1).abs().amax(1) > 1e-4 for b in crops])
    assert float(differ.float().mean()) > 0.9
    again = _dali_two_views(digits_converted, "once", full_crop=False)
    assert all(torch.equal(a.views[1], b.views[1]) for a, b in zip(crops, again))  # seeded


def test_unknown_dali_decode_mode_is_one_clear_line(digits_converted) -> None:  # type: ignore[no-untyped-def]
    from fastvpd.config import UserError

    with pytest.raises(UserError, match="data.dali_decode='thrice' is not one of once, twice"):
        _dali_two_views(digits_converted, "thrice", full_crop=True)


def test_slot_table_replays_every_order() -> None:
    """Re-derived: for each of the 24 orders, the blends the six slots apply (slots 0-2, then the hue,
    then slots 3-5) are that order, each blend exactly once; row i is itertools.permutations' i-th."""
    table = D._slot_table()
    assert table.shape == (24, 6, 3)
    for row, order in zip(table, itertools.permutations(range(4))):
        assert set(row.sum(1).tolist()) <= {0.0, 1.0}  # a slot applies one blend or none
        applied = [int(row[s].argmax()) for s in range(3) if row[s].any()]
        applied += [3] + [int(row[s].argmax()) for s in range(3, 6) if row[s].any()]
        assert tuple(applied) == order

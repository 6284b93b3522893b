"""The dali backend: DALI decodes (once per sample), crops and flips into uint8; the loader's device renders
the rest of the view (jitter, grayscale, blur, normalise) with the ffcv backend's finishing ops and draws."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

pytest.importorskip("nvidia.dali", reason="needs NVIDIA DALI: pip install 'fastvpd[dali]'")

from fastvpd.config import DataConfig, UserError  # noqa: E402
from fastvpd.data import build_loader, moco_v2, supervised  # noqa: E402
from fastvpd.data.augment.draws import sample_photometric  # noqa: E402
from fastvpd.data.augment.photometric import photometric  # noqa: E402
from fastvpd.data.spec import with_strength  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RES = 16
BS = 32


pytestmark = pytest.mark.usefixtures("one_thread")


def _loader(root: Path, spec, split: str = "train", seed: int = 3, **hooks):  # noqa: ANN001, ANN003, ANN202
    cfg = DataConfig(root=str(root), backend="dali", workers=2)
    return build_loader(
        cfg, spec, split, BS, "cpu", torch.float32, seed=seed, train=split == "train", **hooks
    )


def _no_photometric(spec):  # noqa: ANN001, ANN202
    return with_strength(spec, jitter_p=0, grayscale_p=0, blur_p=0)


def test_the_device_finishes_the_crops_with_the_batch_draws(digits_converted: Path) -> None:
    """The uint8 crops do not depend on the photometric ops of the spec (DALI only crops and flips), and
    each view is the torch reference `photometric` of its crop with the draws of a generator seeded by the
    batch's `step_seed`: what the ffcv backend (and the cache backend's draws) do."""

    def run(spec):  # noqa: ANN001, ANN202
        loader = _loader(digits_converted, spec)
        finisher, seen = loader._finisher, []

        def record(images: list, seed: int) -> list:
            seen.append(([x.clone() for x in images], seed))
            return finisher(images, seed)

        loader._finisher = record
        loader.set_epoch(1)
        return loader, list(itertools.islice(loader, 3)), seen

    spec = moco_v2(RES)
    loader, batches, seen = run(spec)
    _, _, plain = run(_no_photometric(spec))
    for k, (b, (images, seed), (plain_images, plain_seed)) in enumerate(zip(batches, seen, plain)):
        assert seed == plain_seed == loader.step_seed(k)
        gen = torch.Generator().manual_seed(seed)
        for view, x, x0, got in zip(spec.views, images, plain_images, b.views):
            assert x.dtype == torch.uint8 and x.shape == (BS, 3, RES, RES)
            assert x.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(x, x0)
            ph = sample_photometric(view, BS, gen, torch.device("cpu"))
            mean, std = torch.tensor(view.normalize.mean), torch.tensor(view.normalize.std)
            want = photometric(x.float() / 255.0, view, ph, mean, std, torch.float32)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert "generator" in loader.state_dict()


def test_resumes_exactly(digits_converted: Path) -> None:
    """Resume at start_step gives the epoch's tail batch for batch (DALI re-reads the skipped batches;
    the photometric draws come from each batch's own step seed); another epoch draws other views."""
    spec = moco_v2(RES)
    loader = _loader(digits_converted, spec)
    loader.set_epoch(1)
    full = list(loader)
    loader.set_epoch(1, start_step=2)
    tail = list(loader)
    assert len(tail) == len(full) - 2
    for a, b in zip(tail, full[2:]):
        assert torch.equal(a.indices, b.indices)
        assert all(torch.equal(x, y) for x, y in zip(a.views, b.views))
    loader.set_epoch(0)
    assert not torch.equal(next(iter(loader)).views[0], full[0].views[0])


def test_autoaugment_on_the_device(digits_converted: Path) -> None:
    """AutoAugment views: DALI crops and flips, the loader runs AutoAugment eagerly on the device (as the
    ffcv backend), then the photometric ops; seeded."""
    spec = supervised(RES, autoaugment=True)
    a, b = (next(iter(_loader(digits_converted, spec))) for _ in range(2))
    assert len(a.views) == 1 and a.views[0].shape == (BS, 3, RES, RES)
    assert a.views[0].is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(a.views[0]).all() and torch.equal(a.views[0], b.views[0])
    plain = next(iter(_loader(digits_converted, supervised(RES))))
    assert torch.equal(a.indices, plain.indices)
    assert not torch.equal(a.views[0], plain.views[0])  # the policy changed some pixels


def test_triton_kernels_need_a_gpu(digits_converted: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU the default picks the torch ops (numba); asking for the Triton kernels is one line."""
    assert not _loader(digits_converted, moco_v2(RES))._finisher.triton
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(UserError, match="need a CUDA device"):
        _loader(digits_converted, moco_v2(RES), aug_kernel="triton")


CHILD = """
import json, sys, torch
from fastvpd.config import DataConfig
from fastvpd.data import build_loader, moco_v2
torch.set_num_threads(1)
out = []
for kernel in ("torch", "triton"):
    cfg = DataConfig(root=sys.argv[1], backend="dali", workers=1)
    loader = build_loader(cfg, moco_v2(16), "train", 16, "cpu", torch.float32, seed=5, aug_kernel=kernel)
    out.append(next(iter(loader)))
a, b = out
print("RESULT " + json.dumps({
    "same_indices": torch.equal(a.indices, b.indices),
    "layout": all(v.is_contiguous(memory_format=torch.channels_last) for v in b.views),
    "diff": max(float((x - y).abs().max()) for x, y in zip(a.views, b.views)),
}))
"""


def test_triton_kernels_finish_the_dali_crops(digits_converted: Path, triton_child) -> None:  # noqa: ANN001
    """The Triton kernels finishing DALI's crops (in Triton's interpreter, a child process): the views of
    the torch renderings (the numba kernel here), from the same crops and draws."""
    pytest.importorskip("triton")
    r = triton_child(CHILD, str(digits_converted))
    assert r["same_indices"] and r["layout"], r
    assert r["diff"] <= 2e-5, r

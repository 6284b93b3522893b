"""The ffcv backend is reproducible: crop/flip draws are seeded per (seed, epoch, view, sample)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastvpd.data import torch_threads_kept

with torch_threads_kept():  # importing FFCV would leave the whole test session on one torch thread
    pytest.importorskip("ffcv", reason="needs FFCV: pip install -e '.[ffcv]'")

from fastvpd.config import DataConfig  # noqa: E402
from fastvpd.data import build_loader, supervised  # noqa: E402
from fastvpd.data.spec import with_strength  # noqa: E402

RES = 16
BS = 32


def _loader(root: Path, seed: int, workers: int = 2):  # noqa: ANN202
    # no photometric ops: the views are the decoder's crop + flip only, the part FFCV draws itself
    spec = with_strength(supervised(RES, min_scale=0.08), hflip_p=0.5)
    cfg = DataConfig(root=str(root), backend="ffcv", workers=workers)
    return build_loader(cfg, spec, "train", BS, "cpu", seed=seed)


def _epoch(ld, epoch: int = 0, start: int = 0) -> list:  # noqa: ANN001
    ld.set_epoch(epoch, start_step=start)
    return list(ld)


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x.indices, y.indices) and torch.equal(x.views[0], y.views[0]) for x, y in zip(a, b)
    )


def _by_index(batches: list) -> dict[int, torch.Tensor]:
    return {int(i): v for b in batches for i, v in zip(b.indices, b.views[0])}


def _frac_differing(a: list, b: list) -> float:
    """Fraction of the samples both epochs hold whose view differs (same samples, any order)."""
    va, vb = _by_index(a), _by_index(b)
    common = sorted(set(va) & set(vb))
    assert len(common) > 50
    return sum(not torch.equal(va[i], vb[i]) for i in common) / len(common)


def test_same_seed_same_batches_and_fresh_crops_per_epoch(digits_converted: Path) -> None:
    ld = _loader(digits_converted, seed=5)
    a = _epoch(ld)
    assert len(a) >= 3
    # a second loader with the same seed (and another thread count) yields identical batches
    assert _same(a, _epoch(_loader(digits_converted, seed=5, workers=1)))
    assert _same(_epoch(ld, start=2), a[2:])  # resume mid-epoch: the same remaining batches
    assert _same(_epoch(ld), a)  # re-running an epoch of the same loader repeats it
    assert _frac_differing(a, _epoch(ld, epoch=1)) > 0.5  # new epoch: new crops for the same samples
    assert _frac_differing(a, _epoch(_loader(digits_converted, seed=6))) > 0.5  # another seed


def test_flip_is_drawn_per_sample(digits_converted: Path) -> None:
    """The fused flip is a real coin flip: some samples are mirrored, some not (crop fixed: scale 1)."""
    from fastvpd.data.spec import RandomResizedCrop, replace

    spec = with_strength(supervised(RES), hflip_p=0.5)
    v = replace(spec.views[0], crop=RandomResizedCrop(RES, (1.0, 1.0), (1.0, 1.0)))
    spec = replace(spec, views=(v,))
    cfg = DataConfig(root=str(digits_converted), backend="ffcv", workers=2)
    flipped = [
        next(iter(build_loader(cfg, s, "train", BS, "cpu", seed=1)))
        for s in (spec, replace(spec, views=(replace(v, hflip_p=0.0),)))
    ]
    same = (flipped[0].views[0] - flipped[1].views[0]).flatten(1).abs().amax(1) < 1e-6
    mirrored = (flipped[0].views[0] - flipped[1].views[0].flip(-1)).flatten(1).abs().amax(1) < 1e-6
    assert torch.equal(flipped[0].indices, flipped[1].indices)
    assert bool((same | mirrored).all()) and 0 < int(mirrored.sum()) and 0 < int(same.sum())


def _threads_after(code: str) -> str:
    """torch's thread count after `code` ran in a fresh interpreter that set it to 3."""
    import subprocess
    import sys

    prog = f"import torch; torch.set_num_threads(3); {code}; import ffcv; print(torch.get_num_threads())"
    root = Path(__file__).parents[1]
    out = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, check=True, cwd=root)
    return out.stdout.split()[-1]


def test_importing_ffcv_through_the_backend_keeps_torch_threads() -> None:
    """FFCV's import calls torch.set_num_threads(1); our import path undoes it (else training uses 1 core)."""
    assert _threads_after("from fastvpd.data.ffcv import _import_ffcv; _import_ffcv()") == "3"


def test_converting_to_ffcv_keeps_torch_threads(digits_src: Path, tmp_path: Path) -> None:
    """The demo converts, then trains in the same process: the converter must leave the thread count."""
    call = f"convert({str(digits_src)!r}, {str(tmp_path)!r}, ['ffcv'], progress=False)"
    assert _threads_after(f"from fastvpd.convert import convert; {call}") == "3"


def _two_views(root: Path, decode: str, full_crop: bool, hflip_p: float, seed: int = 3) -> list:
    """MoCo's two views with no photometric ops, decoded `once` (both cut from one decode) or `twice`."""
    from fastvpd.data import moco_v2
    from fastvpd.data.spec import RandomResizedCrop, replace

    spec = with_strength(moco_v2(RES), hflip_p=hflip_p, jitter_p=0, grayscale_p=0, blur_p=0)
    if full_crop:
        crop = RandomResizedCrop(RES, (1.0, 1.0), (1.0, 1.0))
        spec = replace(spec, views=tuple(replace(v, crop=crop) for v in spec.views))
    cfg = DataConfig(root=str(root), backend="ffcv", workers=2, ffcv_decode=decode)
    return _epoch(build_loader(cfg, spec, "train", BS, "cpu", seed=seed))


def test_decode_once_slices_each_view_from_its_own_sample(digits_converted: Path) -> None:
    """With a deterministic full-image crop, `once` and `twice` give the same pixels in every view slot:
    the [B, V, R, R, 3] decode buffer is sliced into views without mixing samples or views."""
    once = _two_views(digits_converted, "once", full_crop=True, hflip_p=0.0)
    twice = _two_views(digits_converted, "twice", full_crop=True, hflip_p=0.0)
    assert len(once) == len(twice) >= 3
    for a, b in zip(once, twice):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.labels, b.labels)
        for va, vb in zip(a.views, b.views):
            assert va.is_contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(va, vb, rtol=0, atol=1e-6)
        torch.testing.assert_close(a.views[0], a.views[1], rtol=0, atol=1e-6)


def test_decode_once_draws_independent_views(digits_converted: Path) -> None:
    """Both views come from one decode but get their own crop and flip: flips are independent coins, crops
    differ, and the draws are a function of the seed (a second loader repeats them)."""
    flips = _two_views(digits_converted, "once", full_crop=True, hflip_p=0.5)
    v0, v1 = (torch.cat([b.views[i] for b in flips]) for i in (0, 1))
    same = (v0 - v1).flatten(1).abs().amax(1) < 1e-6
    mirrored = (v0 - v1.flip(-1)).flatten(1).abs().amax(1) < 1e-6
    symmetric = same & mirrored  # a mirror-symmetric image cannot tell
    assert bool((same | mirrored).all())
    frac_flipped = float((mirrored & ~symmetric).sum()) / float((~symmetric).sum())
    assert 0.3 < frac_flipped < 0.7  # P(views differ by a flip) = 0.5 for two independent p=0.5 coins
    crops = _two_views(digits_converted, "once", full_crop=False, hflip_p=0.0)
    differ = torch.cat([(b.views[0] - b.views[1]).flatten(1).abs().amax(1) > 1e-6 for b in crops])
    assert float(differ.float().mean()) > 0.9
    again = _two_views(digits_converted, "once", full_crop=False, hflip_p=0.0)
    assert _same(crops, again) and all(torch.equal(a.views[1], b.views[1]) for a, b in zip(crops, again))


def test_unknown_decode_mode_is_one_clear_line(digits_converted: Path) -> None:
    from fastvpd.config import UserError

    with pytest.raises(UserError, match="data.ffcv_decode='thrice' is not one of once, twice"):
        _two_views(digits_converted, "thrice", full_crop=True, hflip_p=0.0)


def test_loader_construction_survives_cpythons_ast_race(
    digits_converted: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CPython <= 3.11.7 can raise a spurious SystemError from FFCV's ast.parse while another loader's
    thread compiles with numba (gh-106905; seen once in this suite). The backend builds FFCV's Loader again,
    with the same pipelines, and the batches are those of an undisturbed build; any other SystemError, or the
    race three times over, still raises."""
    import ffcv.loader

    real = ffcv.loader.Loader
    fails = {"left": 1, "message": "AST constructor recursion depth mismatch (before=168, after=189)"}

    def flaky(*a: object, **kw: object) -> object:
        if fails["left"] > 0:
            fails["left"] -= 1
            raise SystemError(fails["message"])
        return real(*a, **kw)

    want = next(iter(_loader(digits_converted, seed=4)))
    monkeypatch.setattr(ffcv.loader, "Loader", flaky)
    got = next(iter(_loader(digits_converted, seed=4)))
    assert fails["left"] == 0
    assert torch.equal(got.indices, want.indices) and torch.equal(got.views[0], want.views[0])
    fails.update(left=3)
    with pytest.raises(SystemError, match="recursion depth mismatch"):
        _loader(digits_converted, seed=4)
    fails.update(left=1, message="something else")
    with pytest.raises(SystemError, match="something else"):
        _loader(digits_converted, seed=4)

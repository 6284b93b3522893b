"""Every backend yields the loader contract on the converted digits; cache-backend determinism/sharding."""

from __future__ import annotations

import itertools
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastvpd.config import DataConfig, UserError
from fastvpd.data import build_loader, eval_spec, measure_loader, moco_v2, shard_indices, supervised
from fastvpd.data.manifest import Manifest

RES = 16
BS = 64
BACKENDS = ["cache", "ffcv", "dali", "torchvision"]
# loader rows that are a backend built with a constructor hook (not a user setting): DALI's crops finished
# by the Triton kernels, and two DALI pipelines side by side, half of every batch each
VARIANTS: dict[str, tuple[str, dict]] = {
    "dali_triton": ("dali", {"aug_kernel": "triton"}),
    "dali_pipelines": ("dali", {"pipelines": 2}),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(root: Path, backend: str) -> DataConfig:
    """The data config of a backend or of a VARIANTS row's backend."""
    return DataConfig(root=str(root), backend=VARIANTS.get(backend, (backend, {}))[0], workers=2)


def _build(root: Path, backend: str, *args, **kw):  # noqa: ANN002, ANN003, ANN202
    """build_loader for a backend or a VARIANTS row (its hooks as constructor arguments)."""
    return build_loader(_cfg(root, backend), *args, **{**VARIANTS.get(backend, (backend, {}))[1], **kw})


def _labels(root: Path, split: str) -> np.ndarray:
    return np.asarray(Manifest.load(root).labels(split))


def _check_batch(
    b, n_views: int, bs: int | None, dtype: torch.dtype, labels: np.ndarray, device: str = "cpu"
) -> None:
    assert len(b.views) == n_views
    for v in b.views:
        assert v.shape[1:] == (3, RES, RES) and v.dtype == dtype and v.device.type == device
        assert v.is_contiguous(memory_format=torch.channels_last)
        assert torch.isfinite(v.float()).all()
    assert b.labels.dtype == torch.int64 and b.indices.dtype == torch.int64
    if bs is not None:
        assert b.labels.shape == (bs,) and b.views[0].shape[0] == bs
    assert np.array_equal(labels[b.indices.cpu().numpy()], b.labels.cpu().numpy())


@pytest.mark.parametrize("backend", [*BACKENDS, "dali_pipelines"])
def test_backend_train_contract(digits_converted: Path, backend: str) -> None:
    labels = _labels(digits_converted, "train")
    loader = _build(digits_converted, backend, moco_v2(RES), "train", BS, "cpu", torch.bfloat16, seed=0)
    assert loader.num_samples == len(labels) and loader.num_classes == 10
    assert len(loader) == len(labels) // BS
    seen = []
    for b in loader:
        _check_batch(b, 2, BS, torch.bfloat16, labels)
        assert not torch.equal(b.views[0], b.views[1])  # two independent views
        seen.append(b.indices)
    assert len(seen) == len(loader)
    allidx = torch.cat(seen)
    assert len(set(allidx.tolist())) == len(allidx)  # an epoch visits each sample at most once
    # normalised: roughly zero-centred, unit-scale values
    assert -2.5 < float(b.views[0].float().mean()) < 1.5


@pytest.mark.cuda
@pytest.mark.parametrize("backend", [*BACKENDS, *VARIANTS])
def test_backend_train_contract_on_gpu(digits_converted: Path, backend: str) -> None:
    """On a GPU every backend hands over device views (DALI decodes with nvJPEG, `mixed`, once per sample,
    and the device finishes its uint8 crops: `dali_triton` by the Triton kernels, `dali_pipelines` from two
    pipelines side by side; the cache sits in device memory), and the same seed gives the same batches
    there too."""
    if backend.startswith(("ffcv", "dali")):
        pytest.importorskip("ffcv" if backend == "ffcv" else "nvidia.dali")
    if backend == "dali_triton":
        pytest.importorskip("triton")
    labels = _labels(digits_converted, "train")

    def first(n: int) -> list:
        loader = _build(digits_converted, backend, moco_v2(RES), "train", BS, "cuda", torch.bfloat16, seed=0)
        return list(itertools.islice(loader, n))

    a, b = first(2), first(2)
    for x, y in zip(a, b):
        _check_batch(x, 2, BS, torch.bfloat16, labels, device="cuda")
        assert torch.equal(x.indices.cpu(), y.indices.cpu())
        for vx, vy in zip(x.views, y.views):
            torch.testing.assert_close(vx, vy, rtol=0, atol=1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_eval_contract(digits_converted: Path, backend: str) -> None:
    labels = _labels(digits_converted, "val")
    loader = build_loader(
        _cfg(digits_converted, backend), eval_spec(RES), "val", BS, "cpu", torch.float32, train=False
    )
    batches = list(loader)
    assert len(batches) == len(loader) == -(-len(labels) // BS)
    for b in batches:
        _check_batch(b, 1, None, torch.float32, labels)
    assert sorted(torch.cat([b.indices for b in batches]).tolist()) == list(range(len(labels)))
    if not backend.startswith("dali"):  # DALI reads in stored order too, but rank shards are contiguous
        assert torch.equal(torch.cat([b.indices for b in batches]), torch.arange(len(labels)))


def test_cache_ten_crop_and_supervised(digits_converted: Path) -> None:
    cfg = _cfg(digits_converted, "cache")
    tc = build_loader(cfg, eval_spec(RES, ten_crop=True), "val", BS, "cpu", torch.float32, train=False)
    b = next(iter(tc))
    assert len(b.views) == 10
    # the last five crops are mirrored versions of the first five (tr'<->tl, ...): centre crop pair
    assert torch.allclose(b.views[9].flip(-1), b.views[4], atol=1e-5) or b.views[4].shape[-1] % 2 == 0
    sup = build_loader(cfg, supervised(RES), "train", BS, "cpu", torch.float32)
    _check_batch(next(iter(sup)), 1, BS, torch.float32, _labels(digits_converted, "train"))


def test_cache_eval_matches_torchvision_backend_geometry(digits_converted: Path) -> None:
    """Same eval transform rendered by cache (device bilinear) and torchvision (PIL): close on digits."""
    a = next(
        iter(build_loader(_cfg(digits_converted, "cache"), eval_spec(RES), "val", BS, "cpu", train=False))
    )
    b = next(
        iter(
            build_loader(_cfg(digits_converted, "torchvision"), eval_spec(RES), "val", BS, "cpu", train=False)
        )
    )
    assert torch.equal(a.indices, b.indices)
    # PIL antialiases when downscaling; the mean absolute difference stays a small fraction of the range
    assert (a.views[0] - b.views[0]).abs().mean() < 0.25


def test_cache_determinism_resume_and_state(digits_converted: Path) -> None:
    cfg = _cfg(digits_converted, "cache")

    def run(seed: int, epoch: int = 0, start: int = 0):
        ld = build_loader(cfg, moco_v2(RES), "train", BS, "cpu", torch.float32, seed=seed)
        ld.set_epoch(epoch, start_step=start)
        return list(ld)

    a, b = run(0), run(0)
    assert all(
        torch.equal(x.indices, y.indices) and torch.equal(x.views[1], y.views[1]) for x, y in zip(a, b)
    )
    assert not torch.equal(run(1)[0].indices, a[0].indices)
    assert not torch.equal(run(0, epoch=1)[0].indices, a[0].indices)
    tail = run(0, start=3)
    assert len(tail) == len(a) - 3
    for x, y in zip(tail, a[3:]):
        assert torch.equal(x.indices, y.indices) and torch.equal(x.views[0], y.views[0])
    ld = build_loader(cfg, moco_v2(RES), "train", BS, "cpu", torch.float32, seed=0)
    ld.set_epoch(2, start_step=4)
    st = ld.state_dict()
    ld2 = build_loader(cfg, moco_v2(RES), "train", BS, "cpu", torch.float32, seed=0)
    ld2.load_state_dict(st)
    assert (ld2.epoch, ld2.start_step) == (2, 4)
    assert torch.equal(next(iter(ld)).views[0], next(iter(ld2)).views[0])


def test_rank_sharding_is_disjoint_and_covers_the_epoch(digits_converted: Path) -> None:
    n, world = 500, 3
    parts = [shard_indices(n, 7, 5, r, world, train=True) for r in range(world)]
    flat = torch.cat(parts)
    assert len(set(flat.tolist())) == len(flat) == (n // world) * world
    cfg = _cfg(digits_converted, "cache")
    loaders = [
        build_loader(cfg, moco_v2(RES), "train", BS, "cpu", seed=7, rank=r, world_size=world)
        for r in range(world)
    ]
    assert len({len(ld) for ld in loaders}) == 1
    idx = [torch.cat([b.indices for b in ld]) for ld in loaders]
    allidx = torch.cat(idx)
    assert len(set(allidx.tolist())) == len(allidx) == world * len(loaders[0]) * BS


def test_cache_host_placement_matches_device(digits_converted: Path) -> None:
    from fastvpd.data.cache import CacheLoader

    m = Manifest.load(digits_converted)
    dev = CacheLoader(m, "train", moco_v2(RES), BS, torch.device("cpu"), torch.float32, 3)
    host = CacheLoader(m, "train", moco_v2(RES), BS, torch.device("cpu"), torch.float32, 3, placement="host")
    for a, b in itertools.islice(zip(dev, host), 3):
        assert torch.equal(a.indices, b.indices) and all(torch.equal(x, y) for x, y in zip(a.views, b.views))
    # the pure device function is the loader's rendering of a batch
    views = dev.augment(torch.arange(4))
    assert len(views) == 2 and views[0].shape == (4, 3, RES, RES)


def test_dali_same_seed_same_batches(digits_converted: Path) -> None:
    pytest.importorskip("nvidia.dali")
    cfg = _cfg(digits_converted, "dali")
    a = next(iter(build_loader(cfg, moco_v2(RES), "train", BS, "cpu", seed=4)))
    b = next(iter(build_loader(cfg, moco_v2(RES), "train", BS, "cpu", seed=4)))
    assert torch.equal(a.indices, b.indices) and torch.equal(a.views[0], b.views[0])
    assert torch.equal(a.views[1], b.views[1])


def test_measure_loader(digits_converted: Path) -> None:
    ld = build_loader(_cfg(digits_converted, "cache"), moco_v2(RES), "train", BS, "cpu", seed=0)
    m = measure_loader(ld, 3, warmup=1)
    assert m["batches"] == 3 and m["samples_per_s"] > 0 and m["views"] == 2


def test_user_errors(digits_converted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError, match="manifest.json"):
        build_loader(_cfg(tmp_path, "cache"), moco_v2(RES), "train", BS, "cpu")
    with pytest.raises(UserError, match="data.backend"):
        build_loader(_cfg(digits_converted, "nope"), moco_v2(RES), "train", BS, "cpu")
    with pytest.raises(UserError, match="batch size"):
        build_loader(_cfg(digits_converted, "cache"), moco_v2(RES), "train", 10_000, "cpu")
    for mod, backend, hint in (
        ("ffcv", "ffcv", r"fastvpd\[ffcv\]"),
        ("nvidia.dali", "dali", r"fastvpd\[dali\]"),
    ):
        with monkeypatch.context() as mp:
            mp.setitem(sys.modules, mod, None)  # import fails as if the package were not installed
            with pytest.raises(UserError, match=hint):
                build_loader(_cfg(digits_converted, backend), moco_v2(RES), "train", BS, "cpu")
    # a truncated cache file is caught by the manifest check before reading
    broken = tmp_path / "broken"
    shutil.copytree(digits_converted, broken)
    pix = broken / "train" / "cache" / "pixels.npy"
    pix.write_bytes(pix.read_bytes()[:-10])
    with pytest.raises(UserError, match="--force"):
        build_loader(_cfg(broken, "cache"), moco_v2(RES), "train", BS, "cpu")


def test_torchvision_persistent_workers_follow_the_epoch(digits_converted: Path) -> None:
    """The workers outlive an epoch, so the epoch reaches them with each index: one loader's epochs 0, 1, 0
    equal three fresh loaders' (0 workers) for those epochs, epoch 1 draws new views, and a resumed epoch
    (start_step) repeats its tail."""
    spec = supervised(RES)

    def loader(workers: int):  # noqa: ANN202
        cfg = DataConfig(root=str(digits_converted), backend="torchvision", workers=workers)
        return build_loader(cfg, spec, "val", 32, "cpu", torch.float32, seed=4, train=True)

    def epoch(ld, e: int, start: int = 0) -> list:  # noqa: ANN001
        ld.set_epoch(e, start_step=start)
        return list(itertools.islice(ld, 3))

    def same(a: list, b: list) -> bool:
        return all(
            torch.equal(x.indices, y.indices) and torch.equal(x.views[0], y.views[0]) for x, y in zip(a, b)
        )

    persistent = loader(2)
    runs = [epoch(persistent, e) for e in (0, 1, 0)]
    assert persistent._dl is not None and persistent._dl.persistent_workers
    fresh = [epoch(loader(0), e) for e in (0, 1)]
    assert same(runs[0], fresh[0]) and same(runs[1], fresh[1]) and same(runs[2], fresh[0])
    by_index = [{int(i): v for b in r for i, v in zip(b.indices, b.views[0])} for r in (fresh[0], fresh[1])]
    common = set(by_index[0]) & set(by_index[1])
    assert common and sum(not torch.equal(by_index[0][i], by_index[1][i]) for i in common) > len(common) // 2
    assert same(epoch(persistent, 1, start=1), runs[1][1:])


def test_cache_views_in_step_are_the_loaders_views(digits_converted: Path) -> None:
    """Views rendered in the step: index-only batches + seed; seed_views + augment renders the very same
    pixels."""
    from fastvpd.data import views_in_step

    cfg = _cfg(digits_converted, "cache")
    said: list[str] = []
    plain = build_loader(cfg, moco_v2(RES), "train", BS, "cpu", torch.float32, seed=3)
    deferred = build_loader(cfg, moco_v2(RES), "train", BS, "cpu", torch.float32, seed=3)
    assert views_in_step(deferred, said.append) and "inside the training step" in said[-1]
    for epoch, start in ((0, 0), (1, 2)):  # a later epoch, resumed mid-way
        plain.set_epoch(epoch, start)
        deferred.set_epoch(epoch, start)
        for a, b in itertools.islice(zip(plain, deferred), 3):
            assert b.views == [] and b.seed is not None
            assert torch.equal(a.indices, b.indices) and torch.equal(a.labels, b.labels)
            deferred.seed_views(b)
            for va, vb in zip(a.views, deferred.augment(b.indices)):
                assert torch.equal(va, vb)
    with pytest.raises(ValueError, match="deferred batch"):
        deferred.seed_views(next(iter(plain)))
    # a backend that renders on the host, or AutoAugment (host-side PIL ops): ordinary batches
    ffcv = build_loader(_cfg(digits_converted, "ffcv"), moco_v2(RES), "train", BS, "cpu", torch.float32)
    assert not views_in_step(ffcv, said.append)
    aa = build_loader(cfg, supervised(RES, autoaugment=True), "train", BS, "cpu", torch.float32)
    assert not views_in_step(aa, said.append) and "AutoAugment" in said[-1]
    assert next(iter(aa)).views  # still renders in the loader


@pytest.mark.parametrize("backend", ["ffcv", "dali"])
def test_device_finishing_ops_equal_the_cpu_kernel(
    digits_converted: Path, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    """The ffcv and dali backends' torch finishing ops (what a GPU without Triton runs) render what the
    numba CPU kernel renders."""
    from fastvpd.data.augment import cpu

    if not cpu.CPU_KERNEL:
        pytest.skip("numba CPU kernel not available")
    pytest.importorskip("ffcv" if backend == "ffcv" else "nvidia.dali")
    loader = build_loader(
        _cfg(digits_converted, backend), moco_v2(RES), "train", BS, "cpu", torch.float32, seed=4
    )
    out = {}
    for kernel in (True, False):  # the same epoch twice (its batches are a function of (seed, epoch))
        monkeypatch.setattr(cpu, "CPU_KERNEL", kernel)
        loader.set_epoch(1)
        out[kernel] = list(itertools.islice(loader, 2))
    for a, b in zip(out[True], out[False]):
        assert torch.equal(a.indices, b.indices)
        for va, vb in zip(a.views, b.views):
            assert vb.is_contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(vb, va, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def extreme_converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smallest and most elongated images the converter keeps (smallest side MIN_SIDE, aspect
    MAX_ASPECT:1 both ways), two classes, converted into every format."""
    from PIL import Image

    from fastvpd.convert import MAX_ASPECT, MIN_SIDE, convert

    src = tmp_path_factory.mktemp("extreme_src")
    long = MIN_SIDE * MAX_ASPECT
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (src / split / cls).mkdir(parents=True)
            for i, (h, w) in enumerate([(MIN_SIDE, MIN_SIDE), (MIN_SIDE, long), (long, MIN_SIDE)]):
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(src / split / cls / f"{i}.jpg", quality=95)
    out = tmp_path_factory.mktemp("extreme_conv")
    summary = convert(src, out, formats=("ffcv", "dali", "cache"), workers=1, progress=False)
    assert Manifest.load(out).count("train") == 6, summary  # the converter kept every one of them
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_loader_survives_the_smallest_and_most_elongated_images(
    extreme_converted: Path, backend: str
) -> None:
    """Train (MoCo v2's random crops, flips, jitter, blur) and eval (resize + centre crop) views of 8x8,
    8x256 and 256x8 images: finite, normalised views of the right shape from every backend."""
    if backend in ("ffcv", "dali"):
        pytest.importorskip("ffcv" if backend == "ffcv" else "nvidia.dali")
    cfg = DataConfig(root=str(extreme_converted), backend=backend, workers=1)
    for res in (16, 64):
        for split, spec, train in (("train", moco_v2(res), True), ("val", eval_spec(res), False)):
            loader = build_loader(cfg, spec, split, 3, "cpu", torch.float32, seed=1, train=train)
            batches = list(loader)
            assert len(batches) == 2, (split, res)
            for b in batches:
                assert len(b.views) == spec.num_outputs
                for v in b.views:
                    assert v.shape == (b.labels.shape[0], 3, res, res) and torch.isfinite(v).all()
                    assert v.abs().max() < 3.0  # normalised [0, 1] pixels
            getattr(loader, "close", lambda: None)()

"""DALILoader(pipelines=N), the hook the benchmarks time: N DALI pipelines side by side, each rendering
batch/N of every training batch from its own sub-shard of this rank's shard."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("nvidia.dali", reason="needs NVIDIA DALI: pip install 'fastvpd[dali]'")

from fastvpd.config import DataConfig  # noqa: E402
from fastvpd.data import build_loader, eval_spec, moco_v2, supervised  # noqa: E402
from fastvpd.data.manifest import Manifest  # noqa: E402

RES = 16
BS = 32
N = 500  # the digits' training split

pytestmark = pytest.mark.usefixtures("one_thread")


def _loader(root: Path, pipelines: int, split: str = "train", rank: int = 0, world: int = 1, **kw):  # noqa: ANN001, ANN202
    cfg = DataConfig(root=str(root), backend="dali", workers=2)
    spec = moco_v2(RES) if split == "train" else eval_spec(RES)
    return build_loader(
        cfg,
        spec,
        split,
        BS,
        "cpu",
        torch.float32,
        seed=5,
        rank=rank,
        world_size=world,
        train=split == "train",
        pipelines=pipelines,
        **kw,
    )


def _sub_shard(root: Path, index: torch.Tensor, shards: int) -> torch.Tensor:
    """sample index -> DALI shard: shard s holds the positions [s*N//S, (s+1)*N//S) of the samples in the
    order the tar files store them (the converter's fixed permutation), read back from the tars here."""
    keys = []
    for tar in Manifest.load(root).wds_shards("train")[0]:
        with tarfile.open(tar) as t:
            keys += [int(m.name.split(".", 1)[0]) for m in t.getmembers() if m.name.endswith(".jpg")]
    assert sorted(keys) == list(range(N))
    position = torch.empty(N, dtype=torch.int64)
    position[torch.tensor(keys)] = torch.arange(N)
    bounds = torch.tensor([s * N // shards for s in range(1, shards)])
    return torch.bucketize(position[index], bounds, right=True)


@pytest.mark.parametrize("world", [1, 2])
def test_each_pipeline_fills_its_slice_of_every_batch_from_its_sub_shard(
    digits_converted: Path, world: int
) -> None:
    """Rank r's pipelines p = 0, 1 read sub-shards 2r + p of 2*world (together: rank r's DALI shard), and
    pipeline p's samples are rows [p*B/2, (p+1)*B/2) of every batch; across ranks the epoch's samples are
    disjoint; the epoch's length is the smallest sub-shard's whole batches of B/2, the same on every rank."""
    seen = []
    for rank in range(world):
        loader = _loader(digits_converted, 2, rank=rank, world=world)
        loader.set_epoch(0)
        assert len(loader) == (N // (2 * world)) // (BS // 2)
        batches = list(loader)
        assert len(batches) == len(loader)
        for b in batches:
            assert b.views[0].shape[0] == BS and b.views[0].is_contiguous(memory_format=torch.channels_last)
            shard = _sub_shard(digits_converted, b.indices, 2 * world)
            assert torch.equal(shard[: BS // 2], torch.full((BS // 2,), 2 * rank))
            assert torch.equal(shard[BS // 2 :], torch.full((BS // 2,), 2 * rank + 1))
        seen.append(torch.cat([b.indices for b in batches]))
    every = torch.cat(seen)
    assert len(set(every.tolist())) == len(every)


def test_pipelines_are_deterministic_and_resume_exactly(digits_converted: Path) -> None:
    """Same seed, same batches; a resumed epoch (start_step) is the tail of the whole one; another epoch
    (another seed for every pipeline) is another order."""
    a, b = _loader(digits_converted, 2), _loader(digits_converted, 2)
    a.set_epoch(1)
    b.set_epoch(1, start_step=3)
    full, tail = list(a), list(b)
    assert len(tail) == len(full) - 3
    for x, y in zip(tail, full[3:]):
        assert torch.equal(x.indices, y.indices)
        assert all(torch.equal(u, v) for u, v in zip(x.views, y.views))
    a.set_epoch(2)
    assert not torch.equal(next(iter(a)).indices, full[0].indices)


def test_the_device_finishes_the_joined_batch(digits_converted: Path) -> None:
    """The pipelines hand over uint8 slices and the device finishes the whole batch with its own draws:
    normalised float views, both different."""
    b = next(iter(_loader(digits_converted, 2, aug_kernel="torch")))
    assert b.views[0].dtype == torch.float32 and b.views[0].shape == (BS, 3, RES, RES)
    assert not torch.equal(b.views[0], b.views[1])
    assert -2.5 < float(b.views[0].mean()) < 1.5


def test_eval_runs_one_pipeline_and_bad_counts_are_one_line(digits_converted: Path) -> None:
    """The eval loader keeps one pipeline (its padded last batch); a count that does not divide the batch,
    or below 1, is refused."""
    ev = _loader(digits_converted, 4, split="val")
    assert ev.pipelines == 1
    assert sum(b.indices.numel() for b in ev) == ev.num_samples
    with pytest.raises(ValueError, match=r"pipelines=3 must divide the batch size \(32\)"):
        _loader(digits_converted, 3)
    with pytest.raises(ValueError, match="pipelines must be >= 1"):
        _loader(digits_converted, 0)


@pytest.mark.parametrize("autoaugment", [False, True])
def test_gpu_graphs_define_without_a_gpu(
    digits_converted: Path, autoaugment: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GPU pipeline (mixed decode, GPU crops, CPU-drawn per-sample arguments) passes DALI's graph
    definition on a machine without a GPU (only `build` needs one), so a device-placement mistake shows
    here and not in a GPU session's few minutes."""
    from nvidia.dali import Pipeline

    monkeypatch.setattr(Pipeline, "build", Pipeline._build_graph)  # define only: no CUDA here
    cfg = DataConfig(root=str(digits_converted), backend="dali", workers=2)
    spec = supervised(RES, autoaugment=True) if autoaugment else moco_v2(RES)
    loader = build_loader(cfg, spec, "train", BS, "cpu", torch.float32, seed=5, pipelines=2)
    loader.device = torch.device("cuda", 0)  # what _build reads: mixed decode, GPU ops, device_id 0
    for part in range(2):
        pipe = loader._build(epoch=1, part=part)
        placed = [
            (str(op.spec).split("\n")[0], op.spec.OutputDevice(0)) for op in pipe._ops if op.spec.NumOutput()
        ]
        decoders = [dev for name, dev in placed if "decoders__" in name]
        assert decoders == ["gpu"]  # one mixed decode per sample: CPU bytes in, GPU pixels out
        assert {dev for name, dev in placed if "CropMirrorNormalize" in name} == {"gpu"}

"""benchmarks/ loader rows: each row is a table of settings whose hooks reach the loader it builds (in the
loaders section and inside fastvpd.pretrain end to end), the worker-round timing, and the images the rows
read: the benchmark never deletes a folder it did not make, and its report says what it ran on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks import dataset, e2e, loaders
from benchmarks.harness import Options

CPU = torch.device("cpu")


@pytest.mark.parametrize(("images_batches", "crosses"), [(3, True), (64, False)])
def test_loader_row_warms_every_worker_and_flags_epoch_restarts(
    digits_converted: Path, images_batches: int, crosses: bool
) -> None:
    """The torchvision row warms up to the end of the first round of worker batches and times whole
    rounds; a timing that cannot fit one round in the epoch (idle workers, a restart) says so."""
    batch = 500 // images_batches  # the digits' train split holds 500 images
    opts = Options(quick=True, res=16, batch=batch, loader_batches=3, loader_workers=2)
    opts.resolve(CPU)
    row = loaders.measure_one_loader("torchvision", digits_converted, opts, CPU)
    assert row["status"] == "ok" and row["samples_s"] > 0
    per_epoch = 500 // batch
    assert row["warmup_batches"] == 2  # the first batch + the rest of the 2 workers' first round
    assert ("note" in row) is crosses
    if crosses:
        assert f"epoch of {per_epoch} batches" in row["note"] and "--images" in row["note"]
    else:
        assert row["batches"] == 4  # 3 wanted, rounded up to whole rounds of 2


def test_loader_schedule_times_whole_worker_rounds() -> None:
    """16 workers, 24 batches an epoch, 8 wanted: timing the last 8 batches would time half a round while
    8 workers idle, so that epoch is flagged; the GPU default image count (two rounds + the first batch)
    gives a clean round of 16."""
    warm, timed, note = loaders.loader_schedule(24, 8, workers=16)
    assert (warm, timed) == (15, 8) and "whole rounds of 16 workers" in note
    opts = Options(loader_workers=16).resolve(torch.device("cuda"))
    assert opts.images == 256 * 33
    assert loaders.loader_schedule(opts.images // opts.batch, opts.loader_batches, 16) == (15, 16, "")
    assert loaders.loader_schedule(100, 20, 16) == (15, 32, "")  # rounded up to whole rounds
    assert loaders.loader_schedule(40, 40, 16) == (15, 16, "")  # fewer, but whole, rounds when short
    assert loaders.loader_schedule(64, 8) == (1, 8, "")  # thread pools: one warm-up batch
    assert loaders.loader_schedule(64, 8, warm_min=3) == (3, 8, "")  # graphed rows: two renders + capture


def test_e2e_window_times_whole_worker_rounds() -> None:
    """End to end, the torchvision run is timed from the end of its first round of worker batches over
    whole rounds; other loaders leave out up to 5 warm-up steps."""
    assert e2e.e2e_window(30) == (5, 29)
    assert e2e.e2e_window(6) == (2, 5)
    assert e2e.e2e_window(33, workers=16) == (15, 31)  # 2 * 16 + 1 steps: one whole timed round
    assert e2e.e2e_window(48, workers=16) == (15, 47)
    assert e2e.e2e_window(20, workers=16) == (5, 19)  # too short for a round: the plain window
    assert e2e.e2e_window(8, workers=2) == (3, 7)  # past the 2 warm-up steps, to the end of a round


def test_rows_are_settings_not_names() -> None:
    """Every row is found by its name but built from its fields; the user's settings are config keys,
    the experiments' are constructor hooks; no row sets a key the config does not have."""
    from dataclasses import fields

    from fastvpd.config import DataConfig

    keys = {f.name for f in fields(DataConfig)}
    for row in loaders.all_rows():
        assert loaders.find_row(row.name) is row and row.backend in loaders.BACKEND_MODULES
        assert {k for k, _ in row.settings} <= keys, row
        assert not ({k for k, _ in row.hooks} & keys), row  # a hook is never a user setting
    assert dict(loaders.find_row("dali_x4").hooks) == {"pipelines": 4}
    assert loaders.formats_for(("torchvision",)) == []
    assert loaders.formats_for(("cache", "cache_graphed_torch", "torchvision")) == ["cache"]


def test_a_rows_hooks_reach_its_loader(digits_converted: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """dali_x4 runs what it says: DALILoader(pipelines=4), each pipeline building its own part."""
    from fastvpd.data import dali as D

    built: list[tuple[int, int]] = []
    build = D.DALILoader._build

    def spy(self: D.DALILoader, epoch: int, part: int = 0) -> Any:
        built.append((self.pipelines, part))
        return build(self, epoch, part)

    monkeypatch.setattr(D.DALILoader, "_build", spy)
    opts = Options(quick=True, res=16, batch=32, loader_batches=2, loader_workers=2).resolve(CPU)
    result = loaders.measure_one_loader("dali_x4", digits_converted, opts, CPU)
    assert result["status"] == "ok" and result["samples_s"] > 0
    assert sorted(built) == [(4, p) for p in range(4)]


def test_end_to_end_rows_hand_their_hooks_to_the_train_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside fastvpd.pretrain the row's hooks reach the train loader only (the eval loaders are the
    user's), and the train loader is timed."""
    import fastvpd.data as data_mod

    calls: list[tuple[bool, dict[str, Any]]] = []

    def fake_build_loader(*a: Any, **kw: Any) -> list[int]:
        calls.append((kw.get("train", True), {k: v for k, v in kw.items() if k != "train"}))
        return [1, 2, 3]

    monkeypatch.setattr(data_mod, "build_loader", fake_build_loader)
    record: list[tuple[float, float]] = []
    with e2e._record_train_batches(record, loaders.find_row("dali_x4")):
        train = data_mod.build_loader("cfg", "spec", "train", 4, "cpu")
        data_mod.build_loader("cfg", "spec", "val", 4, "cpu", train=False)
        assert list(train) == [1, 2, 3]
    assert calls == [(True, {"pipelines": 4}), (False, {})] and len(record) == 3
    assert data_mod.build_loader is fake_build_loader  # restored


def _user_photos(src: Path) -> Path:
    """A user's own ImageFolder: 2 classes x 4 photos, and a file of theirs the benchmark must not touch."""
    rng = np.random.default_rng(0)
    for c in range(2):
        d = src / "train" / f"class{c}"
        d.mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(d / f"photo{i}.jpg")
    mine = src / "train" / "class0" / "holiday.jpg"
    Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(mine)
    return mine


def test_the_benchmark_never_deletes_a_folder_it_did_not_make(tmp_path: Path) -> None:
    """--data-dir DIR with the user's photos in DIR/src (no marker of the benchmark's): the loaders read
    them as they are, nothing is removed, and the report says it ran on them, not on a synthetic set."""
    mine = _user_photos(tmp_path / "src")
    opts = Options(res=16, batch=4, loader_batches=2, loader_workers=1, data_dir=str(tmp_path))
    opts.loader_backends, opts.e2e_backends = ("cache",), ("cache",)
    out = loaders.section_loaders(opts.resolve(CPU), CPU)
    assert mine.is_file() and len(list((tmp_path / "src").rglob("*.jpg"))) == 9
    assert dataset.created_by_benchmark(tmp_path / "src") is None  # still not the benchmark's
    assert out["rows"][0]["status"] == "ok"
    footnote = out["notes"][0]
    assert footnote.startswith("9 images of the train split of") and "not made by the benchmark" in footnote
    assert "synthetic" not in footnote


def test_only_an_unfinished_set_of_its_own_is_made_again(tmp_path: Path) -> None:
    """A folder carrying the benchmark's own creation marker, unfinished (a run killed while making it),
    is removed and made again; a finished one is kept; its footnote says synthetic, with the real count."""
    src = tmp_path / "src"
    src.mkdir()
    (src / dataset.CREATED_MARKER).write_text(json.dumps({"images": 20, "complete": False}))
    (src / "half-written.JPEG").write_bytes(b"\xff\xd8")
    opts = Options(images=20, loader_workers=1, data_dir=str(tmp_path))
    root = dataset.prepare_data(opts, ["cache"])
    assert not (src / "half-written.JPEG").exists() and len(list(src.rglob("*.JPEG"))) == 20
    assert dataset.created_by_benchmark(src) == {"images": 20, "complete": True}
    assert dataset.describe_data(root).startswith("20 synthetic ImageNet-like JPEGs")
    stamp = {p: p.stat().st_mtime_ns for p in src.rglob("*.JPEG")}
    dataset.make_source(src, Options(images=40, loader_workers=1))  # finished: kept as it is
    assert {p: p.stat().st_mtime_ns for p in src.rglob("*.JPEG")} == stamp


def test_against_baseline_divides_by_the_torchvision_row_only_when_it_ran() -> None:
    from benchmarks.harness import against_baseline

    rows = [
        {"name": "torchvision", "status": "ok", "samples_s": 50.0},
        {"name": "cache", "status": "ok", "samples_s": 400.0},
        {"name": "ffcv", "status": "skipped"},
    ]
    against_baseline(rows)
    assert rows[0]["speedup"] == 1.0 and rows[1]["speedup"] == 8.0 and "speedup" not in rows[2]
    lone = [{"name": "torchvision", "status": "failed"}, {"name": "cache", "status": "ok", "samples_s": 4.0}]
    against_baseline(lone)
    assert all("speedup" not in r for r in lone)

"""The embedded datasets: digits tree, synthetic ImageNet-like JPEGs, VIPriors subset selection."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_tools.make_digits import make_digits
from data_tools.make_synthetic import make_synthetic
from data_tools.vipriors_subset import main as vipriors_main
from data_tools.vipriors_subset import vipriors_subset
from fastvpd.config import UserError

ROOT = Path(__file__).resolve().parents[1]


def _ids(root: Path, split: str) -> dict[str, set[str]]:
    return {d.name: {f.stem for f in d.iterdir()} for d in sorted((root / split).iterdir())}


def test_digits_tree_shape_counts_disjoint(digits_src: Path) -> None:
    train, val, test = (_ids(digits_src, s) for s in ("train", "val", "test"))
    assert sorted(train) == sorted(val) == sorted(test) == [str(c) for c in range(10)]
    assert all(len(v) == 50 for v in train.values()) and all(len(v) == 50 for v in val.values())
    assert sum(len(v) for v in test.values()) == 1797 - 1000
    all_ids = [i for split in (train, val, test) for v in split.values() for i in v]
    assert len(all_ids) == len(set(all_ids)) == 1797  # disjoint, and every digit used once
    img = Image.open(next((digits_src / "train" / "3").iterdir()))
    assert img.size == (32, 32) and img.mode == "RGB"
    arr = np.asarray(img)
    assert arr.min() < 30 and arr.max() > 200  # real strokes, full 0..255 range


def test_digits_labels_are_real_and_deterministic(digits_src: Path, tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    target = load_digits().target
    for c in ("0", "7"):
        assert all(target[int(f.stem)] == int(c) for f in (digits_src / "val" / c).iterdir())
    make_digits(tmp_path / "s0", seed=0)
    make_digits(tmp_path / "s1", seed=1)
    assert _ids(tmp_path / "s0", "train") == _ids(digits_src, "train")
    assert _ids(tmp_path / "s1", "train") != _ids(digits_src, "train")


def test_synthetic_is_imagenet_like_and_deterministic(tmp_path: Path) -> None:
    r = make_synthetic(
        tmp_path / "a", classes=2, per_class=3, seed=5, splits=("train", "val"), workers=2, progress=False
    )
    assert r["train"] == r["val"] == 6
    files = sorted((tmp_path / "a").rglob("*.JPEG"))
    assert len(files) == 12
    assert sorted(p.name for p in (tmp_path / "a" / "train").iterdir()) == ["n00000000", "n00000001"]
    for f in files:
        with Image.open(f) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            assert 300 <= max(im.size) <= 500 and min(im.size) >= 250
        assert 15_000 < f.stat().st_size < 300_000
    make_synthetic(
        tmp_path / "b", classes=2, per_class=3, seed=5, splits=("train", "val"), workers=1, progress=False
    )
    digest = lambda root: [hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.JPEG"))]  # noqa: E731
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert len(set(digest(tmp_path / "a"))) == 12  # every image differs


def _fake_imagenet(root: Path, sizes: dict[str, int]) -> None:
    for c, n in sizes.items():
        (root / c).mkdir(parents=True)
        for i in range(n):
            (root / c / f"{c}_{i}.JPEG").write_bytes(f"{c}-{i}".encode())


def test_vipriors_subset_symlinks_disjoint_deterministic(tmp_path: Path) -> None:
    _fake_imagenet(tmp_path / "inet", {"n01": 7, "n02": 5, "n03": 9})
    counts = vipriors_subset(tmp_path / "inet", tmp_path / "a", per_class=2, seed=3)
    assert counts == {"train": 6, "val": 6}
    for c in ("n01", "n02", "n03"):
        tr = {p.name for p in (tmp_path / "a/train" / c).iterdir()}
        va = {p.name for p in (tmp_path / "a/val" / c).iterdir()}
        assert len(tr) == len(va) == 2 and not tr & va
        link = tmp_path / "a/train" / c / sorted(tr)[0]
        assert link.is_symlink() and link.read_bytes() == (tmp_path / "inet" / c / link.name).read_bytes()
    vipriors_subset(tmp_path / "inet", tmp_path / "b", per_class=2, seed=3, copy=True)
    listing = lambda r: sorted(p.relative_to(r).as_posix() for p in r.rglob("*.JPEG"))  # noqa: E731
    assert listing(tmp_path / "a") == listing(tmp_path / "b")
    assert not any(p.is_symlink() for p in (tmp_path / "b").rglob("*.JPEG"))
    vipriors_subset(tmp_path / "inet", tmp_path / "c", per_class=2, seed=4)
    assert listing(tmp_path / "a") != listing(tmp_path / "c")


def test_vipriors_subset_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fake_imagenet(tmp_path / "inet", {"n01": 7, "n02": 3})
    with pytest.raises(UserError, match=r"n02 \(3\)"):
        vipriors_subset(tmp_path / "inet", tmp_path / "o", per_class=2)
    with pytest.raises(SystemExit) as e:
        vipriors_main([str(tmp_path / "missing"), str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "missing" in err[0]


@pytest.mark.parametrize(
    "script", ["make_digits.py", "make_synthetic.py", "vipriors_subset.py", "convert.py"]
)
def test_scripts_have_help(script: str) -> None:
    r = subprocess.run(
        [sys.executable, str(ROOT / "data_tools" / script), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "usage:" in r.stdout and "--" in r.stdout

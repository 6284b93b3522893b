"""Reliability of the converter (fastvpd.convert): a full disk (a real small tmpfs where the machine
allows the mount, and simulated), a read-only output folder, classes emptied by bad files, images below
the minimum size, and stale split folders on re-conversion. The fuzz run is tests/test_convert_fuzz.py.
See RELIABILITY.md.

Tests run as root, where chmod 000 does not stop reads or writes: permission and read-only faults are
simulated with a patched `open`/`files.replace` (said in each test).
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from fastvpd.config import UserError
from fastvpd.convert import MIN_SIDE, convert, files, main
from fastvpd.data.manifest import Manifest

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--no-progress"]


# --------------------------------------------------------------------------------- full disk / read-only
def _tiny_tree(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(3):
                arr = rng.integers(0, 256, size=(24, 20 + i, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{i}.png")
    return root


def _snapshot(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _enospc_open(match: str) -> Any:
    real_open = builtins.open

    def fake(file: Any, mode: str = "r", *a: Any, **k: Any) -> Any:
        if ("w" in mode or "a" in mode) and match in os.fspath(file):
            raise OSError(errno.ENOSPC, "No space left on device", os.fspath(file))
        return real_open(file, mode, *a, **k)

    return fake


@pytest.mark.parametrize("where", ["dali-tar", "cache-reserve", "manifest", "replace-erofs"])
def test_disk_full_or_read_only_keeps_previous_output(
    where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    src, out = _tiny_tree(tmp_path / "src"), tmp_path / "out"
    args = [str(src), str(out), "--formats", "dali,cache", "--workers", "1", "--no-progress"]
    assert main(args) == 0
    before = _snapshot(out)
    capsys.readouterr()
    with monkeypatch.context() as mpc:
        if where == "dali-tar":  # ENOSPC while the first shard's temp file is opened
            mpc.setattr(builtins, "open", _enospc_open(".tar"))
        elif where == "cache-reserve":  # the cache's up-front reservation finds the disk too small

            def no_space(fd: int, offset: int, length: int) -> None:
                raise OSError(errno.ENOSPC, "No space left on device")

            mpc.setattr(os, "posix_fallocate", no_space)
        elif where == "manifest":  # ENOSPC when the manifest is about to be rewritten
            mpc.setattr(builtins, "open", _enospc_open("manifest.json"))
        else:  # the folder became read-only after the temp files were written (root ignores chmod)

            def ro(tmp: Path, final: Path) -> None:
                raise OSError(errno.EROFS, "Read-only file system", str(final))

            mpc.setattr(files, "replace", ro)
        with pytest.raises(SystemExit) as e:
            main(args + ["--force"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: could not write"), err
    assert ("No space left" in err[0]) != (where == "replace-erofs") and "intact" in err[0]
    assert "Traceback" not in err[0]
    after = _snapshot(out)
    manifest_before, manifest_after = before.pop("manifest.json"), after.pop("manifest.json")
    assert after == before  # byte-for-byte the previous outputs, no temp files left
    assert json.loads(manifest_after) == json.loads(manifest_before)  # (key order may differ)
    m = Manifest.load(out)
    for split in m.splits:
        m.verify(split, ["dali", "cache", "files"], mode="full")


def test_unwritable_output_folder_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A read-only OUT from the start (simulated: every write under OUT fails with EROFS)."""
    src, out = _tiny_tree(tmp_path / "src"), tmp_path / "out"

    real_open = builtins.open

    def fake(file: Any, mode: str = "r", *a: Any, **k: Any) -> Any:
        if ("w" in mode) and os.fspath(file).startswith(str(out)):
            raise OSError(errno.EROFS, "Read-only file system", os.fspath(file))
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr(builtins, "open", fake)
    with pytest.raises(SystemExit) as e:
        main([str(src), str(out), "--formats", "cache", "--workers", "1", "--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write to output folder" in err[0] and "Read-only" in err[0], err
    assert not (out / "manifest.json").exists()


def test_manifest_never_vouches_for_missing_files(tmp_path: Path) -> None:
    """After every run (complete or failed above), each recorded output exists with its recorded size."""
    src, out = _tiny_tree(tmp_path / "src"), tmp_path / "out"
    convert(src, out, formats=("dali", "cache"), workers=1, progress=False)
    convert(src, out, formats=("cache",), workers=1, cache_res=12, progress=False)  # options change
    data = json.loads((out / "manifest.json").read_text())
    for sp in data["splits"].values():
        for recs in sp["outputs"].values():
            for r in recs:
                assert (out / r["file"]).stat().st_size == r["bytes"]
    assert (
        set(data["format_options"]) == {"dali", "cache"}
        and data["format_options"]["cache"]["cache_res"] == 12
    )


# ------------------------------------------------------------------------------ a disk that really fills
def _big_tree(root: Path, n: int = 8, side: int = 240) -> Path:
    """`n` PNGs of side x side (173 KB of pixels each), small on disk (smooth)."""
    y, x = np.mgrid[0:side, 0:side].astype(np.float32)
    for i in range(n):
        d = root / ("a" if i % 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        arr = np.stack([127 + 100 * np.sin(0.05 * (c + 1) * x + 0.03 * y + i) for c in range(3)], -1)
        Image.fromarray(arr.astype(np.uint8)).save(d / f"{i}.png")
    return root


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (needs root and the right to mount: skipped elsewhere)."""
    mnt = tmp_path / "small_disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(ROOT / "data_tools" / "convert.py"), *args, "--workers", "1", "--no-progress"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_disk_full_on_a_real_tmpfs_is_one_line_and_keeps_previous_output(
    small_tmpfs: Path, tmp_path: Path
) -> None:
    """The cache of 8 images at full size (1.4 MB) does not fit beside the earlier small one: before the
    fix, the memory-mapped write died of SIGBUS (exit -7/135) and left pixels.npy.tmp behind."""
    src, out = _big_tree(tmp_path / "src"), small_tmpfs / "out"
    first = _run_cli(str(src), str(out), "--formats", "cache", "--cache-res", "32")
    assert first.returncode == 0, first.stderr
    before = _snapshot(out)
    r = _run_cli(str(src), str(out), "--formats", "cache", "--cache-res", "0")
    assert r.returncode == 2, (r.returncode, r.stderr[-500:])
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: could not write") and "No space left" in err[0], err
    assert "intact" in err[0]
    after = _snapshot(out)
    assert not [p for p in after if p.endswith(".tmp")]
    after.pop("manifest.json"), before.pop("manifest.json")
    assert after == before  # byte-for-byte the previous outputs
    Manifest.load(out).verify("train", ["cache", "files"], mode="full")


def test_disk_full_while_writing_pixels_is_a_write_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Where nothing can be reserved up front (no fallocate), a full disk surfaces as a failing write:
    simulated by a pixels.npy whose writes fail after 64 KiB (a memory-mapped write never saw it)."""
    src, out = _big_tree(tmp_path / "src", n=4), tmp_path / "out"
    real_open = builtins.open

    class Filling:
        def __init__(self, f: Any) -> None:
            self.f, self.n = f, 0

        def write(self, b: Any) -> int:
            self.n += memoryview(b).nbytes
            if self.n > 1 << 16:
                raise OSError(errno.ENOSPC, "No space left on device", self.f.name)
            return self.f.write(b)

        def __getattr__(self, k: str) -> Any:
            return getattr(self.f, k)

        def __enter__(self) -> Filling:
            return self

        def __exit__(self, *a: Any) -> None:
            self.f.close()

    def fake(file: Any, mode: str = "r", *a: Any, **k: Any) -> Any:
        f = real_open(file, mode, *a, **k)
        return Filling(f) if "w" in mode and "pixels.npy" in os.fspath(file) else f

    monkeypatch.delattr(os, "posix_fallocate", raising=False)
    monkeypatch.setattr(builtins, "open", fake)
    with pytest.raises(SystemExit) as e:
        main(
            [str(src), str(out), "--formats", "cache", "--cache-res", "0", "--workers", "1", "--no-progress"]
        )
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "could not write" in err[0] and "pixels.npy" in err[0], err
    assert not list(out.rglob("*.tmp")) and not (out / "manifest.json").exists()


# ----------------------------------------------------------------------------------- bad and odd sources
def test_class_left_empty_by_bad_files_is_an_error_unless_allowed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _tiny_tree(tmp_path / "src")
    for f in (src / "train" / "b").iterdir():
        f.write_bytes(b"not an image")
    with pytest.raises(SystemExit) as e:
        main([str(src), str(tmp_path / "o"), "--formats", "cache", "--workers", "1", "--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "class 'b' (train/b) has no readable images" in err[0], err
    assert "3 file(s)" in err[0] and "--allow-empty-classes" in err[0]
    assert not (tmp_path / "o" / "manifest.json").exists()
    s = convert(src, tmp_path / "o", formats=("cache",), workers=1, progress=False, allow_empty_classes=True)
    assert "kept with no images" in capsys.readouterr().out
    m = Manifest.load(tmp_path / "o")
    assert m.classes == ["a", "b"] and m.labels("train") == [0, 0, 0] and m.labels("val") == [0] * 3 + [1] * 3
    assert s["splits"] == {"train": 3, "val": 6}


def test_images_below_the_minimum_size_are_skipped_with_the_reason(tmp_path: Path) -> None:
    src = tmp_path / "src" / "c"
    src.mkdir(parents=True)
    sizes = {"1x1": (1, 1), "7x40": (7, 40), "8x8": (8, 8), "8x256": (8, 256), "300x8": (300, 8)}
    for name, (w, h) in sizes.items():
        Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(src / f"{name}.png")
    s = convert(tmp_path / "src", tmp_path / "o", formats=("cache",), workers=1, cache_res=0, progress=False)
    reasons = {Path(d["path"]).stem: d["reason"] for d in s["skipped"]}
    assert reasons == {
        "1x1": f"image too small (1x1; smallest side limit {MIN_SIDE} px)",
        "7x40": f"image too small (7x40; smallest side limit {MIN_SIDE} px)",
        "300x8": "image too elongated (300x8; aspect ratio limit 32:1)",
    }
    meta = np.load(tmp_path / "o" / "train" / "cache" / "meta.npz")
    assert sorted(zip(meta["widths"].tolist(), meta["heights"].tolist())) == [(8, 8), (8, 256)]
    pytest.importorskip("ffcv.writer")
    with pytest.raises(UserError, match=r"under 8 px at --max-res 128 .*8x256.*--max-res 288"):
        convert(tmp_path / "src", tmp_path / "o2", formats=("ffcv",), workers=1, max_res=128, progress=False)


def test_reconvert_removes_its_stale_split_folder_and_names_foreign_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, out = _tiny_tree(tmp_path / "src"), tmp_path / "out"
    shutil.copytree(src / "val", src / "test")
    convert(src, out, formats=("dali", "cache"), workers=1, progress=False)
    assert (out / "test" / "cache" / "pixels.npy").is_file()
    shutil.rmtree(src / "test")
    (out / "mine").mkdir()
    (out / "mine" / "notes.txt").write_text("the user's own file")
    capsys.readouterr()
    s = convert(src, out, formats=("dali", "cache"), workers=1, progress=False)
    text = capsys.readouterr().out
    assert not (out / "test").exists()  # the converter's own outputs of a split that is gone
    assert (out / "mine" / "notes.txt").read_text() == "the user's own file"  # never what it did not write
    assert f"removed {out / 'test'}: split 'test' of the previous conversion" in text
    assert f"{out / 'mine'} is not a split of this conversion" in text
    assert len(s["notes"]) == 2 and Manifest.load(out).splits == ["train", "val"]

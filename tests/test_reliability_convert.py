"""Reliability of data_tools/convert.py: a fuzzed source tree (a few hundred mutated images), a full disk
and a read-only output folder. See RELIABILITY.md.

"Good" is defined independently of the converter: the extension is an image extension and PIL can fully
load the file (truncated-image loading off, decompression-bomb warnings as errors, longest side within
convert.MAX_SIDE). Tests run as root, where chmod 000 does not stop reads or writes: permission and
read-only faults are simulated with a patched `open`/`os.replace` (said in each test).
"""

from __future__ import annotations

import collections
import errno
import io
import json
import multiprocessing as mp
import os
import struct
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

import data_tools.convert as conv
from data_tools.convert import convert, main
from fastvpd.data.manifest import Manifest

N_MUTANTS = 300
SEED = 1234
CLASSES = ("c0", "c1", "c2")


# ------------------------------------------------------------------------------------------- the mutants
def _base_images(rng: np.random.Generator) -> list[tuple[str, bytes]]:
    """Small smooth RGB images as JPEG and PNG bytes (32-64 px)."""
    out = []
    for i in range(8):
        w, h = (int(v) for v in rng.integers(32, 65, size=2))
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        f = rng.uniform(0.05, 0.3, size=3)
        arr = np.stack([127 + 100 * np.sin(f[c] * (x + (c + 1) * y) + i) for c in range(3)], -1)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        buf = io.BytesIO()
        fmt = "JPEG" if i % 2 == 0 else "PNG"
        img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        out.append((".jpg" if fmt == "JPEG" else ".png", buf.getvalue()))
    return out


def _png_claiming(w: int, h: int) -> bytes:
    """A valid-looking PNG header claiming w x h pixels with almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )


KINDS = ("intact", "truncate", "bitflip", "bitflip", "png_as_jpg", "txt_ext", "empty", "huge", "garbage")


def make_fuzz_tree(root: Path, n: int = N_MUTANTS, seed: int = SEED) -> dict[str, str]:
    """ImageFolder tree train/{c0,c1,c2} + val/{c0,c1,c2} of `n` mutated files plus symlink faults.

    Returns {relative path: mutation kind}. Files named *noperm* are readable bytes that the tests make
    unreadable with a patched `open`.
    """
    rng = np.random.default_rng(seed)
    bases = _base_images(rng)
    kinds: dict[str, str] = {}
    for split in ("train", "val"):
        for c in CLASSES:
            (root / split / c).mkdir(parents=True)
            ext, data = bases[len(kinds) % len(bases)]  # every class folder gets one intact image
            rel = f"{split}/{c}/base{ext}"
            (root / rel).write_bytes(data)
            kinds[rel] = "intact"
    for i in range(n):
        split = "train" if i % 5 else "val"
        c = CLASSES[int(rng.integers(len(CLASSES)))]
        ext, data = bases[int(rng.integers(len(bases)))]
        kind = KINDS[int(rng.integers(len(KINDS)))]
        if kind == "truncate":
            data = data[: int(rng.integers(1, len(data)))]
        elif kind == "bitflip":
            buf = bytearray(data)
            for pos in rng.integers(0, len(buf), size=int(rng.integers(1, 9))):
                buf[int(pos)] ^= 1 << int(rng.integers(8))
            data = bytes(buf)
        elif kind == "png_as_jpg":
            ext, data = ".jpg", next(d for e, d in bases if e == ".png")  # PNG bytes behind a .jpg name
        elif kind == "txt_ext":
            ext = ".txt"
        elif kind == "empty":
            data = b""
        elif kind == "huge":
            ext, data = ".png", _png_claiming(*((40000, 16) if rng.random() < 0.5 else (20000, 20000)))
        elif kind == "garbage":
            data = rng.integers(0, 256, size=int(rng.integers(1, 2000)), dtype=np.uint8).tobytes()
        rel = f"{split}/{c}/m{i:04d}_{kind}{ext}"
        (root / rel).write_bytes(data)
        kinds[rel] = kind
    d = root / "train" / "c1"
    for j in range(3):
        os.symlink(d / f"loop{j}b.jpg", d / f"loop{j}a.jpg")
        os.symlink(d / f"loop{j}a.jpg", d / f"loop{j}b.jpg")
        kinds[f"train/c1/loop{j}a.jpg"] = kinds[f"train/c1/loop{j}b.jpg"] = "symlink_loop"
        os.symlink(d / f"nowhere{j}.jpg", d / f"dangling{j}.jpg")
        kinds[f"train/c1/dangling{j}.jpg"] = "dangling"
    os.symlink("..", root / "train" / "c2" / "parent_loop")  # a folder link to its own parent
    kinds["train/c2/parent_loop"] = "dir_loop"
    for j, c in enumerate(CLASSES):
        ext, data = bases[j]
        rel = f"train/{c}/noperm{j}{ext}"
        (root / rel).write_bytes(data)
        kinds[rel] = "noperm"
    return kinds


def pil_good(path: Path) -> bool:
    """The independent definition of a good file: image extension and PIL fully loads it."""
    if path.suffix.lower() not in conv.IMG_EXTS or "noperm" in path.name:
        return False
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if max(im.size) > conv.MAX_SIDE:
                    return False
                im.load()
                ImageOps.exif_transpose(im).convert("RGB")
        return True
    except Exception:  # noqa: BLE001 - any failure to load makes the file bad
        return False


EXPECTED_WORD = {  # kinds whose reason is fully determined
    "empty": "empty",
    "txt_ext": "unsupported extension",
    "symlink_loop": "symlink loop",
    "dir_loop": "symlink loop",
    "dangling": "broken symlink",
    "noperm": "permission denied",
}


def _deny_noperm(real_open: Any) -> Any:
    """`open` that raises PermissionError for *noperm* files (root ignores chmod 000)."""

    def fake(file: Any, *a: Any, **k: Any) -> Any:
        if isinstance(file, str | os.PathLike) and "noperm" in os.fspath(file):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(file))
        return real_open(file, *a, **k)

    return fake


@pytest.fixture(scope="module")
def fuzz_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("fuzz_src")
    return root, make_fuzz_tree(root)


def _workers() -> int:
    # the patched open reaches pool workers only when they are forked
    return 2 if mp.get_start_method() == "fork" else 1


def test_fuzzed_tree_converts_good_files_and_lists_bad_once(
    fuzz_tree: tuple[Path, dict[str, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, kinds = fuzz_tree
    good = {rel for rel in kinds if pil_good(root / rel)}
    bad = set(kinds) - good
    assert len(kinds) >= N_MUTANTS and len(good) > 50 and len(bad) > 100  # the fuzz bites both ways
    monkeypatch.setattr(conv, "open", _deny_noperm(open), raising=False)  # module-level shadow of open()
    out = tmp_path / "out"
    s = convert(root, out, formats=("dali", "cache"), workers=_workers(), cache_res=0, progress=False)

    listed = collections.Counter(d["path"] for d in s["skipped"])
    assert all(v == 1 for v in listed.values()), [k for k, v in listed.items() if v > 1]  # listed once
    assert set(listed) == bad, (sorted(set(listed) - bad)[:5], sorted(bad - set(listed))[:5])
    reasons = {d["path"]: d["reason"] for d in s["skipped"]}
    assert all(r.strip() for r in reasons.values())
    for rel, r in reasons.items():
        if kinds[rel] in EXPECTED_WORD:
            assert EXPECTED_WORD[kinds[rel]] in r, (rel, r)
        if kinds[rel] == "huge":
            assert "too large" in r or "decompression bomb" in r, (rel, r)

    m = Manifest.load(out)
    for split in ("train", "val"):
        want = sorted(rel for rel in good if rel.startswith(split + "/"))
        got = [x["path"] for x in m.sources(split)]
        assert got == want and m.count(split) == len(want) == s["splits"][split]  # every good file, in order
        m.verify(split, ["dali", "cache", "files"], mode="full")
        tars, _ = m.wds_shards(split)
        import tarfile

        with tarfile.open(tars[0]) as tar:
            assert len(tar.getnames()) == 2 * len(want)
        meta = np.load(m.path(split, "cache") / "meta.npz")
        pix = np.load(m.path(split, "cache") / "pixels.npy", mmap_mode="r")
        for i, rel in enumerate(want):  # cache pixels = PIL's full decode of the source
            h, w, o = int(meta["heights"][i]), int(meta["widths"][i]), int(meta["offsets"][i])
            ref = np.asarray(ImageOps.exif_transpose(Image.open(root / rel)).convert("RGB"))
            np.testing.assert_array_equal(np.asarray(pix[o : o + h * w]).reshape(h, w, 3), ref, err_msg=rel)
    assert sorted(d["path"] for d in m.skipped) == sorted(bad)


def test_fuzzed_tree_strict_exits_nonzero_naming_every_bad_file(
    fuzz_tree: tuple[Path, dict[str, str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root, kinds = fuzz_tree
    bad = {rel for rel in kinds if not pil_good(root / rel)}
    monkeypatch.setattr(conv, "open", _deny_noperm(open), raising=False)
    out = tmp_path / "o"
    args = [str(root), str(out), "--formats", "cache", "--strict", "--workers", str(_workers())]
    rc = main(args + ["--no-progress"])
    assert rc == 1
    err = capsys.readouterr().err.splitlines()
    named = [ln.split(": ", 2)[1] for ln in err if ln.startswith("skipped: ")]
    assert sorted(named) == sorted(bad)  # every bad file named, once
    assert err[-1].startswith("error: --strict") and str(len(bad)) in err[-1]
    assert not (out / "manifest.json").exists()


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


def _enospc_open(real_open: Any, match: str) -> Any:
    def fake(file: Any, mode: str = "r", *a: Any, **k: Any) -> Any:
        if ("w" in mode or "a" in mode) and match in os.fspath(file):
            raise OSError(errno.ENOSPC, "No space left on device", os.fspath(file))
        return real_open(file, mode, *a, **k)

    return fake


@pytest.mark.parametrize("where", ["dali-tar", "cache-memmap", "manifest", "replace-erofs"])
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
            mpc.setattr(conv, "open", _enospc_open(open, ".tar"), raising=False)
        elif where == "cache-memmap":  # ENOSPC while numpy creates pixels.npy's temp file

            def no_space(*a: Any, **k: Any) -> Any:
                raise OSError(errno.ENOSPC, "No space left on device", str(a[0]))

            mpc.setattr(np.lib.format, "open_memmap", no_space)
        elif where == "manifest":  # ENOSPC when the manifest is about to be rewritten
            mpc.setattr(conv, "open", _enospc_open(open, "manifest.json"), raising=False)
        else:  # the folder became read-only after the temp files were written (root ignores chmod)

            def ro(tmp: Path, final: Path) -> None:
                raise OSError(errno.EROFS, "Read-only file system", str(final))

            mpc.setattr(conv, "_replace", ro)
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

    def fake(file: Any, mode: str = "r", *a: Any, **k: Any) -> Any:
        if ("w" in mode) and os.fspath(file).startswith(str(out)):
            raise OSError(errno.EROFS, "Read-only file system", os.fspath(file))
        return open(file, mode, *a, **k)

    monkeypatch.setattr(conv, "open", fake, raising=False)
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

"""Converter fuzz run: a few hundred mutated JPEG/PNG files (truncations, flipped bits, wrong extensions,
empty files, tiny and elongated images, bombs, symlink faults) converted into every format.

Nothing crashes, every bad file is reported once with a reason, and every good file is kept, in order,
in every format: counted per split and per format (ffcv .beton, dali tar + index, cache, files.txt).

"Good" is defined independently of the converter: an image extension, PIL fully loads it (truncated-image
loading off, decompression-bomb warnings as errors) and its oriented size is within the documented limits
(longest side <= MAX_SIDE, smallest side >= MIN_SIDE, aspect ratio <= MAX_ASPECT). Tests run as root,
where chmod 000 does not stop reads: unreadable files are simulated with a patched `open`.
"""

from __future__ import annotations

import builtins
import collections
import errno
import io
import multiprocessing as mp
import os
import struct
import tarfile
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from fastvpd.convert import IMG_EXTS, MAX_ASPECT, MAX_SIDE, MIN_SIDE, convert, main
from fastvpd.data.manifest import Manifest

N_MUTANTS = 300
SEED = 1234
CLASSES = ("c0", "c1", "c2")


def _base_images(rng: np.random.Generator) -> list[tuple[str, bytes]]:
    """Small smooth RGB images as JPEG and PNG bytes (32-64 px)."""
    out = []
    for i in range(8):
        w, h = (int(v) for v in rng.integers(32, 65, size=2))
        out.append(_encode(_smooth(w, h, i, rng), "JPEG" if i % 2 == 0 else "PNG"))
    return out


def _smooth(w: int, h: int, i: int, rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    f = rng.uniform(0.05, 0.3, size=3)
    arr = np.stack([127 + 100 * np.sin(f[c] * (x + (c + 1) * y) + i) for c in range(3)], -1)
    return np.clip(arr, 0, 255).astype(np.uint8)


def _encode(arr: np.ndarray, fmt: str) -> tuple[str, bytes]:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return (".jpg" if fmt == "JPEG" else ".png"), buf.getvalue()


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


KINDS = (
    "intact", "truncate", "bitflip", "bitflip", "png_as_jpg", "jpg_as_png", "txt_ext", "empty", "huge",
    "garbage", "tiny", "extreme",
)  # fmt: skip
# sizes (w, h) around the limits: kept at MIN_SIDE and at MAX_ASPECT, skipped just beyond
EXTREMES = [(MIN_SIDE, MIN_SIDE), (MIN_SIDE, MIN_SIDE * MAX_ASPECT), (MIN_SIDE * MAX_ASPECT, MIN_SIDE),
            (MIN_SIDE, MIN_SIDE * MAX_ASPECT + 1), (9, 9 * MAX_ASPECT + 1), (1, 1)]  # fmt: skip


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
        elif kind == "jpg_as_png":
            ext, data = ".png", next(d for e, d in bases if e == ".jpg")
        elif kind == "txt_ext":
            ext = ".txt"
        elif kind == "empty":
            data = b""
        elif kind == "huge":
            ext, data = ".png", _png_claiming(*((40000, 16) if rng.random() < 0.5 else (20000, 20000)))
        elif kind == "garbage":
            data = rng.integers(0, 256, size=int(rng.integers(1, 2000)), dtype=np.uint8).tobytes()
        elif kind == "tiny":
            w, h = (int(v) for v in rng.integers(1, MIN_SIDE + 2, size=2))
            ext, data = _encode(_smooth(w, h, i, rng), "PNG" if rng.random() < 0.5 else "JPEG")
        elif kind == "extreme":
            w, h = EXTREMES[int(rng.integers(len(EXTREMES)))]
            ext, data = _encode(_smooth(w, h, i, rng), "PNG" if rng.random() < 0.5 else "JPEG")
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
    """The independent definition of a good file (see the module docstring)."""
    if path.suffix.lower() not in IMG_EXTS or "noperm" in path.name:
        return False
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if max(im.size) > MAX_SIDE:
                    return False
                im.load()
                w, h = ImageOps.exif_transpose(im).convert("RGB").size
        return min(w, h) >= MIN_SIDE and max(w, h) <= MAX_ASPECT * min(w, h)
    except Exception:  # noqa: BLE001 - any failure to load makes the file bad
        return False


EXPECTED_WORD = {  # kinds whose reason is fully determined
    "empty": "empty",
    "txt_ext": "unsupported extension",
    "symlink_loop": "symlink loop",
    "dir_loop": "symlink loop",
    "dangling": "broken symlink",
    "noperm": "permission denied",
    "tiny": "too small",
}


def deny_noperm(monkeypatch: pytest.MonkeyPatch) -> None:
    """`open` raises PermissionError for *noperm* files (root ignores chmod 000)."""
    real_open = builtins.open

    def fake(file: Any, *a: Any, **k: Any) -> Any:
        if isinstance(file, str | os.PathLike) and "noperm" in os.fspath(file):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", fake)


@pytest.fixture(scope="module")
def fuzz_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("fuzz_src")
    return root, make_fuzz_tree(root)


def _workers() -> int:
    # the patched open reaches pool workers only when they are forked
    return 2 if mp.get_start_method() == "fork" else 1


def _formats() -> tuple[str, ...]:
    from fastvpd.extras import probe

    return ("ffcv", "dali", "cache") if probe("ffcv.writer") else ("dali", "cache")


def _ffcv_count_labels(beton: Path) -> tuple[int, list[int], list[int]]:
    from ffcv.reader import Reader

    r = Reader(str(beton))
    md = {name: r.metadata[f"f{i}"] for i, name in enumerate(r.field_names)}
    return int(r.num_samples), md["label"].tolist(), md["index"].tolist()


def test_fuzzed_tree_keeps_every_good_file_in_every_format_and_lists_bad_once(
    fuzz_tree: tuple[Path, dict[str, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, kinds = fuzz_tree
    good = {rel for rel in kinds if pil_good(root / rel)}
    bad = set(kinds) - good
    assert len(kinds) >= N_MUTANTS and len(good) > 50 and len(bad) > 100  # the fuzz bites both ways
    assert {kinds[r] for r in good} >= {"intact", "extreme", "jpg_as_png", "png_as_jpg"}  # edge sizes kept
    assert {kinds[r] for r in bad} >= {"extreme", "tiny", "truncate", "empty", "huge"}
    deny_noperm(monkeypatch)
    out = tmp_path / "out"
    formats = _formats()
    s = convert(root, out, formats=formats, workers=_workers(), cache_res=0, progress=False)

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
        if kinds[rel] == "extreme":
            assert "too small" in r or "too elongated" in r, (rel, r)

    m = Manifest.load(out)
    assert sorted(d["path"] for d in m.skipped) == sorted(bad)
    for split in ("train", "val"):
        want = sorted(rel for rel in good if rel.startswith(split + "/"))
        labels = [CLASSES.index(rel.split("/")[1]) for rel in want]
        got = [x["path"] for x in m.sources(split)]
        assert got == want and m.count(split) == len(want) == s["splits"][split]  # every good file, in order
        m.verify(split, [*formats, "files"], mode="full")
        counts = {}
        tars, idxs = m.wds_shards(split)
        with tarfile.open(tars[0]) as tar:
            counts["dali"] = len(tar.getnames()) // 2
        assert idxs[0].read_text().splitlines()[0] == f"v1.2 {len(want)}"
        meta = np.load(m.path(split, "cache") / "meta.npz")
        pix = np.load(m.path(split, "cache") / "pixels.npy", mmap_mode="r")
        counts["cache"] = len(meta["offsets"])
        assert meta["labels"].tolist() == labels
        assert pix.shape[0] == int((meta["heights"].astype(np.int64) * meta["widths"]).sum())
        counts["files"] = len(m.path(split, "files").read_text().splitlines())
        if "ffcv" in formats:
            n, ffcv_labels, index = _ffcv_count_labels(m.path(split, "ffcv"))
            counts["ffcv"] = n
            assert ffcv_labels == labels and index == list(range(n))
        assert counts == dict.fromkeys(counts, len(want)) and len(counts) == len(formats) + 1, counts
        for i, rel in enumerate(want):  # cache pixels = PIL's full decode of the source
            h, w, o = int(meta["heights"][i]), int(meta["widths"][i]), int(meta["offsets"][i])
            ref = np.asarray(ImageOps.exif_transpose(Image.open(root / rel)).convert("RGB"))
            np.testing.assert_array_equal(np.asarray(pix[o : o + h * w]).reshape(h, w, 3), ref, err_msg=rel)


def test_fuzzed_tree_strict_exits_nonzero_naming_every_bad_file(
    fuzz_tree: tuple[Path, dict[str, str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root, kinds = fuzz_tree
    bad = {rel for rel in kinds if not pil_good(root / rel)}
    deny_noperm(monkeypatch)
    out = tmp_path / "o"
    args = [str(root), str(out), "--formats", "cache", "--strict", "--workers", str(_workers())]
    rc = main(args + ["--no-progress"])
    assert rc == 1
    err = capsys.readouterr().err.splitlines()
    named = [ln.split(": ", 2)[1] for ln in err if ln.startswith("skipped: ")]
    assert sorted(named) == sorted(bad)  # every bad file named, once
    assert err[-1].startswith("error: --strict") and str(len(bad)) in err[-1]
    assert not (out / "manifest.json").exists()

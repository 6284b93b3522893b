"""fastvpd.convert (data_tools/convert.py) and fastvpd.data.manifest: round trips through every format,
bad inputs, unlabelled folders, re-runs, interrupted writes and manifest verification."""

from __future__ import annotations

import io
import json
import os
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fastvpd.convert as conv
from fastvpd.config import UserError
from fastvpd.convert import cache as cache_writer
from fastvpd.convert import convert, files, main, wds
from fastvpd.convert import ffcv as ffcv_writer
from fastvpd.data.manifest import Manifest

JPEG_TOL = 6.0  # mean absolute difference (0..255) allowed after one JPEG re-encode at quality 90


def _src_rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.uint8)


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def _smooth(w: int, h: int, seed: int) -> np.ndarray:
    """A smooth colour image (JPEG-friendly, so tolerances stay meaningful)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    c = rng.uniform(0.02, 0.2, size=(3, 2))
    ph = rng.uniform(0, 6.28, size=3)
    chans = [127 + 100 * np.sin(c[i, 0] * x + c[i, 1] * y + ph[i]) for i in range(3)]
    return np.clip(np.stack(chans, -1), 0, 255).astype(np.uint8)


def _tiny_tree(root: Path, classes: int = 2, per_class: int = 3) -> Path:
    for split in ("train", "val"):
        for c in range(classes):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(_smooth(40 + 4 * i, 30 + 2 * c, seed=100 * c + i)).save(
                    d / f"{i}.jpg", quality=92
                )
    return root


def _read_manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


# ------------------------------------------------------------------------------------------ the digits set
def test_manifest_and_files_txt(digits_src: Path, digits_converted: Path) -> None:
    m = Manifest.load(digits_converted)
    assert m.classes == [str(c) for c in range(10)] and m.num_classes == 10
    assert m.splits == ["train", "val", "test"]
    assert (m.count("train"), m.count("val"), m.count("test")) == (500, 500, 797)
    assert m.skipped == [] and m.src == digits_src.resolve()
    src = m.sources("val")
    assert [s["path"] for s in src] == sorted(s["path"] for s in src)  # sorted by (class, relative path)
    assert all(s["path"].split("/")[1] == str(s["label"]) for s in src)
    lines = m.path("val", "files").read_text().splitlines()
    assert lines == [f"{s['path']} {s['label']}" for s in src]
    for split in m.splits:
        m.verify(split, ["ffcv", "dali", "cache", "files"], mode="full")
    assert m.path("train", "ffcv") == digits_converted / "train" / "train.beton"


def test_cache_round_trip(digits_src: Path, digits_converted: Path) -> None:
    m = Manifest.load(digits_converted)
    meta = np.load(m.path("val", "cache") / "meta.npz")
    pixels = np.load(m.path("val", "cache") / "pixels.npy", mmap_mode="r")
    assert pixels.dtype == np.uint8 and pixels.shape == (500 * 32 * 32, 3)
    assert meta["offsets"].dtype == np.int64 and meta["heights"].dtype == np.int32
    assert meta["widths"].dtype == np.int32 and meta["labels"].dtype == np.int64
    assert meta["labels"].tolist() == m.labels("val")
    for i, s in enumerate(m.sources("val")):
        h, w, o = int(meta["heights"][i]), int(meta["widths"][i]), int(meta["offsets"][i])
        img = np.asarray(pixels[o : o + h * w]).reshape(h, w, 3)
        np.testing.assert_array_equal(img, _src_rgb(digits_src / s["path"]))  # PNG source, native size: exact


def test_wds_round_trip_and_index(digits_src: Path, digits_converted: Path) -> None:
    m = Manifest.load(digits_converted)
    tars, idxs = m.wds_shards("val")
    assert [t.name for t in tars] == ["val-00000.tar"] and all(i.is_file() for i in idxs)
    src = m.sources("val")
    with tarfile.open(tars[0]) as tar:
        members = tar.getmembers()
        names = [x.name for x in members]
        keys = names[::2]  # <key>.jpg then <key>.cls, keys in a shuffled order covering every sample once
        assert names[1::2] == [k.replace(".jpg", ".cls") for k in keys]
        assert sorted(keys) == [f"{i:08d}.jpg" for i in range(500)] and keys != sorted(keys)
        by_name = {x.name: x for x in members}
        lines = idxs[0].read_text().splitlines()
        assert lines[0] == "v1.2 500"
        for key, line in zip(keys, lines[1:]):  # the index lists the members in tar order
            f = line.split()
            stem = key.split(".")[0]
            assert f[0] == "jpg" and f[3] == f"{stem}.jpg" and f[4] == "cls" and f[7] == f"{stem}.cls"
            for ext, off, size, name in (f[0:4], f[4:8]):
                assert by_name[name].offset_data == int(off) and by_name[name].size == int(size), ext
        for i in range(0, 500, 7):
            jpg = tar.extractfile(f"{i:08d}.jpg").read()
            assert tar.extractfile(f"{i:08d}.cls").read() == str(src[i]["label"]).encode()
            img = np.asarray(Image.open(io.BytesIO(jpg)))
            assert _mad(img, _src_rgb(digits_src / src[i]["path"])) < JPEG_TOL


def test_dali_reads_the_shards(digits_src: Path, digits_converted: Path) -> None:
    from nvidia.dali import fn, pipeline_def, types

    m = Manifest.load(digits_converted)
    tars, idxs = m.wds_shards("val")

    @pipeline_def(batch_size=100, num_threads=2, device_id=None)
    def pipe():  # type: ignore[no-untyped-def]
        jpg, cls = fn.readers.webdataset(
            paths=[str(t) for t in tars],
            index_paths=[str(i) for i in idxs],
            ext=["jpg", "cls"],
            random_shuffle=False,
            name="reader",
        )
        return fn.decoders.image(jpg, device="cpu", output_type=types.RGB), cls

    p = pipe()
    p.build()
    assert p.epoch_size("reader") == 500
    src = m.sources("val")
    seen = set()
    for _ in range(5):
        imgs, cls = p.run()
        for j in range(len(imgs)):
            i = int(cls[j].source_info().rsplit(":", 1)[-1].split(".", 1)[0])  # the sample index is the key
            seen.add(i)
            assert int(bytes(np.array(cls[j])).decode()) == src[i]["label"]
            assert _mad(np.array(imgs[j]), _src_rgb(digits_src / src[i]["path"])) < JPEG_TOL
    assert seen == set(range(500))


def _ffcv_images(beton: Path) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, list[str]]:
    """Every image/label/index of a .beton, read through FFCV's own Reader and allocation table."""
    from ffcv.reader import Reader

    r = Reader(str(beton))
    raw = np.fromfile(beton, dtype=np.uint8)
    where = {int(p): int(s) for p, s in zip(r.alloc_table["ptr"], r.alloc_table["size"])}
    md = {name: r.metadata[f"f{i}"] for i, name in enumerate(r.field_names)}  # stored as f0, f1, ...
    imgs = []
    for rec in md["image"]:
        ptr, h, w = int(rec["data_ptr"]), int(rec["height"]), int(rec["width"])
        data = raw[ptr : ptr + where[ptr]]
        if rec["mode"] == 0:  # jpg
            imgs.append(np.asarray(Image.open(io.BytesIO(data.tobytes())).convert("RGB")))
        else:
            imgs.append(data[: h * w * 3].reshape(h, w, 3))
        assert imgs[-1].shape == (h, w, 3)
    return imgs, md["label"], md["index"], r.field_names


def test_ffcv_round_trip(digits_src: Path, digits_converted: Path) -> None:
    m = Manifest.load(digits_converted)
    imgs, labels, index, names = _ffcv_images(m.path("val", "ffcv"))
    assert names == ["image", "label", "index"]
    assert labels.tolist() == m.labels("val") and index.tolist() == list(range(500))
    for i, s in enumerate(m.sources("val")):
        assert _mad(imgs[i], _src_rgb(digits_src / s["path"])) < JPEG_TOL


# --------------------------------------------------------------------------------------- planted bad files
def _png_header_only(path: Path, w: int, h: int) -> None:
    """A PNG whose header claims w x h pixels (a decompression bomb's signature) with almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def bad_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bad_src")
    a, b = root / "a", root / "b"
    a.mkdir()
    b.mkdir()
    Image.fromarray(_smooth(48, 40, 1)).save(a / "good.jpg", quality=92)
    Image.fromarray(_smooth(48, 40, 2)).convert("CMYK").save(a / "cmyk.jpg", quality=95)
    Image.fromarray(_smooth(48, 40, 3)).convert("L").save(a / "gray.jpg", quality=95)
    Image.fromarray(_smooth(48, 40, 4)).save(a / "progressive.jpg", quality=92, progressive=True)
    marked = np.full((24, 40, 3), 128, np.uint8)
    marked[:6, :6] = (255, 0, 0)  # red block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(marked).save(a / "exif.jpg", quality=95, exif=exif)
    Image.fromarray(np.arange(30 * 20, dtype=np.uint16).reshape(20, 30) * 100).save(b / "p16.png")
    Image.fromarray(_smooth(30, 20, 5)).convert("P", palette=Image.ADAPTIVE, colors=16).save(
        b / "palette.png"
    )
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., 0], rgba[:, :15, 3] = 200, 255  # left half opaque red-ish, right half fully transparent
    Image.fromarray(rgba, "RGBA").save(b / "rgba.png")
    full = (a / "good.jpg").read_bytes()
    (b / "trunc.jpg").write_bytes(full[: len(full) // 2])
    (b / "empty.jpg").write_bytes(b"")
    (b / "text.jpg").write_text("this is not an image\n")
    _png_header_only(b / "bomb.png", 20000, 20000)
    os.symlink(b / "nowhere.jpg", b / "dangling.jpg")
    os.symlink(b / "loop2.jpg", b / "loop1.jpg")
    os.symlink(b / "loop1.jpg", b / "loop2.jpg")
    return root


EXPECTED_BAD = {
    "b/trunc.jpg": "truncated",
    "b/empty.jpg": "empty",
    "b/text.jpg": "not an image",
    "b/bomb.png": "decompression bomb",
    "b/dangling.jpg": "broken symlink",
    "b/loop1.jpg": "symlink loop",
    "b/loop2.jpg": "symlink loop",
}


def test_bad_files_skipped_good_ones_correct(bad_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    s = convert(bad_tree, out, formats=("dali", "cache"), workers=2, cache_res=0, progress=False)
    reasons = {d["path"]: d["reason"] for d in s["skipped"]}
    assert set(reasons) == set(EXPECTED_BAD), reasons
    for k, word in EXPECTED_BAD.items():
        assert word in reasons[k], (k, reasons[k])
    m = Manifest.load(out)
    assert m.splits == ["train"]  # class folders directly under SRC: one split, "train"
    assert {d["path"] for d in m.skipped} == set(reasons)
    names = [Path(x["path"]).name for x in m.sources("train")]
    assert names == [
        "cmyk.jpg",
        "exif.jpg",
        "good.jpg",
        "gray.jpg",
        "progressive.jpg",
        "p16.png",
        "palette.png",
        "rgba.png",
    ]
    meta = np.load(m.path("train", "cache") / "meta.npz")
    pix = np.load(m.path("train", "cache") / "pixels.npy")
    got = {}
    for i, n in enumerate(names):
        h, w, o = int(meta["heights"][i]), int(meta["widths"][i]), int(meta["offsets"][i])
        got[n] = pix[o : o + h * w].reshape(h, w, 3)
    src = bad_tree / "a"
    np.testing.assert_array_equal(got["good.jpg"], _src_rgb(src / "good.jpg"))
    assert _mad(got["cmyk.jpg"], np.asarray(Image.open(src / "cmyk.jpg").convert("RGB"))) < 1.0
    g = got["gray.jpg"]
    assert (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all()
    e = got["exif.jpg"]
    assert e.shape == (40, 24, 3)  # stored 40 wide x 24 high, displayed rotated 90 degrees clockwise
    assert e[:5, -5:, 0].mean() > 200 and e[:5, -5:, 1].mean() < 60  # red block moved to the top-right
    expected16 = np.round(np.arange(600).reshape(20, 30) * 100 * 255 / 65535).astype(np.uint8)
    np.testing.assert_array_equal(got["p16.png"][..., 0], expected16)
    np.testing.assert_array_equal(
        got["palette.png"], np.asarray(Image.open(bad_tree / "b" / "palette.png").convert("RGB"))
    )
    r = got["rgba.png"]
    assert (r[:, 15:] == 255).all() and (r[:, :15] == (200, 0, 0)).all()  # transparent -> white
    tars, _ = m.wds_shards("train")
    with tarfile.open(tars[0]) as tar:
        jpgs = [tar.extractfile(f"{i:08d}.jpg").read() for i in range(len(names))]
    assert jpgs[names.index("good.jpg")] == (src / "good.jpg").read_bytes()  # baseline RGB JPEG: copied
    for n in ("cmyk.jpg", "gray.jpg", "exif.jpg", "p16.png", "rgba.png"):
        im = Image.open(io.BytesIO(jpgs[names.index(n)]))
        assert im.format == "JPEG" and im.mode == "RGB" and im.size == got[n].shape[1::-1]
        assert _mad(np.asarray(im), got[n]) < JPEG_TOL, n


def test_strict_exits_nonzero_naming_files(
    bad_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(
        [
            str(bad_tree),
            str(tmp_path / "o"),
            "--formats",
            "cache",
            "--strict",
            "--workers",
            "1",
            "--no-progress",
        ]
    )
    assert rc == 1
    err = capsys.readouterr().err
    assert "trunc.jpg" in err and "bomb.png" in err
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_user_errors_are_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "noclass").mkdir()
    (tmp_path / "emptycls" / "c0").mkdir(parents=True)
    tiny = _tiny_tree(tmp_path / "tiny", classes=1, per_class=1)
    cases = [
        ([str(tmp_path / "missing"), str(tmp_path / "o")], "does not exist"),
        ([str(tmp_path / "noclass"), str(tmp_path / "o")], "no class folders"),
        ([str(tmp_path / "emptycls"), str(tmp_path / "o")], "empty"),
        ([str(tiny), str(tmp_path / "file" / "o")], "cannot write"),
        ([str(tiny), str(tmp_path / "o"), "--formats", "parquet"], "unknown format"),
    ]
    for argv, word in cases:
        with pytest.raises(SystemExit) as e:
            main(argv + ["--no-progress"])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and word in err[0], err


# ---------------------------------------------------------------------------------- re-runs and atomicity
def _mtimes(out: Path) -> dict[str, int]:
    return {p.relative_to(out).as_posix(): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


def test_rerun_skips_force_rebuilds_change_rebuilds(tmp_path: Path) -> None:
    src, out = _tiny_tree(tmp_path / "src"), tmp_path / "out"
    kw = dict(formats=("dali", "cache"), workers=1, progress=False)
    s1 = convert(src, out, **kw)
    assert {f: v["status"] for f, v in s1["formats"].items()} == {"dali": "built", "cache": "built"}
    before = _mtimes(out)
    s2 = convert(src, out, **kw)
    assert {f: v["status"] for f, v in s2["formats"].items()} == {"dali": "up to date", "cache": "up to date"}
    assert {k: v for k, v in _mtimes(out).items() if k != "manifest.json" and "files.txt" not in k} == {
        k: v for k, v in before.items() if k != "manifest.json" and "files.txt" not in k
    }
    s3 = convert(src, out, force=True, **kw)
    assert all(v["status"] == "built" for v in s3["formats"].values())
    s4 = convert(src, out, cache_res=16, **kw)  # an option of one format changed: only that one rebuilds
    assert s4["formats"]["dali"]["status"] == "up to date" and s4["formats"]["cache"]["status"] == "built"
    Image.fromarray(_smooth(40, 30, 999)).save(src / "val" / "c1" / "0.jpg", quality=92)  # a source changed
    s5 = convert(src, out, cache_res=16, **kw)
    assert all(v["status"] == "built" for v in s5["formats"].values())
    m = Manifest.load(out)
    rec = next(x for x in m.sources("val") if x["path"] == "val/c1/0.jpg")
    import hashlib

    assert rec["sha1"] == hashlib.sha1((src / "val" / "c1" / "0.jpg").read_bytes()).hexdigest()
    for split in m.splits:
        m.verify(split, ["dali", "cache", "files"], mode="full")


def _failing_after(n: int, fn):  # type: ignore[no-untyped-def]
    calls = {"n": 0}

    def wrapped(*a, **k):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] > n:
            raise RuntimeError("simulated crash inside the writer")
        return fn(*a, **k)

    return wrapped


def test_interrupted_write_leaves_nothing_a_reader_accepts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, out = _tiny_tree(tmp_path / "src"), tmp_path / "out"
    kw = dict(formats=("dali", "cache"), workers=1, progress=False)
    with monkeypatch.context() as mp:
        mp.setattr(wds, "wds_job", _failing_after(2, wds.wds_job))  # dali is written first
        with pytest.raises(RuntimeError, match="simulated"):
            convert(src, out, **kw)
    with pytest.raises(UserError, match="fastvpd.convert"):
        Manifest.load(out)  # first run: no manifest at all
    assert not list(out.rglob("*.tmp")) and not list(out.rglob("*.tar")) and not list(out.rglob("*.idx"))

    with monkeypatch.context() as mp:
        mp.setattr(cache_writer, "cache_job", _failing_after(2, cache_writer.cache_job))
        with pytest.raises(RuntimeError, match="simulated"):
            convert(src, out, **kw)
    m = Manifest.load(out)  # dali finished and is vouched for; the cache is not
    m.verify("train", ["dali"], mode="full")
    with pytest.raises(UserError, match="--formats cache"):
        m.verify("train", ["cache"], mode="fast")
    assert not list(out.rglob("*.tmp")) and not list(out.rglob("pixels.npy"))

    convert(src, out, **kw)  # a complete conversion, then a forced rebuild that dies half-way
    with monkeypatch.context() as mp:
        mp.setattr(cache_writer, "cache_job", _failing_after(4, cache_writer.cache_job))
        with pytest.raises(RuntimeError, match="simulated"):
            convert(src, out, force=True, **kw)
    m = Manifest.load(out)
    for split in m.splits:
        # dali was rebuilt before the crash; the cache died in its temp files, so the previous cache is
        # untouched and still vouched for
        m.verify(split, ["dali", "cache", "files"], mode="full")
    assert not list(out.rglob("*.tmp"))
    s = convert(src, out, **kw)  # nothing to redo
    assert s["formats"]["cache"]["status"] == "up to date" and s["formats"]["dali"]["status"] == "up to date"
    with monkeypatch.context() as mp:  # a crash after the first cache file was renamed into place
        # renames: manifest.json (cache dropped), train/cache/{pixels.npy,meta.npz}, then val/cache dies
        mp.setattr(files, "replace", _failing_after(3, files.replace))
        with pytest.raises(RuntimeError, match="simulated"):
            convert(src, out, formats=("cache",), force=True, workers=1, progress=False)
    m = Manifest.load(out)
    m.verify("train", ["dali"], mode="full")
    with pytest.raises(UserError, match="--formats cache"):
        m.verify("train", ["cache"], mode="off")  # half-replaced: no longer vouched for
    s = convert(src, out, **kw)  # recovers: the cache is rebuilt, dali is up to date
    assert s["formats"]["cache"]["status"] == "built" and s["formats"]["dali"]["status"] == "up to date"


def test_ffcv_worker_crash_raises_instead_of_hanging(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, out = _tiny_tree(tmp_path / "src", classes=1, per_class=2), tmp_path / "out"

    def boom(self, i):  # type: ignore[no-untyped-def]
        raise RuntimeError("simulated decode failure in an FFCV worker")

    monkeypatch.setattr(ffcv_writer.FFCVSource, "__getitem__", boom)
    with pytest.raises(RuntimeError, match="FFCV writer worker failed"):
        convert(src, out, formats=("ffcv",), workers=1, progress=False)
    assert not list(out.rglob("*.beton")) and not list(out.rglob("*.tmp"))
    assert not (out / "manifest.json").exists()


def test_verify_catches_truncated_and_modified_outputs(tmp_path: Path) -> None:
    src = tmp_path / "src" / "c0"
    src.mkdir(parents=True)
    Image.fromarray(_smooth(700, 600, 7)).save(src / "big.png")  # 1.26 MB of cached pixels
    out = tmp_path / "out"
    convert(tmp_path / "src", out, formats=("dali", "cache"), workers=1, cache_res=0, progress=False)
    m = Manifest.load(out)
    m.verify("train", ["dali", "cache"], mode="full")
    pix = m.path("train", "cache") / "pixels.npy"
    good = pix.read_bytes()
    pix.write_bytes(good[:-1])  # truncated
    with pytest.raises(UserError, match=r"pixels\.npy.*partial or stale.*--force"):
        m.verify("train", ["cache"], mode="fast")
    pix.write_bytes(good[:-1] + bytes([good[-1] ^ 0xFF]))  # same size, change beyond the first MiB
    m.verify("train", ["cache"], mode="fast")  # fast mode cannot see it, by design
    with pytest.raises(UserError, match="content hash"):
        m.verify("train", ["cache"], mode="full")
    tar = m.wds_shards("train")[0][0]
    data = bytearray(tar.read_bytes())
    data[600] ^= 0xFF
    tar.write_bytes(bytes(data))
    with pytest.raises(UserError, match="header hash"):
        m.verify("train", "dali", mode="fast")
    m.verify("train", "dali", mode="off")
    s = convert(tmp_path / "src", out, formats=("dali", "cache"), workers=1, cache_res=0, progress=False)
    assert s["formats"]["dali"]["status"] == "built"  # a damaged output is not "up to date"


def test_manifest_load_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="run `python -m fastvpd.convert SRC"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="unreadable"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"version": 99, "classes": [], "splits": {}}))
    with pytest.raises(UserError, match="version"):
        Manifest.load(tmp_path)


def test_cache_resizes_short_side_never_upscales(tmp_path: Path) -> None:
    src = _tiny_tree(tmp_path / "src", classes=1, per_class=2)
    Image.fromarray(_smooth(90, 60, 3)).save(src / "train" / "c0" / "z.png")
    out = tmp_path / "out"
    convert(src, out, formats=("cache",), workers=1, cache_res=32, progress=False)
    meta = np.load(out / "train" / "cache" / "meta.npz")
    sizes = list(zip(meta["heights"].tolist(), meta["widths"].tolist()))
    assert sizes == [(30, 40), (30, 44), (32, 48)]  # 30-px short sides kept; 60x90 -> 32x48
    assert conv.cache_size(60, 90, 0) == (60, 90) and conv.cache_size(90, 60, 32) == (48, 32)
    assert _read_manifest(out)["splits"]["train"]["count"] == 3


# ------------------------------------------------------------------------------------- unlabelled images
TINY_PRETRAIN = [
    "model.arch=resnet18",
    "model.small_stem=false",
    "aug.res=16",
    "train.batch_size=8",
    "moco.queue_size=32",
    "moco.mlp_hidden=32",
    "moco.dim=16",
    "moco.bn_splits=2",
    "train.epochs=1",
    "train.device=cpu",
    "log.every=1",
    "log.progress=false",
    "log.tensorboard=false",
    "eval.knn_every=1",
    "ckpt.every=1",
]


def _photos(folder: Path, n: int, seed: int, nested: bool = False) -> list[str]:
    """`n` smooth images of assorted sizes (and formats) in `folder`, or spread over sub-folders."""
    names = []
    for i in range(n):
        d = folder / f"y{2020 + i % 3}" / f"m{i % 2}" if nested else folder
        d.mkdir(parents=True, exist_ok=True)
        ext = ".jpg" if i % 3 else ".png"
        Image.fromarray(_smooth(24 + 3 * (i % 5), 20 + 2 * (i % 4), seed=seed + i)).save(d / f"p{i}{ext}")
        names.append((d / f"p{i}{ext}").relative_to(folder).as_posix())
    return names


def _pretrain_log(conv_dir: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> tuple[list[dict], str]:
    from fastvpd import pretrain

    capsys.readouterr()
    run = pretrain.main([f"data.root={conv_dir}", f"train.out_dir={out}", *TINY_PRETRAIN])
    text = capsys.readouterr().out
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return rows, text


def test_flat_folder_is_an_unlabelled_split_that_pretrains(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, out = tmp_path / "photos", tmp_path / "out"
    names = _photos(src, 20, seed=0)
    (src / "notes.txt").write_text("not an image")
    s = convert(src, out, formats=("dali", "cache"), workers=1, progress=False)
    assert s["unlabelled"] == ["train"] and s["splits"] == {"train": 20} and s["classes"] == 0
    assert [d["path"] for d in s["skipped"]] == ["notes.txt"]
    m = Manifest.load(out)
    assert m.splits == ["train"] and not m.labelled("train") and m.classes == []
    assert [x["path"] for x in m.sources("train")] == sorted(names) and set(m.labels("train")) == {-1}
    assert set(np.load(m.path("train", "cache") / "meta.npz")["labels"].tolist()) == {-1}
    with tarfile.open(m.wds_shards("train")[0][0]) as tar:
        assert {tar.extractfile(n).read() for n in tar.getnames() if n.endswith(".cls")} == {b"-1"}
    assert {ln.rsplit(" ", 1)[1] for ln in m.path("train", "files").read_text().splitlines()} == {"-1"}

    rows, text = _pretrain_log(out, tmp_path / "run", capsys)
    assert [ln for ln in text.splitlines() if "kNN monitor" in ln] == [
        f"kNN monitor off: {out} has no labelled split 'val' (data.val_split)"
    ]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))  # 20 images, batch 8: two steps
    assert not any("knn_top1" in r for r in rows)

    # Distillation and the linear probe train on labels: one line, before any model is built.
    from fastvpd import distill, linear

    for mod, key in ((distill, "distill.teacher"), (linear, "linear.backbone")):
        with pytest.raises(SystemExit) as e:
            mod.main([f"data.root={out}", f"train.out_dir={tmp_path / mod.__name__}", f"{key}=x.pt"])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and "converted without labels" in err[0], err


def test_distill_and_linear_refuse_an_unlabelled_val_split_they_would_score(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fastvpd import distill, linear

    src, out = tmp_path / "src", tmp_path / "out"
    for c in range(2):
        _photos(src / "train" / f"c{c}", 4, seed=c)
    _photos(src / "val", 3, seed=9)  # a flat val folder: images without labels
    convert(src, out, formats=("cache",), workers=1, progress=False)
    assert Manifest.load(out).labelled("train") and not Manifest.load(out).labelled("val")
    for mod, key in ((distill, "distill.teacher"), (linear, "linear.backbone")):
        with pytest.raises(SystemExit) as e:
            mod.main([f"data.root={out}", f"train.out_dir={tmp_path / mod.__name__}", f"{key}=x.pt"])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and "'val' has no labels" in err[0], err
        assert "eval.every=0" in err[0]


def test_nested_unlabelled_train_with_labelled_val_monitors_knn(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    _photos(src / "train", 16, seed=0, nested=True)
    for c in range(2):
        _photos(src / "val" / f"c{c}", 4, seed=100 * (c + 1))
    with pytest.raises(UserError, match="c0"):  # without the flag, y2020/y2021/y2022 look like classes
        convert(src, out, formats=("cache",), workers=1, progress=False)
    s = convert(src, out, formats=("cache",), workers=1, progress=False, unlabelled=("train",))
    assert s["unlabelled"] == ["train"] and s["splits"] == {"train": 16, "val": 8} and s["classes"] == 2
    m = Manifest.load(out)
    assert not m.labelled("train") and m.labelled("val") and m.classes == ["c0", "c1"]
    assert m.labels("val") == [0] * 4 + [1] * 4 and set(m.labels("train")) == {-1}
    rows, text = _pretrain_log(out, tmp_path / "run", capsys)
    assert "kNN monitor: the train split has no labels, so half of 'val' is the bank" in text
    knn = [r["knn_top1"] for r in rows if "knn_top1" in r]
    assert len(knn) == 1 and 0.0 <= knn[0] <= 100.0


def test_unlabelled_layouts_detected_or_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mixed = tmp_path / "mixed"
    _photos(mixed, 2, seed=0)
    _photos(mixed / "c0", 2, seed=5)
    with pytest.raises(SystemExit) as e:
        main([str(mixed), str(tmp_path / "o"), "--formats", "cache", "--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "both image files" in err[0] and "--unlabelled" in err[0], err
    assert main([str(mixed), str(tmp_path / "o"), "--formats", "cache", "--no-progress", "--unlabelled"]) == 0
    m = Manifest.load(tmp_path / "o")
    assert m.count("train") == 4 and not m.labelled("train")
    split_flat = tmp_path / "split_flat"  # train/ flat, val/ with classes: detected without the flag
    _photos(split_flat / "train", 3, seed=0)
    _photos(split_flat / "val" / "a", 2, seed=9)
    s = convert(split_flat, tmp_path / "o2", formats=("cache",), workers=1, progress=False)
    assert s["unlabelled"] == ["train"] and s["splits"] == {"train": 3, "val": 2}
    labelled = _tiny_tree(tmp_path / "labelled")  # an ordinary ImageFolder tree stays labelled
    s = convert(labelled, tmp_path / "o3", formats=("cache",), workers=1, progress=False)
    assert s["unlabelled"] == [] and Manifest.load(tmp_path / "o3").labelled("train")

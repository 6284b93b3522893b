"""benchmarks/decode.py: every decoder row decodes the same images PIL does (sizes and pixels), the size
check catches a decoder that does not, GPU rows skip with a reason on CPU, and the report shows the table."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks import decode as dec
from benchmarks import report
from benchmarks.harness import Options, skipped

# (height, width, PIL mode, chroma subsampling: 0 = 4:4:4, 1 = 4:2:2, 2 = 4:2:0); odd sizes and a
# greyscale JPEG, which every decoder must still return as 3-channel RGB
SHAPES = ((17, 24, "RGB", 2), (32, 40, "RGB", 0), (33, 21, "L", 2), (48, 37, "RGB", 1))


def _jpeg(h: int, w: int, mode: str, subsampling: int, seed: int) -> bytes:
    """A smooth random image (upsampled noise: decoders differ little on it) encoded at quality 90."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (h // 4 + 2, w // 4 + 2, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img = small.resize((w, h), Image.Resampling.BICUBIC).convert(mode)
    img.save(buf, format="JPEG", quality=90, subsampling=subsampling)
    return buf.getvalue()


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    return [_jpeg(h, w, m, s, seed=i) for i, (h, w, m, s) in enumerate(SHAPES)]


def _batches(jpegs: list[bytes], count: int = 3) -> list[list[bytes]]:
    return [jpegs[k % 2 :] + jpegs[: k % 2] for k in range(count)]  # same size per batch, other order


def _close(a: np.ndarray, b: np.ndarray, max_diff: int, mean_diff: float) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert d.max() <= max_diff and d.mean() <= mean_diff, (int(d.max()), float(d.mean()))


def _luma_close(a: np.ndarray, b: np.ndarray, mean_diff: float) -> None:
    """Same image up to chroma upsampling: JPEG stores luma at full size and chroma subsampled, and
    decoders upsample chroma differently (nvJPEG: not libjpeg's 'fancy' filter), which moves RGB by tens
    of levels on colourful detail but leaves the luma (recomputed from RGB, the JFIF transform being
    exact) within rounding."""
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    w = np.array([0.299, 0.587, 0.114])
    d = np.abs(a.astype(np.float64) @ w - b.astype(np.float64) @ w)
    assert d.mean() <= mean_diff, float(d.mean())


def test_torchvision_cpu_decodes_what_pil_decodes(jpegs: list[bytes]) -> None:
    """Same pixels within libjpeg-variant rounding (identical when both use libjpeg-turbo)."""
    pil = [dec.decode_pil(d) for d in jpegs]
    tv = dec.decode_torchvision(dec._tensors([jpegs])[0])
    for (h, w, _, _), p, t in zip(SHAPES, pil, tv):
        assert p.shape == (h, w, 3)
        _close(p, t.permute(1, 2, 0).numpy(), max_diff=4, mean_diff=0.5)


def test_dali_cpu_decodes_what_pil_decodes(jpegs: list[bytes]) -> None:
    pytest.importorskip("nvidia.dali")
    pipe = dec.dali_pipeline(_batches(jpegs), "cpu", 1, None)
    for batch in _batches(jpegs):  # the k-th run() gives the k-th batch, although DALI prefetches
        out = dec.decode_dali(pipe)
        for i, d in enumerate(batch):
            _close(dec.decode_pil(d), np.asarray(out[i]), max_diff=4, mean_diff=0.5)
    del pipe


def test_rows_on_cpu(jpegs: list[bytes]) -> None:
    """CPU rows measure and agree on sizes with the JPEG headers; GPU rows skip, saying why."""
    rows = {r["name"]: r for r in dec.measure_decoders(_batches(jpegs), torch.device("cpu"), 1)}
    assert list(rows) == list(dec.ROW_NAMES)
    assert rows[dec.PIL_ROW]["status"] == "ok" and rows[dec.PIL_ROW]["speedup"] == 1.0
    assert rows[dec.TV_CPU_ROW]["status"] == "ok"
    for name in (dec.PIL_ROW, dec.TV_CPU_ROW):
        r = rows[name]
        assert r["images_per_s"] > 0 and r["ms_per_batch"] > 0 and r["batches"] == 2 and r["speedup"] > 0
    for name in (dec.TV_CUDA_ROW, dec.DALI_MIXED_ROW):
        assert rows[name]["status"] == "skipped" and dec.NO_GPU in rows[name]["reason"]
    dali_cpu = rows[dec.DALI_CPU_ROW]
    try:
        import nvidia.dali  # noqa: F401

        assert dali_cpu["status"] == "ok" and dali_cpu["images_per_s"] > 0
    except ImportError:
        assert dali_cpu["status"] == "skipped" and "nvidia.dali not installed" in dali_cpu["reason"]


def test_size_check_catches_a_wrong_decoder(jpegs: list[bytes]) -> None:
    """A decoder returning transposed images (HWC read as CHW, say) fails its row instead of timing it."""
    batches = _batches(jpegs)
    sizes = dec.jpeg_sizes(batches)
    assert sizes[0] == [(h, w) for h, w, _, _ in SHAPES]
    good = dec.time_decoder("pil", dec.pil_decoder(batches), sizes, torch.device("cpu"))
    assert good["status"] == "ok" and good["batches"] == 2
    with pytest.raises(RuntimeError, match="sizes differ"):
        dec.time_decoder("wrong", lambda k: [(w, h) for h, w in sizes[k]], sizes, torch.device("cpu"))


def test_load_batches_keeps_jpegs_only(tmp_path: Path, jpegs: list[bytes]) -> None:
    files = []
    for i, d in enumerate(jpegs):
        files.append(tmp_path / f"{i}.jpg")
        files[-1].write_bytes(d)
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    batches = dec.load_batches([*files, tmp_path / "x.png"], batch=3, count=3)
    assert [len(b) for b in batches] == [3, 3, 3] and all(d in jpegs for b in batches for d in b)
    with pytest.raises(RuntimeError, match="JPEG"):
        dec.load_batches([tmp_path / "x.png"], batch=1, count=1)


def test_section_decode_on_a_converted_tree(tmp_path: Path, jpegs: list[bytes]) -> None:
    """The loaders section's entry point: finds the source JPEGs through the manifest, reports the table."""
    from fastvpd.convert import convert

    for i, d in enumerate(jpegs):
        cls = tmp_path / "src" / "train" / f"c{i % 2}"
        cls.mkdir(parents=True, exist_ok=True)
        (cls / f"{i}.JPEG").write_bytes(d)
    convert(tmp_path / "src", tmp_path / "out", formats=["cache"], workers=1, progress=False)
    assert sorted(p.name for p in dec.jpeg_files(tmp_path / "out")) == [
        f"{i}.JPEG" for i in range(len(jpegs))
    ]
    opts = Options(batch=2, loader_batches=2, loader_workers=1)
    res = dec.section_decode(tmp_path / "out", opts, torch.device("cpu"))
    assert [r["name"] for r in res["rows"]] == list(dec.ROW_NAMES) and res["notes"]
    assert res["rows"][0]["status"] == "ok" and res["rows"][0]["batches"] == 2
    missing = dec.section_decode(tmp_path / "nothing", opts, torch.device("cpu"))
    assert missing["status"] == "failed" and "no JPEGs to decode" in missing["reason"]


def test_report_renders_the_decode_table() -> None:
    rows = [
        {"name": dec.PIL_ROW, "status": "ok", "images_per_s": 500.0, "ms_per_batch": 64.0, "speedup": 1.0},
        {"name": dec.TV_CPU_ROW, "status": "ok", "images_per_s": 900.0, "ms_per_batch": 35.5, "speedup": 1.8},
        skipped(dec.TV_CUDA_ROW, dec.NO_GPU),
        skipped(dec.DALI_CPU_ROW, "RuntimeError: boom", status="failed"),
    ]
    res = {
        "meta": {"device_name": "cpu"},
        "loaders": {"rows": [], "notes": [], "decode": {"rows": rows, "notes": ["a decode note"]}},
    }
    text = report.render_text(res)
    assert report.DECODE_TITLE in text and "a decode note" in text
    assert any(
        line.startswith("torchvision.io.decode_jpeg (CPU)") and "1.80x" in line for line in text.splitlines()
    )
    assert "skipped: needs a CUDA GPU" in text and "failed: RuntimeError: boom" in text
    md = report.render_markdown(res)
    assert f"### {report.DECODE_TITLE}" in md and "| PIL | 500.0 | 1.00x | 64.0 |" in md
    assert "- a decode note" in md
    res["loaders"]["decode"] = {"status": "failed", "reason": "no JPEGs to decode (x)", "rows": []}
    assert "failed: no JPEGs to decode (x)" in report.render_text(res)
    assert "failed: no JPEGs to decode (x)" in report.render_markdown(res)


def _luma_mean_diff(a: np.ndarray, b: np.ndarray) -> float:
    try:
        _luma_close(a, b, mean_diff=2.0)
    except AssertionError as e:
        return float(e.args[0]) if e.args and isinstance(e.args[0], float) else float("inf")
    return 0.0


@pytest.mark.cuda
def test_gpu_rows_decode_what_pil_decodes(jpegs: list[bytes]) -> None:
    """nvJPEG (torchvision) and DALI mixed: same sizes, luma close to PIL's (see _luma_close).

    Known defect, seen on the H100 (2026-11-26 run 3, torchvision 0.26.0+cu130): torchvision's batched
    nvJPEG decode returned wrong pixels (mean luma off by 79 levels, blocks of zeros) for the greyscale
    33x21 JPEG, while the colour ones matched. No fastvpd loader decodes with it (the decode table only
    times it), so a greyscale failure there is an expected failure; a colour one fails the test."""
    device = torch.device("cuda")
    pil = [dec.decode_pil(d) for d in jpegs]
    tv = dec.decode_torchvision(dec._tensors([jpegs])[0], device)
    assert all(t.device.type == "cuda" for t in tv)
    off = {i: _luma_mean_diff(p, t.permute(1, 2, 0).cpu().numpy()) for i, (p, t) in enumerate(zip(pil, tv))}
    grey = {i for i, s in enumerate(SHAPES) if s[2] == "L"}
    assert not {i: d for i, d in off.items() if d and i not in grey}, off  # colour JPEGs: exact luma
    rows = {r["name"]: r for r in dec.measure_decoders(_batches(jpegs), device, 2)}
    assert rows[dec.TV_CUDA_ROW]["status"] == "ok" and rows[dec.TV_CUDA_ROW]["images_per_s"] > 0
    if not dec._backend_available("dali"):  # "" when nvidia.dali imports
        assert rows[dec.DALI_MIXED_ROW]["status"] == "ok", rows[dec.DALI_MIXED_ROW]
        pipe = dec.dali_pipeline([jpegs], "mixed", 2, torch.cuda.current_device())
        out = dec.decode_dali(pipe).as_cpu()
        for i, p in enumerate(pil):  # DALI: greyscale included
            _luma_close(p, np.asarray(out[i]), mean_diff=2.0)
        del pipe
    bad_grey = {i: d for i, d in off.items() if d and i in grey}
    if bad_grey:
        pytest.xfail(f"torchvision's batched nvJPEG decode of greyscale JPEGs: mean luma off by {bad_grey}")


def test_luma_check_ignores_chroma_upsampling_but_not_content(jpegs: list[bytes]) -> None:
    """The GPU rows' pixel check: chroma resampled another way passes, a different image does not."""
    rgb = dec.decode_pil(jpegs[3])
    y, cb, cr = Image.fromarray(rgb).convert("YCbCr").split()
    h, w = rgb.shape[:2]
    nearest = [c.resize((w // 2, h // 2), Image.Resampling.BOX).resize((w, h), Image.Resampling.NEAREST)
               for c in (cb, cr)]  # fmt: skip
    other_chroma = np.asarray(Image.merge("YCbCr", (y, *nearest)).convert("RGB"))
    assert np.abs(other_chroma.astype(int) - rgb.astype(int)).max() > 8  # RGB does move
    _luma_close(rgb, other_chroma, mean_diff=2.0)
    with pytest.raises(AssertionError):
        _luma_close(rgb, np.ascontiguousarray(rgb[:, ::-1]), mean_diff=2.0)

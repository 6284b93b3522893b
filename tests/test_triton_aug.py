"""The Triton kernels (fastvpd.data.augment.triton, the GPU default) give the torch reference's views on
the same draws.

On CPU the kernels run in Triton's interpreter, which must be chosen before Triton is first imported, so
those checks run in a fresh process with TRITON_INTERPRET=1. On a GPU (`-m cuda`) they run compiled,
against the torch form, and replayed from a CUDA graph with no host sync.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from fastvpd.config import UserError
from fastvpd.data.augment import PixelAugmenter
from fastvpd.data.augment import triton as triton_aug
from fastvpd.data.spec import moco_v2

ROOT = Path(__file__).resolve().parents[1]
triton = pytest.importorskip("triton", reason="triton is not installed")

# Run in the child: views of the cache form (PixelAugmenter.render, fixed shapes) and of FFCV's form
# (render_images on uint8 crops), Triton against torch, same generator draws. Prints the max |diff| per case.
CHILD = r"""
import json, sys
import torch
sys.path.insert(0, "tests")
from test_gpu_aug import _images, _store
from fastvpd.data.augment import PixelAugmenter, triton as T
from fastvpd.data.augment.draws import sample_photometric
from fastvpd.data.augment.photometric import photometric
from fastvpd.data.spec import GaussianBlur, ViewSpec, AugSpec, eval_spec, moco_v2
from dataclasses import replace

torch.set_num_threads(1)
pixels, offsets, H, W = _store(_images(4))
idx = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0, 2, 1])
out = {}

def views(spec, kernel, dtype, seed, rows=idx):
    gen = torch.Generator().manual_seed(seed)
    aug = PixelAugmenter(spec, pixels, offsets, H, W, dtype, gen, kernel=kernel)
    return aug.render(pixels, offsets[rows], H[rows], W[rows], fixed_shape=True)

def diff(a, b):
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))

mv = moco_v2(24).views[0]
# every op drawn for every sample, and a blur kernel (15 taps) longer than the 7-px image (two bounces)
always = replace(mv, jitter=replace(mv.jitter, p=1.0), grayscale_p=0.5, blur=GaussianBlur(p=0.7))
long_blur = replace(always, crop=replace(mv.crop, size=7), blur=GaussianBlur(p=1.0, kernel_frac=2.0))
# 65 taps: past triton_kernels.UNROLL_TAPS, the rolled loop (3 samples: the interpreter is slow per tap)
rolled_blur = replace(always, crop=replace(mv.crop, size=5), blur=GaussianBlur(p=1.0, kernel_frac=13.0))
cases = {
    "moco_v2_24": (moco_v2(24), torch.float32, idx),
    "moco_v2_33": (moco_v2(33), torch.float32, idx),
    "all_ops": (AugSpec("t", (always, always)), torch.float32, idx),
    "long_blur": (AugSpec("t", (long_blur,)), torch.float32, idx),
    "rolled_blur": (AugSpec("t", (rolled_blur,)), torch.float32, idx[:3]),
    "eval_ten_crop": (eval_spec(20, ten_crop=True), torch.float32, idx),
    "moco_v2_bf16": (moco_v2(24), torch.bfloat16, idx),
}
for name, (spec, dtype, rows) in cases.items():
    tv, ref = views(spec, "triton", dtype, 7, rows), views(spec, "torch", dtype, 7, rows)
    ok = all(v.dtype == dtype and v.is_contiguous(memory_format=torch.channels_last) for v in tv)
    same = [list(v.shape) for v in tv] == [list(v.shape) for v in ref]
    out[name] = {"diff": diff(tv, ref), "layout": ok, "shapes": same}
# another launch shape (benchmarks/aug_tune.py times several): 256-pixel programs, 5 per 33x33 image
shape = (T.BLOCK, T.WARPS)
T.BLOCK, T.WARPS = 256, 4
tv, ref = views(moco_v2(33), "triton", torch.float32, 8), views(moco_v2(33), "torch", torch.float32, 8)
out["block_256"] = {"diff": diff(tv, ref), "layout": True, "shapes": True}
T.BLOCK, T.WARPS = shape

# FFCV's form: uint8 crops, one slot of a [B, V, R, R, 3] buffer, finished in place
spec = AugSpec("t", (always,))
g = torch.Generator().manual_seed(3)
buf = torch.randint(0, 256, (6, 2, 24, 24, 3), dtype=torch.uint8, generator=g)
x = buf[:, 1].permute(0, 3, 1, 2)
mean, std = torch.tensor(always.normalize.mean), torch.tensor(always.normalize.std)
ph = sample_photometric(always, 6, torch.Generator().manual_seed(4), torch.device("cpu"))
got = T.render_images(x, always, ph, mean, std, torch.float32)
want = photometric(x.float() / 255.0, always, ph, mean, std, torch.float32)
cl = got.is_contiguous(memory_format=torch.channels_last)
out["ffcv_images"] = {"diff": diff([got], [want]), "layout": cl, "shapes": got.shape == want.shape}

# the loaders' wiring (the aug_kernel hook through build_loader): first batches, triton against torch
if len(sys.argv) > 1:
    from fastvpd.config import DataConfig
    from fastvpd.data import build_loader

    backends = ["cache"]
    try:
        import ffcv  # noqa: F401
        backends.append("ffcv")
    except ImportError:
        pass
    for backend in backends:
        batches = []
        for kernel in ("torch", "triton"):
            cfg = DataConfig(root=sys.argv[1], backend=backend, workers=1, verify="off")
            spec = moco_v2(32)
            loader = build_loader(cfg, spec, "train", 16, "cpu", torch.float32, seed=3, aug_kernel=kernel)
            loader.set_epoch(1)
            batches.append(next(iter(loader)))
            getattr(loader, "close", lambda: None)()
        a, b = batches
        same = torch.equal(a.indices, b.indices) and len(a.views) == len(b.views) == 2
        out[f"loader_{backend}"] = {"diff": diff(a.views, b.views), "layout": same, "shapes": same}
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def interpreted(digits_converted: Path, triton_child) -> dict:  # noqa: ANN001
    return triton_child(CHILD, str(digits_converted))


@pytest.mark.parametrize(
    ("case", "tol"),
    [
        ("moco_v2_24", 2e-5),
        ("moco_v2_33", 2e-5),
        ("block_256", 2e-5),
        ("all_ops", 2e-5),
        ("long_blur", 2e-5),
        ("rolled_blur", 2e-5),
        ("eval_ten_crop", 2e-5),
        ("ffcv_images", 2e-5),
        ("moco_v2_bf16", 0.02),  # one bf16 ulp of the normalised values (|x| < 4) at most
        ("loader_cache", 2e-5),  # against the numba CPU kernel: same draws, same formulas
        ("loader_ffcv", 2e-5),
    ],
)
def test_triton_views_equal_the_torch_form(interpreted: dict, case: str, tol: float) -> None:
    """Resample, jitter in each sample's order (contrast from the one-reduction mean), grayscale, blur
    (reflect padding past one bounce included), normalise and cast: the torch form's values, layout and
    dtype, for the cache form, ten-crop eval and FFCV's uint8 crops, and through both loaders."""
    if case not in interpreted:
        pytest.skip(f"{case}: ffcv is not installed")
    r = interpreted[case]
    assert r["layout"] and r["shapes"], r
    assert r["diff"] <= tol, r


def test_triton_kernels_compile_for_hopper() -> None:
    """Every specialisation `render` launches goes through Triton's real compiler to an sm_90 cubin (no GPU
    needed): catches what the interpreter lets through (types merged across branches, constexpr use)."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from triton.compiler import compile as tcompile
    except ImportError as e:
        pytest.skip(f"this Triton has no ASTSource compile API ({e})")
    from fastvpd.data.augment import triton_kernels as K

    ptr = {"fy": "*fp32", "fx": "*fp32", "factors": "*fp32", "cmean": "*fp32", "part": "*fp32"}
    ptr |= {"pix": "*u8", "mean": "*fp32", "inv": "*fp32", "src": "*fp32", "kern": "*fp32"}
    ptr |= {"planes": "*fp32"}
    ptr |= {k: "*i32" for k in ("jit_on", "order", "cpos", "gray_on", "blur_on")}

    def build(fn: Any, consts: dict, out: str) -> None:
        types = {n: "constexpr" if n in consts else ptr.get(n, "*i64") for n in fn.arg_names}
        types[{"colour": "out", "blur": "dst"}[fn.__name__]] = out
        k = tcompile(
            ASTSource(fn, types, consts),
            target=GPUTarget("cuda", 90, 32),
            options={"num_warps": triton_aug.WARPS},
        )
        assert k.asm["cubin"], consts

    blk = triton_aug.BLOCK
    for res in (224, 33):
        nblk = -(-res * res // blk)
        taps = moco_v2(res).views[0].blur.kernel_size(res)
        build(
            K.colour,
            dict(R=res, NBLK=nblk, BLOCK=blk, PHASE=0, JITTER=True, GRAY=False, FINAL=False),
            "*fp32",
        )
        for jitter, gray, final in itertools.product((True, False), repeat=3):
            consts = dict(R=res, NBLK=nblk, BLOCK=blk, PHASE=1, JITTER=jitter, GRAY=gray, FINAL=final)
            build(K.colour, consts, "*bf16")
        # the recipe's taps (one bounce, unrolled) and, at 33 px, 67 taps: periodic padding, a rolled loop
        for k_taps, along_w in itertools.product((taps, 67) if res == 33 else (taps,), (False, True)):
            build(
                K.blur,
                dict(R=res, K=k_taps, BLOCK=blk, ALONG_W=along_w, FINAL=along_w),
                "*bf16" if along_w else "*fp32",
            )


def test_triton_refuses_a_cpu_run_in_one_line() -> None:
    """Without a GPU (and not in the interpreter) asking for the kernels is a one-line user error."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process runs Triton's interpreter")
    why = triton_aug.unavailable(torch.device("cpu"))
    assert "need a CUDA device" in why and "\n" not in why
    px = torch.zeros(16, 3, dtype=torch.uint8)
    z = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(UserError, match="need a CUDA device"):
        PixelAugmenter(moco_v2(8), px, z, z + 4, z + 4, torch.float32, None, kernel="triton")


@pytest.mark.cuda
def test_triton_cache_views_on_the_gpu_match_torch_and_replay_in_a_graph(
    digits_converted: Path, replay_views: Callable
) -> None:
    """Compiled for the GPU: the cache loader's views by the Triton kernels equal the torch reference's
    (bf16), and replayed from a CUDA graph inside the step they equal the loader's own, with no sync."""
    from fastvpd.config import DataConfig
    from fastvpd.data import build_loader
    from fastvpd.step import GraphedStep

    res, b = 32, 32
    cfg = DataConfig(root=str(digits_converted), backend="cache")
    ref = build_loader(cfg, moco_v2(res), "train", b, "cuda", torch.bfloat16, seed=5, aug_kernel="torch")
    plain = build_loader(cfg, moco_v2(res), "train", b, "cuda", torch.bfloat16, seed=5, aug_kernel="triton")
    deferred = build_loader(
        cfg, moco_v2(res), "train", b, "cuda", torch.bfloat16, seed=5, aug_kernel="triton"
    )
    assert deferred.defer_views() == ""

    def render(indices: torch.Tensor) -> dict[str, torch.Tensor]:
        v1, v2 = deferred.augment(indices)
        return {"v1": v1, "v2": v2}

    logs: list[str] = []
    step = GraphedStep(render, enabled=True, warmup=2, log=logs.append, generators=deferred.generators)
    for loader in (ref, plain, deferred):
        loader.set_epoch(1)
    for k, (r, a, d) in enumerate(itertools.islice(zip(ref, plain, deferred), 6)):
        for got, want in zip(a.views, r.views):
            assert got.is_contiguous(memory_format=torch.channels_last) and got.dtype == torch.bfloat16
            torch.testing.assert_close(got, want, atol=0.04, rtol=0)  # fp32 rounding, then a bf16 ulp
        out = replay_views(deferred, step, d, strict=k >= 3)
        for name, want in zip(("v1", "v2"), a.views):
            torch.testing.assert_close(out[name], want, atol=0, rtol=0)
    assert step.captured, logs


@pytest.mark.cuda
def test_triton_render_is_deterministic_on_the_gpu() -> None:
    """No atomics: the same draws give bit-identical views (the contrast means add block sums in order)."""
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    n = 16
    hh = torch.full((n,), 120, device=dev)
    ww = torch.full((n,), 160, device=dev)
    px = torch.randint(0, 256, (n * 120 * 160, 3), dtype=torch.uint8, device=dev, generator=g)
    off = torch.arange(n, device=dev) * 120 * 160

    outs = []
    for _ in range(2):
        gen = torch.Generator(device=dev).manual_seed(1)
        aug = PixelAugmenter(moco_v2(96), px, off, hh, ww, torch.float32, gen, kernel="triton")
        outs.append(aug.augment(torch.arange(n, device=dev)))
    for a, b in zip(*outs):
        assert torch.equal(a, b)

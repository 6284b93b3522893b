"""benchmarks/: the reference formulation equals the package's MoCo step (so the ladder is fair), the ladder
and its rungs as rows of settings, the experiments' rungs, the report writer, the hardware sampler, the
projection, the GPU plan's selectors, and a small end-to-end run of the step ladder. The loader rows and
the images they read: tests/test_bench_loaders.py."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from benchmarks import hw, report
from benchmarks import throughput as tp
from benchmarks.experiments import inductor, stems
from benchmarks.harness import Options, Skip, count_flops, time_steps, top_ops
from benchmarks.ladder import Rung, run_ladder
from benchmarks.moco_steps import PLAIN_STEM, MocoForm, moco_ladder, package_step_for, profiled_form
from benchmarks.projection import fed_rate, projection
from benchmarks.reference_moco import ReferenceMoCo, build_optimizer, reference_step
from fastvpd.config import OptimConfig
from fastvpd.moco import MoCo
from fastvpd.optim import build_sgd
from fastvpd.step import MOCO_METRICS, DeviceMeters, Precision, moco_step, pin_lr


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread: these tiny steps gain nothing from two, and lose a lot on a busy 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class _SameShuffleReference(ReferenceMoCo):
    """The reference with the package's way of drawing the key permutation (argsort of uniform noise),
    so with the same RNG state both shuffle the keys identically (what split-BN sees)."""

    @torch.no_grad()
    def _batch_shuffle_single_gpu(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx_shuffle = torch.argsort(torch.rand(x.shape[0], device=x.device))
        return x[idx_shuffle], torch.argsort(idx_shuffle)


@pytest.mark.parametrize("bn_splits", [1, 2])
def test_reference_equals_package_moco(bn_splits: int) -> None:
    """fp32, same init, same inputs: same loss, same query/key encoders, same queue and pointer, 2 steps."""
    torch.manual_seed(0)
    m, t, margin, lr = 0.5, 0.2, 0.4, 0.05
    moco = MoCo("resnet18", dim=16, mlp_hidden=32, queue_size=24, momentum=m, temperature=t, margin=margin,
                bn_splits=bn_splits, small_stem=True).train()  # fmt: skip
    cls = _SameShuffleReference if bn_splits > 1 else ReferenceMoCo
    ref = cls.from_moco(moco, m, t, margin).train()
    oc = OptimConfig()
    lr_t = torch.tensor(lr)
    opt = build_sgd(moco.encoder_q.parameters(), oc, lr_t)
    pin_lr(opt, lr_t)
    opt_ref = build_optimizer(ref, lr, oc.momentum, oc.weight_decay)
    prec, meters, crit = (
        Precision("none", torch.device("cpu")),
        DeviceMeters(MOCO_METRICS, torch.device("cpu")),
        nn.CrossEntropyLoss(),
    )
    g = torch.Generator().manual_seed(1)
    for step in range(2):  # 2 x 8 keys into a queue of 24: the second step also checks the pointer moves on
        v1, v2 = torch.randn(2, 8, 3, 8, 8, generator=g)
        torch.manual_seed(100 + step)
        loss = moco_step(moco, opt, prec, meters, v1, v2)["loss"]
        torch.manual_seed(100 + step)
        loss_ref = reference_step(ref, opt_ref, crit, v1, v2, meters=False)["loss"]
        torch.testing.assert_close(loss, loss_ref.detach(), rtol=1e-5, atol=1e-5)
    # m = 0.5 makes a wrongly ordered momentum update differ by half an SGD update, far above fp32 noise.
    for enc, enc_ref in ((moco.encoder_q, ref.encoder_q), (moco.encoder_k, ref.encoder_k)):
        for (n, p), p_ref in zip(enc.named_parameters(), enc_ref.parameters()):
            torch.testing.assert_close(p, p_ref, rtol=1e-3, atol=1e-4, msg=f"{n} differs")
        for (n, b), b_ref in zip(enc.named_buffers(), enc_ref.buffers()):
            torch.testing.assert_close(b, b_ref, rtol=1e-3, atol=1e-4, msg=f"{n} differs")
    torch.testing.assert_close(moco.queue, ref.queue.t(), rtol=1e-3, atol=1e-4)
    assert int(moco.queue_ptr) == int(ref.queue_ptr) == 16


def test_reference_formulation_is_the_slow_one() -> None:
    """The reference keeps builder.py's habits: [dim, K] queue, host pointer, python-loop momentum update."""
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    ref = ReferenceMoCo(enc, dim=4, K=6, m=0.5, T=1.0, margin=0.0)
    assert ref.queue.shape == (4, 6) and torch.allclose(ref.queue.norm(dim=0), torch.ones(6))
    with torch.no_grad():
        for p in ref.encoder_q.parameters():
            p.add_(1.0)
    before = [p.clone() for p in ref.encoder_k.parameters()]
    x = torch.randn(3, 3, 2, 2)
    logits, labels = ref(x, x)
    assert logits.shape == (3, 7) and labels.eq(0).all() and int(ref.queue_ptr) == 3
    for p_k, p_q, b in zip(ref.encoder_k.parameters(), ref.encoder_q.parameters(), before):
        torch.testing.assert_close(p_k, 0.5 * b + 0.5 * p_q)


def _results() -> dict:
    row = {"status": "ok", "ms_per_step": 10.0, "samples_s": 100.0, "speedup": 1.0, "gflops": 3.0}
    return {
        "meta": {"device_name": "Test GPU", "torch": "2.x", "cpu_cores": 2, "date": "2026-01-01"},
        "options": {"arch": "resnet18", "batch": 8},
        "loaders": {
            "rows": [
                {
                    "name": "torchvision",
                    "status": "ok",
                    "samples_s": 50.0,
                    "speedup": 1.0,
                    "cpu_util_pct": 99.0,
                },
                {"name": "ffcv", "status": "skipped", "reason": "ffcv not installed"},
                {"name": "cache", "status": "ok", "samples_s": 400.0, "speedup": 8.0, "cpu_util_pct": 40.0},
            ]
        },  # fmt: skip
        "steps": {
            "rows": [
                {"name": "reference fp32 NCHW", **row},
                {"name": "+ CUDA graph", **row, "ms_per_step": 2.5, "samples_s": 400.0, "speedup": 4.0},
                {"name": "+ torch.compile", "status": "failed", "reason": "RuntimeError: boom"},
            ],
            "notes": ["a note"],
        },  # fmt: skip
        "e2e": {"status": "skipped", "reason": "fastvpd.pretrain unavailable", "rows": []},
    }


def test_report_writer(tmp_path: Path) -> None:
    res = _results()
    res["projection"] = projection(res)
    paths = report.write_report(res, tmp_path)
    assert set(paths) == {"json", "md", "png"}
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    back = json.loads(paths["json"].read_text())
    assert back["steps"]["rows"][1]["speedup"] == 4.0 and back["meta"]["device_name"] == "Test GPU"
    md = paths["md"].read_text()
    assert "| + CUDA graph | 400.0 |" in md and "ffcv not installed" in md
    assert "failed: RuntimeError: boom" in md
    text = report.render_text(res)
    assert "skipped: ffcv not installed" in text and "4.00x" in text
    assert "fastvpd.pretrain unavailable" in text


def test_projection_uses_the_measured_rates() -> None:
    res = _results()
    p = projection(res)  # no e2e: min(best step 400, best loader 400) samples/s
    assert p["pretrain"]["hours"] == pytest.approx(800 * 50_000 / 400.0 / 3600)
    assert p["total_hours"] is None
    res["e2e"] = {"rows": [{"name": "cache", "status": "ok", "samples_s": 200.0}]}
    res["distill"] = {"rows": [{"name": "+ CUDA graph", "status": "ok", "samples_s": 1000.0}]}
    p = projection(res)
    assert p["pretrain"]["samples_s"] == 200.0 and p["distill"]["samples_s"] == 400.0  # capped by the loader
    assert p["total_hours"] == pytest.approx((800 * 50_000 / 200.0 + 100 * 50_000 / 400.0) / 3600)
    assert projection({})["status"] == "skipped"


def test_projection_adds_the_loaders_gpu_time_to_the_step() -> None:
    """A loader's GPU work shares the step's GPU (times add); its host rate only caps. An eager step of
    2232/s fed by `cache` with 24 ms of GPU work per batch of 256 gives 1846/s (an H100 measured 1822/s end
    to end, benchmarks/RESULTS.md), where min(step, loader) would claim 2232/s."""
    res = _results()
    res["options"]["batch"] = 256
    res["steps"]["rows"][1]["samples_s"] = 2232.0
    res["loaders"]["rows"][2].update(samples_s=10376.0, device_ms_per_batch=24.0)
    p = projection(res)
    expect = 1 / (1 / 2232.0 + 24.0 / 1000 / 256)
    assert p["pretrain"]["samples_s"] == pytest.approx(expect) and 1840 < expect < 1850
    assert "loader 'cache'" in p["pretrain"]["source"] and "GPU time" in p["pretrain"]["source"]
    # a host-only loader slower than the step caps it
    assert fed_rate(2232.0, {"samples_s": 1000.0}, 256) == 1000.0
    # the best-feeding loader wins, not the fastest loader on its own
    res["loaders"]["rows"].append(
        {"name": "gpu_heavy", "status": "ok", "samples_s": 20000.0, "device_ms_per_batch": 40.0}
    )
    assert "loader 'cache'" in projection(res)["pretrain"]["source"]
    # distillation: one view, half the two-view row's GPU work
    res["distill"] = {"rows": [{"name": "+ CUDA graph", "status": "ok", "samples_s": 3000.0}]}
    d = projection(res)["distill"]
    assert d["samples_s"] == pytest.approx(1 / (1 / 3000.0 + 12.0 / 1000 / 256))


def test_hw_sampling_on_cpu() -> None:
    with hw.HwMonitor(torch.device("cpu")) as mon:
        t0 = time.process_time()
        while time.process_time() - t0 < 0.1:  # well over os.times()'s 10 ms tick (a fixed loop can read 0)
            sum(i * i for i in range(10_000))
    r = mon.result
    assert r["gpu"] is None and 0.0 <= r["cpu_util_pct"] <= 100.0 and r["process_cpu_s"] > 0
    assert len(r["cpu_util_per_core_pct"]) == hw.usable_cores()
    assert hw.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert hw.peak_bf16_tflops("NVIDIA H200") == 989.0
    assert hw.peak_bf16_tflops("NVIDIA A100-SXM4-40GB") == 312.0
    assert hw.peak_bf16_tflops("Some Future GPU") is None
    facts = hw.device_facts(torch.device("cpu"))
    assert facts["cpu_cores"] >= 1 and facts["torch"] == torch.__version__ and hw.device_slug(facts)


def test_timing_harness_cpu() -> None:
    calls = []
    t = time_steps(lambda: calls.append(1), torch.device("cpu"), warmup=2, repeats=5)
    assert len(calls) == 7 and t["repeats"] == 5 and t["ms_p10"] <= t["ms_per_step"] <= t["ms_p90"]
    lin = nn.Linear(64, 32)
    assert count_flops(lambda: lin(torch.randn(8, 64))) == 2 * 8 * 64 * 32


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, named in (
        (["--sections", "steps,nonsense"], "--sections"),
        (["--rungs", "(graph"], "--rungs"),
        (["--loader-backends", "cache,dali_fused"], "--loader-backends"),  # a deleted rendering: no row
        (["--e2e-backends", "cache_graphed"], "--e2e-backends"),  # a loaders-only row
    ):
        with pytest.raises(SystemExit) as e:
            tp.main(argv)
        assert e.value.code == 2 and named in capsys.readouterr().err


def test_options_pick_the_default_rows_and_the_experiments_on_request() -> None:
    plain = tp.parse_args([])[0].resolve(torch.device("cpu"))
    assert plain.distill and not plain.experiments
    assert plain.loader_backends == ("torchvision", "ffcv", "ffcv_once", "dali", "cache", "cache_graphed")
    assert plain.e2e_backends == ("torchvision", "ffcv", "ffcv_once", "dali", "cache")
    more = tp.parse_args(["--experiments", "--no-distill"])[0].resolve(torch.device("cpu"))
    assert not more.distill and {"dali_x4", "cache_graphed_torch"} <= set(more.loader_backends)
    assert "dali_x4" in more.e2e_backends and "cache_graphed_torch" not in more.e2e_backends
    named = tp.parse_args(["--loader-backends", "cache,dali_x4"])[0].resolve(torch.device("cpu"))
    assert named.loader_backends == ("cache", "dali_x4")  # an experiment row by name needs no flag


def test_ladder_reports_each_rung_as_it_goes() -> None:
    """A time limit that kills the run mid-ladder must not lose the rungs already measured; every row
    records its rung's settings."""
    seen: list[list[str]] = []
    rungs = [Rung(name, MocoForm(graphed=name == "b")) for name in ("base", "a", "b")]
    opts = Options(warmup=1, repeats=2, batch=4)
    res = run_ladder(
        rungs,
        lambda form: lambda: None,
        opts,
        torch.device("cpu"),
        None,
        on_row=lambda rows: seen.append([r["name"] for r in rows]),
    )
    assert seen == [["base"], ["base", "a"]] and [r["status"] for r in res["rows"]] == ["ok"] * 3
    assert [r["form"]["graphed"] for r in res["rows"]] == [False, False, True]


def test_step_ladder_end_to_end_small(tmp_path: Path) -> None:
    """The steps section end to end on tiny sizes (the full --quick run is the CLI's job)."""
    argv = ["--quick", "--sections", "steps", "--arch", "resnet18", "--res", "16", "--batch", "8",
            "--warmup", "1", "--repeats", "2", "--threads", "1", "--out", str(tmp_path),
            "--rungs", "fused enqueue|CUDA graph"]  # fmt: skip
    assert tp.main(argv) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    rows = {r["name"]: r for r in res["steps"]["rows"]}
    assert list(rows) == [r.name for r in moco_ladder(Options(), torch.device("cpu"))]
    assert rows["reference fp32 NCHW"]["status"] == "ok" and rows["reference fp32 NCHW"]["speedup"] == 1.0
    assert rows["reference fp32 NCHW"]["form"]["reference"] is True
    pkg = rows["+ fused enqueue/foreach momentum"]
    assert pkg["status"] == "ok" and pkg["samples_s"] > 0 and pkg["gflops"] > 0
    assert pkg["form"]["reference"] is False and pkg["form"]["graphed"] is False
    assert rows["+ CUDA graph"]["status"] == ("ok" if torch.cuda.is_available() else "skipped")
    assert rows["+ channels-last"]["status"] == "skipped" and "--rungs" in rows["+ channels-last"]["reason"]
    assert res["steps"]["flops_per_step"] > 0
    distill = {r["name"]: r["status"] for r in res["distill"]["rows"]}
    assert distill["eager fp32 NCHW"] == "ok" and distill["+ channels-last"] == "skipped"  # baseline always
    assert (tmp_path / "results.md").is_file() and (tmp_path / "chart.png").is_file()


def test_compiled_rung_compiles_under_its_inductor_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """An Inductor experiment compiles afresh (Dynamo would otherwise reuse the last rung's code) with its
    settings in force when the lazy compile runs; the experiments are opt-in and GPU-only."""
    seen: list[bool] = []

    def recording(gm: torch.fx.GraphModule, _inputs: list[torch.Tensor]) -> object:
        seen.append(torch._inductor.config.conv_1x1_as_mm)
        return gm.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: real_compile(m, **{**kw, "backend": recording}))
    opts = Options(arch="resnet18", res=16, batch=4, queue=8, warmup=1, repeats=1)
    cpu = torch.device("cpu")
    try:
        for settings, want in (((), False), ((("conv_1x1_as_mm", True),), True)):
            seen.clear()
            package_step_for(opts, cpu, MocoForm(compiled=True, inductor=settings))()
            assert seen and all(v is want for v in seen), seen  # query (fwd, bwd) and key encoders
        assert torch._inductor.config.conv_1x1_as_mm is False  # restored after the compiling call
    finally:
        torch._dynamo.reset()
    assert inductor.rungs(Options(compile=True, experiments=True), cpu) == []  # CPU: no captured step
    gpu = [r.form.inductor for r in inductor.rungs(Options(compile=True), torch.device("cuda"))]
    assert gpu == [tuple(s.items()) for _, s in inductor.INDUCTOR_VARIANTS]


def test_stem_rungs_time_the_step_with_each_stem() -> None:
    """The stem experiments (GPU-only rungs) build the package's step through fastvpd.models.adapt_stem;
    the step itself runs anywhere and trains."""
    cpu = torch.device("cpu")
    eager = stems.rungs(Options(compile=True), cpu)  # CPU: the eager captured rungs only, each skipped
    assert [r.form.stem for r in eager] == [stem for _, stem in stems.STEMS]
    assert all(r.form.graphed and not r.form.compiled and "CUDA" in r.skip for r in eager)
    seen: list[int] = []
    real = torch.nn.functional.conv2d

    def spy(x: torch.Tensor, w: torch.Tensor, *a: object, **kw: object) -> torch.Tensor:
        seen.append(x.shape[1])
        return real(x, w, *a, **kw)

    opts = Options(arch="resnet18", res=40, batch=4, queue=8, warmup=1, repeats=1)  # > 32: the 7x7 stem
    for stem, want in (((8, "direct"), 8), ((4, "s2d"), 16)):
        seen.clear()
        step = package_step_for(opts, cpu, MocoForm(stem=stem))
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.nn.functional, "conv2d", spy)
            out = step()
        assert seen.count(want) == 2, seen  # the query and key encoders' stems
        assert torch.isfinite(out["loss"]).all()


def _row(name: str, rate: float, status: str = "ok", **form: object) -> dict[str, object]:
    from dataclasses import asdict

    return {"name": name, "status": status, "samples_s": rate, "form": asdict(MocoForm(**form))}


def test_fastest_eager_stem_is_picked_from_this_runs_rows() -> None:
    """The compiled `fastest stem` rung compiles the stem whose eager captured rung beat the plain stem's
    by the most in the same run (read from the rows' settings, not their names), and nothing (a skip,
    with the reason) when none did or none was timed."""
    rows = [
        _row("reference", 900.0, reference=True, graphed=True),  # not a candidate, whatever its rate
        _row("plain", 2486.5, graphed=True),
        _row("eight", 2500.0, graphed=True, stem=(8, "direct")),
        _row("s2d", 2600.0, graphed=True, stem=(3, "s2d")),
        _row("im2col", 9999.0, status="failed", graphed=True, stem=(3, "im2col")),
        _row("compiled s2d", 9000.0, graphed=True, compiled=True, stem=(4, "s2d")),
    ]
    stem, why = stems.fastest_eager_stem(rows)
    assert stem == (3, "s2d") and "+4.6 %" in why and why.startswith("s2d")
    stem, why = stems.fastest_eager_stem([rows[1], _row("s2d", 2400.0, graphed=True, stem=(3, "s2d"))])
    assert stem is None and "no eager stem rung beat" in why
    assert stems.fastest_eager_stem(rows[2:])[0] is None  # no plain stem measured
    assert stems.fastest_eager_stem(rows[:2])[0] is None  # no other stem measured
    pick = stems.rungs(Options(compile=True), torch.device("cuda"))[-1]
    assert pick.name == stems.FASTEST and pick.pick is not None
    assert pick.pick(rows)[0] == MocoForm(graphed=True, compiled=True, stem=(3, "s2d"))
    with pytest.raises(Skip, match="no eager stem rung was measured"):
        pick.pick(rows[:2])


def test_the_profile_follows_the_fastest_compiled_captured_rung() -> None:
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    rows = [
        _row("eager s2d", 9999.0, graphed=True, stem=(3, "s2d")),  # eager: never the profiled form
        _row("compiled", 3959.6, graphed=True, compiled=True),
        _row("picked", 4050.0, graphed=True, compiled=True, stem=(3, "s2d")),
    ]
    assert profiled_form(rows, gpu) == MocoForm(graphed=True, compiled=True, stem=(3, "s2d"))
    rows[-1]["samples_s"] = 3900.0
    assert profiled_form(rows, gpu) == MocoForm(graphed=True, compiled=True, stem=PLAIN_STEM)
    assert profiled_form(rows[:1], gpu) == MocoForm(graphed=True, compiled=True)
    assert profiled_form(rows[:1], gpu, compiled=False) == MocoForm(graphed=True)
    assert profiled_form(rows, cpu, compiled=False) == MocoForm()


def test_a_rung_that_picks_sees_the_ladders_rows_and_may_skip() -> None:
    """run_ladder hands a picking rung the rows measured before it; its Skip is a skipped row with the
    reason, and what it picked lands in its row with its note."""
    seen: list[list[str]] = []
    built: list[MocoForm] = []

    def pick(rows: list[dict[str, object]]) -> tuple[MocoForm, str]:
        seen.append([str(r["name"]) for r in rows])
        if len(seen) == 2:
            raise Skip("nothing to pick")
        return MocoForm(stem=(4, "s2d")), "picked a"

    def build(form: MocoForm) -> object:
        built.append(form)
        return lambda: None

    rungs = [Rung("a", MocoForm()), Rung("pick", None, pick=pick), Rung("pick again", None, pick=pick)]
    rows = run_ladder(rungs, build, Options(warmup=0, repeats=1), torch.device("cpu"), None)["rows"]
    assert seen == [["a"], ["a", "pick"]] and built == [MocoForm(), MocoForm(stem=(4, "s2d"))]
    assert rows[1]["status"] == "ok" and rows[1]["note"] == "picked a"
    assert rows[1]["form"]["stem"] == (4, "s2d")
    assert rows[2]["status"] == "skipped" and rows[2]["reason"] == "nothing to pick"


def _gpu_plan_calls() -> list[str]:
    plan = (Path(__file__).resolve().parents[1] / "docs" / "gpu-runs.md").read_text()
    return re.findall(r'BENCH_ARGS="([^"]*)"', plan)


def test_the_gpu_plans_selectors_still_select_what_they_say() -> None:
    """docs/gpu-runs.md's calls name rungs by regex and loader rows by name: the first call must still
    select the captured baseline, the five eager stem rungs and the compiled picked-stem rung (no other
    cold compile), and every row a call names must exist."""
    calls = _gpu_plan_calls()
    assert len(calls) >= 2, "the GPU plan lost its calls"
    first = calls[0].split()
    assert "--experiments" in first and "--compile" in first
    regex = first[first.index("--rungs") + 1]
    opts = Options(compile=True, experiments=True)
    gpu = torch.device("cuda")  # builds nothing yet
    from benchmarks.experiments import step_rungs

    ladder = moco_ladder(opts, gpu) + step_rungs(opts, gpu)
    picked = [r.name for r in ladder[1:] if re.search(regex, r.name)]
    assert picked == ["+ CUDA graph", *(f"+ CUDA graph, {label}" for label, _ in stems.STEMS), stems.FASTEST]
    for call in calls:
        args = call.split()
        for flag in ("--loader-backends", "--e2e-backends"):
            if flag in args:
                tp.parse_args([flag, args[args.index(flag) + 1]])  # a ConfigError names an unknown row


def test_top_ops_and_their_table() -> None:
    """The profile's top ops: per-step time, share of the whole, largest first; shown under the ladder."""
    from types import SimpleNamespace as E

    events = [
        E(key="conv", self_device_time_total=6000.0, self_cpu_time_total=1.0, count=30),
        E(key="bn", self_device_time_total=3000.0, self_cpu_time_total=9.0, count=60),
        E(key="idle", self_device_time_total=0.0, self_cpu_time_total=0.0, count=3),
        E(key="relu", self_device_time_total=1000.0, self_cpu_time_total=2.0, count=30),
    ]
    top = top_ops(events, steps=3, on_device=True, top=2)
    assert [t["name"] for t in top] == ["conv", "bn"]
    assert top[0]["ms_per_step"] == pytest.approx(2.0) and top[0]["pct"] == pytest.approx(60.0)
    assert top[1]["calls_per_step"] == 20
    assert [t["name"] for t in top_ops(events, 3, on_device=False)] == ["bn", "relu", "conv"]
    res = _results()
    res["steps"]["profile"] = {"status": "ok", "steps": 3, "what": "compiled captured step", "top": top}
    text, md = report.render_text(res), report.render_markdown(res)
    assert report.PROFILE_TITLE in text and "compiled captured step" in text
    assert any(line.startswith("conv") and "60.0" in line for line in text.splitlines())
    assert "| conv | 2.00 | 60.0 | 10 |" in md
    # the fastest loader with GPU kernels gets its own table
    res["loaders"]["rows"][2]["device_top"] = [{"name": "resample_kernel", "ms_per_step": 5.0, "pct": 50.0}]
    text = report.render_text(res)
    assert "GPU kernels of loader 'cache'" in text and "resample_kernel" in text


def test_git_commit_can_be_named_by_the_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tree copied to a GPU machine may carry stale git metadata: FASTVPD_GIT_COMMIT wins."""
    monkeypatch.delenv("FASTVPD_GIT_COMMIT", raising=False)
    own = hw.git_commit()
    assert own and own != "abc1234"
    monkeypatch.setenv("FASTVPD_GIT_COMMIT", "abc1234")
    assert hw.git_commit() == "abc1234" and hw.device_facts(torch.device("cpu"))["git_commit"] == "abc1234"


def test_triton_tuning_table_skips_on_cpu_renders_and_restores_the_launch_shape() -> None:
    """benchmarks/aug_tune.py: a skipped section without a GPU, the table in both reports, and the Triton
    kernels' BLOCK/WARPS back to their defaults after a timed shape (even when it raises)."""
    from benchmarks import aug_tune
    from fastvpd.data.augment import triton as triton_aug

    out = aug_tune.section_triton_tuning(Path("nowhere"), Options(batch=4, res=32), torch.device("cpu"))
    assert out["status"] == "skipped" and "CUDA" in out["reason"]
    before = (triton_aug.BLOCK, triton_aug.WARPS)
    with pytest.raises(RuntimeError), aug_tune.launch_shape(256, 4):
        assert (triton_aug.BLOCK, triton_aug.WARPS) == (256, 4)
        raise RuntimeError("boom")
    assert (triton_aug.BLOCK, triton_aug.WARPS) == before
    rows = [
        {"name": "256 px x 4 warps", "device_ms_per_batch": 1.25, "triton_ms_per_batch": 0.75},
        {"name": "1024 px x 8 warps (default)", "device_ms_per_batch": 1.5, "triton_ms_per_batch": 1.0},
    ]
    rows[0]["samples_s"] = 204800.0
    res = {"meta": {}, "loaders": {"rows": [], "notes": [], "triton_tuning": {"rows": rows, "notes": ["n1"]}}}
    text, md = report.render_text(res), report.render_markdown(res)
    assert report.TUNING_TITLE in text and "n1" in text and "204800" in text
    assert f"### {report.TUNING_TITLE}" in md and "| 256 px x 4 warps | 1.25 | 0.75 | 204800 |" in md


@pytest.mark.cuda
def test_step_ladder_on_gpu(tmp_path: Path) -> None:
    """Every GPU rung runs (bf16, CUDA graph) and reports MFU and peak memory."""
    argv = ["--sections", "steps", "--arch", "resnet18", "--res", "64", "--batch", "32", "--warmup", "2",
            "--repeats", "5", "--out", str(tmp_path)]  # fmt: skip
    assert tp.main(argv) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    for sec in ("steps", "distill"):
        for r in res[sec]["rows"]:
            assert r["status"] == "ok", r
            assert r["peak_mem_gib"] > 0 and r["mfu_pct"] > 0

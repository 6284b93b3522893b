"""The MoCo step ladder: from the reference formulation (benchmarks/reference_moco.py: builder.py and
main_moco.py, eager fp32 NCHW) through channels-last and bf16 autocast to the package's step (fused
enqueue, foreach momentum, fused SGD), its CUDA graph and its compiled form, on device-resident inputs;
and the profile of the fastest compiled form this run measured."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.harness import (
    Options,
    device_peak,
    first_line,
    free_memory,
    log,
    require,
    sync,
    synthetic_views,
    top_ops,
)
from benchmarks.ladder import NO_GPU, RowHook, Rung, ladder_notes, measured, run_ladder

# (channels the stem convolution reads, how it computes): the plain 3-channel cuDNN stem
PLAIN_STEM: tuple[int, str] = (3, "direct")


@dataclass(frozen=True)
class MocoForm:
    """How one MoCo rung computes its step. On a CUDA device the package's step runs the key encoder on a
    second stream, as fastvpd.pretrain does."""

    reference: bool = False  # benchmarks/reference_moco.py's formulation instead of fastvpd.step.moco_step
    channels_last: bool = True
    amp: bool = True  # autocast (--amp; GPU only: a CPU run trains fp32)
    graphed: bool = False  # captured in one CUDA graph (fastvpd.step.GraphedStep)
    compiled: bool = False  # encoders under torch.compile
    stem: tuple[int, str] = PLAIN_STEM  # fastvpd.models.adapt_stem(channels, impl): an experiments hook
    inductor: tuple[tuple[str, Any], ...] = ()  # torch._inductor.config settings the compile runs under

    def why_not(self, device: torch.device) -> str:
        """'' when this form runs on `device`, else why not."""
        if device.type == "cuda":
            return ""
        if self.graphed:
            return NO_GPU
        if self.reference and self.amp:
            return "bf16 autocast is GPU-only (CPU trains fp32)"
        return ""


def _moco_model(opts: Options, device: torch.device) -> nn.Module:
    from fastvpd.config import MocoConfig

    moco_mod = require("fastvpd.moco", "fastvpd.moco")
    mc = MocoConfig()
    torch.manual_seed(0)
    model = moco_mod.MoCo(
        opts.arch,
        dim=mc.dim,
        mlp_hidden=mc.mlp_hidden,
        queue_size=opts.queue,
        momentum=mc.momentum,
        temperature=mc.temperature,
        margin=mc.margin,
        bn_splits=mc.bn_splits if opts.batch % mc.bn_splits == 0 else 1,
        small_stem=opts.res <= 32,
    )
    return model.to(device).train()


def _lr(opts: Options) -> float:
    from fastvpd.config import OptimConfig

    oc = OptimConfig()
    return oc.lr * opts.batch / oc.lr_batch


def reference_step_for(opts: Options, device: torch.device, form: MocoForm) -> Callable[[], Any]:
    from benchmarks.reference_moco import ReferenceMoCo, build_optimizer, reference_step
    from fastvpd.config import MocoConfig, OptimConfig

    mc, oc = MocoConfig(), OptimConfig()
    ref = ReferenceMoCo.from_moco(_moco_model(opts, device), mc.momentum, mc.temperature, mc.margin)
    ref = ref.to(device)
    if form.channels_last:
        ref = ref.to(memory_format=torch.channels_last)
    opt = build_optimizer(ref, _lr(opts), oc.momentum, oc.weight_decay)
    crit = nn.CrossEntropyLoss().to(device)
    v1, v2 = synthetic_views(opts.batch, opts.res, device, torch.float32, form.channels_last)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if form.amp else contextlib.nullcontext()

    def step() -> Any:
        with amp:
            return reference_step(ref, opt, crit, v1, v2)

    return step


def package_step_for(
    opts: Options, device: torch.device, form: MocoForm, precision: Any = None
) -> Callable[[], Any]:
    """The package's MoCo step in `form`. `precision`: a fastvpd.step.Precision to use instead of the
    form's (benchmarks/traffic.py passes a CPU bf16 one to model a GPU step's bytes)."""
    step_mod = require("fastvpd.step", "fastvpd.step")
    from fastvpd.config import OptimConfig
    from fastvpd.optim import build_sgd

    oc = OptimConfig()
    model = _moco_model(opts, device)
    if form.stem != PLAIN_STEM:
        require("fastvpd.models", "fastvpd.models").adapt_stem(model, *form.stem)
    if form.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if form.compiled:
        # Dynamo would reuse an earlier rung's compiled code for these new modules (it does not guard on
        # Inductor's settings); Inductor's on-disk cache still makes an unchanged compile quick
        torch._dynamo.reset()
        model.encoder_q = torch.compile(model.encoder_q)
        model.encoder_k = torch.compile(model.encoder_k)
    lr = torch.tensor(_lr(opts), dtype=torch.float32, device=device)  # as fastvpd.pretrain: a device lr
    opt = build_sgd(model.encoder_q.parameters(), oc, lr)
    step_mod.pin_lr(opt, lr)
    if precision is None:
        amp = opts.amp if form.amp and device.type == "cuda" else "none"
        precision = step_mod.Precision(amp, device)
    meters = step_mod.DeviceMeters(step_mod.MOCO_METRICS, device)
    dtype = precision.dtype or torch.float32
    v1, v2 = synthetic_views(opts.batch, opts.res, device, dtype, form.channels_last)
    side = torch.cuda.Stream(device) if device.type == "cuda" else None

    def fn(a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
        return step_mod.moco_step(model, opt, precision, meters, a, b, key_stream=side)

    if form.inductor:  # compiling is lazy: the settings must hold on the calls that compile (the first)
        plain, settings = fn, dict(form.inductor)

        def fn(a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
            with torch._inductor.config.patch(settings):
                return plain(a, b)

    if form.graphed:
        g = step_mod.GraphedStep(fn, enabled=True, warmup=3, log=log)
        return lambda: g(v1, v2)
    return lambda: fn(v1, v2)


def step_for(opts: Options, device: torch.device, form: MocoForm) -> Callable[[], Any]:
    if form.reference:
        return reference_step_for(opts, device, form)
    return package_step_for(opts, device, form)


def rung(name: str, form: MocoForm, device: torch.device, warmup: int = 0) -> Rung:
    """A MoCo rung that says why it cannot run on `device`; a CUDA graph warms up and captures first."""
    return Rung(name, form, form.why_not(device), warmup_extra=4 if form.graphed else warmup)


COMPILED = MocoForm(graphed=True, compiled=True)  # the recipe's step on a GPU


def moco_ladder(opts: Options, device: torch.device) -> list[Rung]:
    """The ladder's rungs, each against the reference; --compile adds the compiled ones."""
    gpu = device.type == "cuda"
    rungs = [
        rung("reference fp32 NCHW", MocoForm(reference=True, channels_last=False, amp=False), device),
        rung("+ channels-last", MocoForm(reference=True, amp=False), device),
        rung("+ bf16 autocast", MocoForm(reference=True), device),
        rung("+ fused enqueue/foreach momentum", MocoForm(), device),
        rung("+ CUDA graph", MocoForm(graphed=True), device),
    ]
    if opts.compile:
        rungs.append(rung("+ torch.compile (eager step)", MocoForm(compiled=True), device, warmup=2))
        if gpu:
            rungs.append(rung("+ torch.compile + CUDA graph", COMPILED, device))
    return rungs


def section_steps(opts: Options, device: torch.device, on_row: RowHook | None = None) -> dict[str, Any]:
    rungs = moco_ladder(opts, device)
    if opts.experiments:
        from benchmarks.experiments import step_rungs

        rungs += step_rungs(opts, device)
    peak, peak_source = device_peak(device)
    res = run_ladder(rungs, lambda f: step_for(opts, device, f), opts, device, peak, on_row=on_row)
    sizes = f"{opts.arch} at {opts.res} px, batch {opts.batch}, queue {opts.queue}"
    notes = ladder_notes(res, f"{sizes}; speed-up vs the reference")
    if device.type == "cuda":
        notes.append("the package's step runs the key encoder on a second CUDA stream, as fastvpd.pretrain")
    if peak:
        notes.append(f"MFU against {peak:.0f} TFLOP/s ({peak_source})")
    elif device.type == "cpu":
        notes.append("CPU: achieved GFLOP/s instead of MFU")
    res.update(notes=notes, peak_tflops=peak, peak_source=peak_source)
    if opts.profile:
        res["profile"] = profile_step(opts, device, profiled_form(res["rows"], device, opts.compile))
    return res


def profiled_form(rows: Sequence[dict[str, Any]], device: torch.device, compiled: bool = True) -> MocoForm:
    """The form of the fastest compiled, captured rung this run measured, so the profile shows the step
    that is the figure; without one, the plain compiled step on a GPU (eager on a CPU, or without
    --compile)."""
    if device.type != "cuda":
        return MocoForm(compiled=compiled)
    done = [r for r in measured(rows) if r["form"]["compiled"] and r["form"]["graphed"]]
    if not done:
        return MocoForm(graphed=True, compiled=compiled)
    best = max(done, key=lambda r: r["samples_s"])  # the first of equal rates: the ladder's order
    f = dict(best["form"])
    return MocoForm(**{**f, "stem": tuple(f["stem"]), "inductor": tuple(map(tuple, f["inductor"]))})


def describe(form: MocoForm, device: torch.device) -> str:
    what = ("compiled " if form.compiled else "") + ("captured step" if form.graphed else "eager step")
    if device.type == "cuda":
        what += ", key encoder on a 2nd stream"
    if form.stem != PLAIN_STEM:
        what += f", stem {form.stem[1]} on {form.stem[0]} channels"
    if form.inductor:
        what += ", " + ", ".join(f"{k}={v}" for k, v in form.inductor)
    return what


def profile_step(opts: Options, device: torch.device, form: MocoForm) -> dict[str, Any]:
    """torch.profiler trace (Chrome format, gzipped) of a few steps of the package's step in `form`, and
    its top ops by self time."""
    from torch.profiler import ProfilerActivity, profile

    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "trace.json.gz"
    gpu = device.type == "cuda"
    steps = 3
    try:
        step = package_step_for(opts, device, form)
        for _ in range(opts.warmup + 4):
            step()
        sync(device)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
        with profile(activities=acts) as prof:
            for _ in range(steps):
                step()
            sync(device)
        prof.export_chrome_trace(str(path))
        top = top_ops(prof.key_averages(), steps, gpu)
    except Exception as e:
        return {"status": "failed", "reason": first_line(e)}
    finally:
        free_memory(device)
    log(f"profile: wrote {path} (open in chrome://tracing or ui.perfetto.dev)")
    return {"status": "ok", "trace": path.name, "steps": steps, "what": describe(form, device), "top": top}

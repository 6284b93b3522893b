"""The distillation step ladder: the package's OFD step (frozen teacher forward, student forward and
backward, connectors) from eager fp32 NCHW through channels-last, bf16, its CUDA graph and its compiled
form. Its baseline is the package's own eager fp32 step: there is no separate reference formulation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks.harness import Options, device_peak, log, require, synthetic_views
from benchmarks.ladder import NO_GPU, RowHook, Rung, ladder_notes, run_ladder

DISTILL_CLASSES = 1000  # ImageNet / VIPriors subset
DISTILL_MODULE = ("fastvpd.ofd", "fastvpd.ofd (distillation step)")


@dataclass(frozen=True)
class DistillForm:
    """How one distillation rung computes its step."""

    channels_last: bool = True
    amp: bool = True  # autocast at --amp (GPU only)
    graphed: bool = False
    compiled: bool = False  # the whole DistillNet compiled, as fastvpd.distill with train.compile=true

    def why_not(self, device: torch.device) -> str:
        if device.type == "cuda":
            return ""
        if self.graphed:
            return NO_GPU
        return "bf16 autocast is GPU-only (CPU trains fp32)" if self.amp else ""


def distill_step_for(
    opts: Options, device: torch.device, form: DistillForm, precision: Any = None
) -> Callable[[], Any]:
    """The package's distillation step in `form` (`precision`: as in moco_steps.package_step_for)."""
    ofd = require(*DISTILL_MODULE)
    step_mod = require("fastvpd.step", "fastvpd.step")
    from fastvpd.classifier import Classifier
    from fastvpd.config import DistillConfig, OptimConfig
    from fastvpd.optim import build_sgd

    dc, oc = DistillConfig(), OptimConfig(lr=0.1, nesterov=True, schedule="step")
    small = opts.res <= 32
    torch.manual_seed(0)
    student = Classifier(opts.arch, DISTILL_CLASSES, small)
    teacher = ofd.build_teacher(student.backbone.state_dict(), opts.arch, small)  # self-distillation
    net = ofd.DistillNet(student, teacher, "ofd", dc.teacher_bn, list(dc.stage_weights)).to(device)
    if form.channels_last:
        net = net.to(memory_format=torch.channels_last)
    if form.compiled:
        torch._dynamo.reset()  # (as in moco_steps.package_step_for)
        net.compile()
    lr = torch.tensor(oc.lr * opts.batch / oc.lr_batch, dtype=torch.float32, device=device)
    opt = build_sgd(net.trainable(), oc, lr)
    step_mod.pin_lr(opt, lr)
    if precision is None:
        precision = step_mod.Precision(opts.amp if form.amp and device.type == "cuda" else "none", device)
    meters = step_mod.DeviceMeters(ofd.DISTILL_METRICS, device)
    dtype = precision.dtype or torch.float32
    x, _ = synthetic_views(opts.batch, opts.res, device, dtype, form.channels_last)
    y = torch.randint(0, DISTILL_CLASSES, (opts.batch,), generator=torch.Generator().manual_seed(0))
    y = y.to(device)

    def fn(a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
        return ofd.distill_step(
            net, opt, precision, meters, a, b, lam=dc.lam, smoothing=dc.label_smoothing, distill_on=True
        )

    if form.graphed:
        g = step_mod.GraphedStep(fn, enabled=True, warmup=3, log=log)
        return lambda: g(x, y)
    return lambda: fn(x, y)


def distill_ladder(opts: Options, device: torch.device) -> list[Rung]:
    forms = [
        ("eager fp32 NCHW", DistillForm(channels_last=False, amp=False)),
        ("+ channels-last", DistillForm(amp=False)),
        ("+ bf16 autocast", DistillForm()),
        ("+ CUDA graph", DistillForm(graphed=True)),
    ]
    if opts.compile and device.type == "cuda":
        forms.append(("+ torch.compile + CUDA graph", DistillForm(graphed=True, compiled=True)))
    return [Rung(n, f, f.why_not(device), warmup_extra=4 if f.graphed else 0) for n, f in forms]


def section_distill(opts: Options, device: torch.device, on_row: RowHook | None = None) -> dict[str, Any]:
    require(*DISTILL_MODULE)
    peak, _ = device_peak(device)
    rungs = distill_ladder(opts, device)
    res = run_ladder(rungs, lambda f: distill_step_for(opts, device, f), opts, device, peak, on_row=on_row)
    res["notes"] = ladder_notes(
        res,
        f"student = teacher = {opts.arch} ({DISTILL_CLASSES} classes), OFD on 4 stages, {opts.res} px, "
        f"batch {opts.batch}; speed-up vs eager fp32 NCHW (the package's step, no separate reference)",
    )
    return res

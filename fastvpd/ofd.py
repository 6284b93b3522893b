"""OFD self-distillation (Heo et al. 2019, as the paper's phase 2 uses it) and its training step.

- `OFDDistiller`: what OFD's `Distiller` holds besides the two networks: the trainable 1×1-conv+BN
  connectors (student channels -> teacher channels) and the teacher's per-channel margins;
  `L2Distiller` the pooled-feature L2 baseline (distill.kind=l2).
- `build_teacher`: the frozen teacher backbone.
- `DistillNet` + `distill_step`: teacher forward, student forward/backward, connectors and the optimizer
  update as one pure step (CUDA-graph capturable, like `fastvpd.step.moco_step`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from torch import Tensor

from fastvpd.classifier import Classifier
from fastvpd.config import UserError
from fastvpd.losses import ofd_margin, ofd_partial_l2, smoothed_ce
from fastvpd.models import FeatureTaps, build_backbone, route, routed, stage_bn, stage_channels
from fastvpd.step import DeviceMeters, Precision, bn_snapshot

__all__ = [
    "Connector",
    "OFDDistiller",
    "L2Distiller",
    "DistillNet",
    "DISTILL_METRICS",
    "build_teacher",
    "distill_step",
    "pooled_l2",
]

STAGE_WEIGHTS = (0.125, 0.25, 0.5, 1.0)  # OFD: 1 / 2**(num_stages - i - 1)


class Connector(nn.Sequential):
    """OFD's `build_feature_connector`: 1×1 conv (no bias) + BN mapping student to teacher channels.

    Init as OFD: conv weights N(0, 2/(k·k·out_channels)) = He-normal with fan_out; BN weight 1, bias 0.
    """

    def __init__(self, s_ch: int, t_ch: int) -> None:
        conv = nn.Conv2d(s_ch, t_ch, kernel_size=1, stride=1, padding=0, bias=False)
        bn = nn.BatchNorm2d(t_ch)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.ones_(bn.weight)
        nn.init.zeros_(bn.bias)
        super().__init__(conv, bn)


def pooled_l2(s_pooled: Tensor, t_pooled: Tensor) -> Tensor:
    """Σ (s - t)² / N over pooled features (distill.kind=l2); t is detached. fp32."""
    with torch.autocast(device_type=s_pooled.device.type, enabled=False):
        diff = s_pooled.float() - t_pooled.detach().float()
        return diff.square().sum() / s_pooled.shape[0]


class OFDDistiller(nn.Module):
    """Connectors + margins; forward(s_feats, t_feats) -> Σ_i w_i·partial_l2(conn_i(s_i), t_i, m_i) / N.

    teacher: the teacher backbone (margins are read from its `stage_bn` once, at construction, as OFD
    does); student_channels: the student's `stage_channels`. Margins are buffers `margin{i}` [C_i] so they
    move with `.to()` and are checkpointed. λ is applied by the caller.
    """

    def __init__(
        self,
        teacher: nn.Module,
        student_channels: Sequence[int],
        stage_weights: Sequence[float] = STAGE_WEIGHTS,
    ) -> None:
        super().__init__()
        t_channels = stage_channels(teacher)  # type: ignore[arg-type]
        if len(student_channels) != len(t_channels) or len(stage_weights) != len(t_channels):
            raise ValueError(
                f"need {len(t_channels)} student channels and stage weights "
                f"(got {len(student_channels)} and {len(stage_weights)})"
            )
        self.connectors = nn.ModuleList(Connector(s, t) for s, t in zip(student_channels, t_channels))
        self.stage_weights = tuple(float(w) for w in stage_weights)
        for i, bn in enumerate(stage_bn(teacher)):  # type: ignore[arg-type]
            self.register_buffer(f"margin{i}", ofd_margin(bn.weight, bn.bias).to(bn.weight.device))

    def margins(self) -> list[Tensor]:
        return [getattr(self, f"margin{i}") for i in range(len(self.connectors))]

    def forward(self, s_feats: Sequence[Tensor], t_feats: Sequence[Tensor]) -> Tensor:
        n = s_feats[0].shape[0]
        total = s_feats[0].new_zeros((), dtype=torch.float32)
        for conn, w, s, t, m in zip(self.connectors, self.stage_weights, s_feats, t_feats, self.margins()):
            total = total + w * ofd_partial_l2(conn(s), t.detach(), m)
        return total / n


class L2Distiller(nn.Module):
    """distill.kind=l2: Σ(s - t)²/N between pooled features; a linear connector when the dims differ."""

    def __init__(self, s_dim: int, t_dim: int) -> None:
        super().__init__()
        self.connector: nn.Module = nn.Identity() if s_dim == t_dim else nn.Linear(s_dim, t_dim, bias=False)

    def forward(self, s_pooled: Tensor, t_pooled: Tensor) -> Tensor:
        return pooled_l2(self.connector(s_pooled), t_pooled)


def build_teacher(state: dict[str, Tensor], arch: str, small_stem: bool) -> nn.Module:
    """The frozen teacher backbone: `state` loaded, every parameter requires_grad=False."""
    teacher = build_backbone(arch, small_stem)
    teacher.load_state_dict(state)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


class DistillNet(nn.Module):
    """Student (+ frozen teacher + connectors) for one distillation step.

    kind: ofd | l2 | none. teacher_bn: train keeps the teacher's BN on batch statistics (running stats
    update; the authors' code runs the teacher inside their Distiller in train mode), eval uses its running
    statistics. `.train()` never changes that choice.

    Several processes: `route(student_ddp, distiller_ddp)` makes the forward *call* the DDP wrappers (so
    their reducers see the forward whose backward they all-reduce), while `student`/`distiller`, the module
    tree, `state_dict`, `.train()` and `trainable()` keep the raw modules (checkpoint keys carry no
    `module.`). Two wrappers, not one around the whole net: the connectors take no part in the CE-only
    epochs' loss, and one wrapper would need `find_unused_parameters` (a graph walk every step).
    """

    def __init__(
        self,
        student: Classifier,
        teacher: nn.Module | None,
        kind: str,
        teacher_bn: str = "train",
        stage_weights: Sequence[float] = STAGE_WEIGHTS,
    ) -> None:
        super().__init__()
        if kind != "none" and teacher is None:
            raise UserError(f"distill.kind={kind} needs a teacher: set distill.teacher=PATH")
        self.kind, self.teacher_bn = kind, teacher_bn
        self.student = student
        self.teacher = teacher if kind != "none" else None
        self.distiller: nn.Module | None = None
        if kind == "ofd":
            self.distiller = OFDDistiller(teacher, stage_channels(student.backbone), stage_weights)
        elif kind == "l2":
            self.distiller = L2Distiller(student.backbone.feat_dim, teacher.feat_dim)  # type: ignore[union-attr]
        self.train()

    def train(self, mode: bool = True) -> DistillNet:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.train(mode and self.teacher_bn == "train")
        return self

    def trainable(self) -> list[nn.Parameter]:
        """Student + connector parameters (what the authors' optimizer holds); never the teacher's."""
        mods = [self.student, self.distiller]
        return [p for m in mods if m is not None for p in m.parameters() if p.requires_grad]

    def route(self, student: nn.Module | None, distiller: nn.Module | None = None) -> None:
        """Call `student` / `distiller` (DDP wrappers around the raw modules) in the forward; None restores
        the plain call (`fastvpd.models.route`: outside the module tree, must wrap this net's own module)."""
        route(self, "student", student)
        route(self, "distiller", distiller)

    def forward(self, x: Tensor, distill_on: bool) -> tuple[Tensor, Tensor]:
        """(logits, distillation term already divided by N; exactly 0 when off).

        Before the distillation starts (`distill_on=False`) the teacher and the connectors still run
        forward, as in the authors' code, where their Distiller computes the term every step and the loss
        leaves it out: in training mode their BN running statistics keep moving. Here that forward runs
        without a graph (nothing of it reaches the loss) on the raw connectors (no DDP wrapper: nothing to
        all-reduce), and the term is not returned.
        """
        student = routed(self, "student")
        if self.kind == "none":
            logits = student(x)
            return logits, logits.new_zeros((), dtype=torch.float32)
        with torch.no_grad():
            t_feats, t_pooled = FeatureTaps(self.teacher)(x)  # type: ignore[arg-type]
        s_feats, s_pooled, logits = student(x, taps=True)
        if not distill_on:
            with torch.no_grad():  # for the connectors' BN statistics only
                self._term(self.distiller, s_feats, s_pooled, t_feats, t_pooled)
            return logits, logits.new_zeros((), dtype=torch.float32)
        return logits, self._term(routed(self, "distiller"), s_feats, s_pooled, t_feats, t_pooled)

    def _term(
        self, distiller: nn.Module | None, s_feats: Sequence[Tensor], s_pooled: Tensor,
        t_feats: Sequence[Tensor], t_pooled: Tensor,
    ) -> Tensor:  # fmt: skip
        if self.kind == "ofd":
            return distiller(s_feats, t_feats)  # type: ignore[misc]
        return distiller(s_pooled, t_pooled)  # type: ignore[misc]


DISTILL_METRICS = ["loss", "ce", "distill", "top1"]


def distill_step(
    net: DistillNet,
    optimizer: torch.optim.Optimizer,
    precision: Precision,
    meters: DeviceMeters,
    x: Tensor,
    y: Tensor,
    lam: float = 1e-4,
    smoothing: float = 0.1,
    distill_on: bool = True,
    skip_nonfinite: bool = False,
) -> dict[str, Tensor]:
    """loss = smoothed_ce(student(x), y) + λ·distill; backward; SGD. Metrics `DISTILL_METRICS` on device.

    `distill_on` is a Python bool, so each phase is its own (graph-capturable) function: before
    `distill.start_epoch` the term is not in the loss (the loss is the CE alone, the connectors get no
    gradient and no weight decay, as in the authors' code where they are absent from that loss; teacher
    and connectors still run forward, see `DistillNet.forward`).
    """
    optimizer.zero_grad(set_to_none=True)
    restore_bn = bn_snapshot(net, skip_nonfinite)
    with precision.autocast():
        logits, dterm = net(x, distill_on)
        ce = smoothed_ce(logits, y, smoothing)
        loss = ce + lam * dterm if distill_on and net.kind != "none" else ce
    if not precision.backward_step(loss, optimizer, skip_nonfinite):
        restore_bn()
    top1 = (logits.detach().argmax(dim=1) == y).float().mean() * 100.0
    metrics = {
        "loss": loss.detach().float(),
        "ce": ce.detach().float(),
        "distill": dterm.detach().float(),
        "top1": top1,
    }
    meters.accumulate(metrics)
    return metrics

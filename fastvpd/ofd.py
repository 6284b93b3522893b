"""OFD distillation pieces (Heo et al. 2019, as used by the paper's self-distillation stage).

`OFDDistiller` holds what OFD's `Distiller` holds besides the two networks: the trainable 1×1-conv+BN
connectors (student channels -> teacher channels) and the teacher's per-channel margins. The caller runs
both networks through `fastvpd.models.FeatureTaps` and multiplies the returned loss by λ.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from torch import Tensor

from fastvpd.losses import ofd_margin, ofd_partial_l2
from fastvpd.models import stage_bn, stage_channels

__all__ = ["Connector", "OFDDistiller", "pooled_l2"]

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

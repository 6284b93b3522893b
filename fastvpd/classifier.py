"""`Classifier`: a torchvision ResNet backbone (pooled features) + a linear layer.

The model that distillation and the linear probe train, that `fastvpd.evaluate` rebuilds from a run
checkpoint (`fastvpd.checkpoint.load_classifier`) and that `fastvpd.export` writes out with torchvision key
names (`backbone.X` -> `X`, `fc.*` as is).
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn
from torch import Tensor

from fastvpd.models import FeatureTaps, build_backbone

__all__ = ["Classifier"]


class Classifier(nn.Module):
    """backbone (pooled features) + a linear classifier.

    forward(x) -> logits; forward(x, taps=True) -> (stage feats, pooled, logits) where the stage feats are
    the four pre-ReLU stage outputs OFD distils (`FeatureTaps`; same numbers as the plain forward).
    """

    def __init__(self, arch: str, num_classes: int, small_stem: bool = False) -> None:
        super().__init__()
        arch = str(getattr(arch, "value", arch))  # a config choice (an Enum): its plain name
        self.arch, self.small_stem, self.num_classes = arch, bool(small_stem), int(num_classes)
        self.backbone = build_backbone(arch, self.small_stem)
        self.fc = nn.Linear(self.backbone.feat_dim, num_classes)

    def forward(self, x: Tensor, taps: bool = False) -> Any:
        if not taps:
            return self.fc(self.backbone(x))
        feats, pooled = FeatureTaps(self.backbone)(x)  # a view over self.backbone, nothing copied
        return feats, pooled, self.fc(pooled)

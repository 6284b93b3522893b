"""Weighted kNN monitor (InstDisc, Wu et al. 2018; the MoCo colab's `knn_predict`).

Each query votes with its k nearest bank features (cosine similarity s), weight exp(s / t), summed per
class. Features are L2-normalised here; queries are processed in chunks so the similarity matrix stays
`chunk × M` regardless of the query count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["knn_predict", "knn_accuracy"]


@torch.no_grad()
def knn_predict(
    feats: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    num_classes: int,
    k: int = 200,
    t: float = 0.1,
    chunk: int = 1024,
) -> Tensor:
    """Class ranking per query (best first): feats B×C, bank M×C, bank_labels int64[M] -> B×num_classes."""
    bank = F.normalize(bank.float(), dim=1)
    labels = bank_labels.to(bank.device, torch.long)
    k = min(k, bank.shape[0])
    out = []
    for start in range(0, feats.shape[0], chunk):
        f = F.normalize(feats[start : start + chunk].to(bank.device).float(), dim=1)
        sim = f @ bank.t()  # sim: BxM
        sim_w, sim_idx = sim.topk(k, dim=1)  # Bxk
        weight = (sim_w / t).exp()
        scores = torch.zeros(f.shape[0], num_classes, device=bank.device)
        scores.scatter_add_(1, labels[sim_idx], weight)  # scores: Bx(num_classes)
        out.append(scores.argsort(dim=1, descending=True))
    if not out:
        return torch.empty(0, num_classes, dtype=torch.long, device=bank.device)
    return torch.cat(out)


@torch.no_grad()
def knn_accuracy(
    feats: Tensor,
    labels: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    num_classes: int,
    k: int = 200,
    t: float = 0.1,
    chunk: int = 1024,
) -> float:
    """Top-1 kNN accuracy in percent (one host read at the end)."""
    if feats.shape[0] == 0:
        return 0.0
    pred = knn_predict(feats, bank, bank_labels, num_classes, k, t, chunk)[:, 0]
    return float((pred == labels.to(pred.device)).float().mean().item() * 100.0)

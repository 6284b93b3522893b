"""Weighted kNN monitor."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastvpd.knn import knn_accuracy, knn_predict


def _moco_colab_knn_predict(feature, feature_bank, feature_labels, classes, knn_k, knn_t):  # type: ignore[no-untyped-def]
    """The MoCo colab's knn_predict (bank stored D×N there), for comparison."""
    sim_matrix = torch.mm(feature, feature_bank)
    sim_weight, sim_indices = sim_matrix.topk(k=knn_k, dim=-1)
    sim_labels = torch.gather(feature_labels.expand(feature.size(0), -1), dim=-1, index=sim_indices)
    sim_weight = (sim_weight / knn_t).exp()
    one_hot = torch.zeros(feature.size(0) * knn_k, classes).scatter(-1, sim_labels.view(-1, 1), 1.0)
    scores = torch.sum(one_hot.view(feature.size(0), -1, classes) * sim_weight.unsqueeze(-1), dim=1)
    return scores.argsort(dim=-1, descending=True)


def _around(centres: torch.Tensor, n_per: int, noise: float, gen: torch.Generator):  # type: ignore[no-untyped-def]
    labels = torch.arange(len(centres)).repeat_interleave(n_per)
    return centres[labels] + noise * torch.randn(len(labels), centres.shape[1], generator=gen), labels


def test_separable_clusters_are_classified_perfectly() -> None:
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(5, 32, generator=g), dim=1)
    bank, bank_labels = _around(centres, 50, 0.05, g)
    feats, labels = _around(centres, 20, 0.05, g)
    feats = feats * 3.0  # unnormalised queries: knn normalises them
    assert knn_accuracy(feats, labels, bank, bank_labels, 5, k=20, t=0.1) == pytest.approx(100.0)


def test_random_features_give_chance_accuracy() -> None:
    g = torch.Generator().manual_seed(1)
    bank, bank_labels = torch.randn(3000, 16, generator=g), torch.randint(0, 10, (3000,), generator=g)
    feats, labels = torch.randn(2000, 16, generator=g), torch.randint(0, 10, (2000,), generator=g)
    acc = knn_accuracy(feats, labels, bank, bank_labels, 10, k=50, t=0.1)
    assert 6.0 < acc < 14.0


def test_matches_moco_colab_reference_and_is_chunk_invariant() -> None:
    g = torch.Generator().manual_seed(2)
    bank = F.normalize(torch.randn(300, 8, generator=g), dim=1)
    bank_labels = torch.randint(0, 7, (300,), generator=g)
    feats = F.normalize(torch.randn(40, 8, generator=g), dim=1)
    ref = _moco_colab_knn_predict(feats, bank.t(), bank_labels, 7, 25, 0.1)
    got = knn_predict(feats, bank, bank_labels, 7, k=25, t=0.1)
    assert got.shape == (40, 7) and torch.equal(got[:, 0], ref[:, 0])
    assert torch.equal(knn_predict(feats, bank, bank_labels, 7, k=25, t=0.1, chunk=7), got)
    assert knn_predict(feats, bank[:10], bank_labels[:10], 7, k=200).shape == (40, 7)  # k clipped to the bank

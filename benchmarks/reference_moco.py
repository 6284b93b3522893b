"""The reference MoCo v2 formulation the step ladder is measured against.

A re-implementation (our own code) of the formulation of facebookresearch/moco `moco/builder.py` as run by
its `main_moco.py` training loop, on one device, with the VIPriors margin on the positive logit:

- eager fp32, NCHW (no autocast, no channels-last, no graphs);
- key encoder momentum update as a Python loop over parameters,
  `p_k.data = p_k.data * m + p_q.data * (1 - m)`,
  done inside `forward` *before* the key forward;
- `_batch_shuffle_single_gpu`: a fresh `randperm` of the key batch and its `argsort` to undo it;
- negatives from `queue.clone().detach()`; the queue is [dim, K] as in builder.py;
- `_dequeue_and_enqueue` reads the pointer with `int(queue_ptr)` (a host sync every step);
- `main_moco.py`'s loop: `CrossEntropyLoss`, `zero_grad / backward / step`, per-step top-1/top-5 accuracy and
  `loss.item()` for its AverageMeters (one more host sync).

The encoders are passed in (`from_moco` copies the package's), so the ladder compares *formulations* of the
same network: any speed-up is the step's doing, not a different model. Mathematically the two agree: the
reference updates the key encoder at the start of step t with the query weights after step t-1; the package
does the same update at the end of step t-1. `tests/test_benchmarks.py` checks this equality.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class ReferenceMoCo(nn.Module):
    """builder.py's MoCo: query/key encoders, a [dim, K] queue, momentum `m`, temperature `T`, margin."""

    def __init__(
        self,
        encoder_q: nn.Module,
        encoder_k: nn.Module | None = None,
        dim: int = 128,
        K: int = 4096,
        m: float = 0.999,
        T: float = 0.2,
        margin: float = 0.0,
    ) -> None:
        super().__init__()
        self.K, self.m, self.T, self.margin = K, m, T, margin
        self.encoder_q = encoder_q
        self.encoder_k = encoder_k if encoder_k is not None else copy.deepcopy(encoder_q)
        if encoder_k is None:
            for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
                param_k.data.copy_(param_q.data)
        for param_k in self.encoder_k.parameters():
            param_k.requires_grad = False
        self.register_buffer("queue", F.normalize(torch.randn(dim, K), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @classmethod
    def from_moco(cls, moco: nn.Module, m: float, T: float, margin: float) -> ReferenceMoCo:
        """A reference copy of a `fastvpd.moco.MoCo`: same encoder weights and BN state, queue and pointer."""
        ref = cls(copy.deepcopy(moco.encoder_q), copy.deepcopy(moco.encoder_k), 1, 1, m, T, margin)
        queue = moco.queue.detach()  # package layout [K, C]
        ref.K = queue.shape[0]
        ref.queue = queue.t().contiguous().clone().float()
        ref.queue_ptr = moco.queue_ptr.detach().reshape(1).clone().long()
        return ref

    @torch.no_grad()
    def _momentum_update_key_encoder(self) -> None:
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data = param_k.data * self.m + param_q.data * (1.0 - self.m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        batch_size = keys.shape[0]
        ptr = int(self.queue_ptr)  # host sync, as in builder.py
        assert self.K % batch_size == 0  # for simplicity, as in builder.py
        self.queue[:, ptr : ptr + batch_size] = keys.T
        ptr = (ptr + batch_size) % self.K
        self.queue_ptr[0] = ptr

    @torch.no_grad()
    def _batch_shuffle_single_gpu(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx_shuffle = torch.randperm(x.shape[0], device=x.device)
        idx_unshuffle = torch.argsort(idx_shuffle)
        return x[idx_shuffle], idx_unshuffle

    @torch.no_grad()
    def _batch_unshuffle_single_gpu(self, x: torch.Tensor, idx_unshuffle: torch.Tensor) -> torch.Tensor:
        return x[idx_unshuffle]

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [N, 1+K] (positive first, margin subtracted, over T) and zero labels; enqueues keys."""
        q = nn.functional.normalize(self.encoder_q(im_q), dim=1)
        with torch.no_grad():
            self._momentum_update_key_encoder()
            im_k, idx_unshuffle = self._batch_shuffle_single_gpu(im_k)
            k = nn.functional.normalize(self.encoder_k(im_k), dim=1)
            k = self._batch_unshuffle_single_gpu(k, idx_unshuffle)
        l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", [q, self.queue.clone().detach()])
        logits = torch.cat([l_pos - self.margin, l_neg], dim=1) / self.T
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        self._dequeue_and_enqueue(k)
        return logits, labels


def accuracy(output: torch.Tensor, target: torch.Tensor, topk: tuple[int, ...] = (1,)) -> list[torch.Tensor]:
    """main_moco.py's top-k accuracy (percent), used by its per-step meters."""
    with torch.no_grad():
        maxk = max(topk)
        batch_size = target.size(0)
        _, pred = output.topk(maxk, 1, True, True)
        pred = pred.t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        return [correct[:k].reshape(-1).float().sum(0, keepdim=True).mul_(100.0 / batch_size) for k in topk]


def build_optimizer(model: ReferenceMoCo, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """main_moco.py's optimiser: plain SGD over the query encoder (the key encoder has no grads)."""
    return torch.optim.SGD(model.parameters(), lr, momentum=momentum, weight_decay=weight_decay)


def reference_step(
    model: ReferenceMoCo,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    im_q: torch.Tensor,
    im_k: torch.Tensor,
    meters: bool = True,
) -> dict[str, Any]:
    """One iteration of main_moco.py's `train()` loop body (without data loading)."""
    output, target = model(im_q, im_k)
    loss = criterion(output, target)
    out: dict[str, Any] = {"loss": loss}
    if meters:  # main_moco.py: losses.update(loss.item(), ...) syncs; top1.update(acc1[0], ...) stays lazy
        acc1, acc5 = accuracy(output, target, topk=(1, min(5, output.shape[1])))
        out.update(loss=loss.item(), acc1=acc1[0], acc5=acc5[0])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return out

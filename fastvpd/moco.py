"""MoCo v2 with a margin (the paper's teacher), in the style of facebookresearch/moco `builder.py`.

Differences from builder.py, all for speed without changing the maths:
- the queue is stored K×C (rows are keys) and written with one `index_copy_` at `(ptr + arange(N)) % K`,
  so any N ≤ K works and the pointer never leaves the device (no `int(queue_ptr)` sync);
- the key encoder is updated with one `_foreach_lerp_` over all parameters (MoCo updates parameters
  only; BN running statistics of the key encoder are its own, as in MoCo);
- no side effects in `forward`: the step calls `momentum_update_()` and `enqueue_()` explicitly.
Everything in `query`/`key`/`loss`/`momentum_update_`/`enqueue_` is CUDA-graph capturable on one process
(no `.item()`, no branching on tensor values, allocations depend on shapes only).
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as tdist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fastvpd import dist
from fastvpd.losses import margin_info_nce
from fastvpd.models import MLPHead, build_backbone, convert_split_bn, route, routed

__all__ = ["Encoder", "MoCo"]


class Encoder(nn.Module):
    """backbone (pooled features) followed by the projection head."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


class MoCo(nn.Module):
    """Query/key encoders, the negative queue and the margin InfoNCE loss.

    encoder_k is a deep copy of encoder_q with `requires_grad=False`; buffers: `queue` [K, C] (random unit
    rows, fp32) and `queue_ptr` (0-d int64). bn_splits > 1 swaps every BatchNorm2d for MoCo's split-BN
    (single-device shuffle-BN, see `SplitBatchNorm`); with several processes pass bn_splits=1 and `key`
    shuffles across them.
    """

    def __init__(
        self,
        arch: str,
        dim: int = 128,
        mlp_hidden: int = 2048,
        queue_size: int = 4096,
        momentum: float = 0.999,
        temperature: float = 0.2,
        margin: float = 0.4,
        bn_splits: int = 8,
        small_stem: bool = False,
    ) -> None:
        super().__init__()
        self.dim, self.queue_size = dim, queue_size
        self.momentum, self.temperature, self.margin = momentum, temperature, margin
        self.bn_splits = bn_splits
        backbone = convert_split_bn(build_backbone(arch, small_stem=small_stem), bn_splits)
        self.encoder_q = Encoder(backbone, MLPHead(backbone.feat_dim, mlp_hidden, dim))
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for p in self.encoder_k.parameters():
            p.requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))  # queue: KxC
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        # Indices 0..K-1 for enqueue_, allocated once (not saved: it is a constant).
        self.register_buffer("_arange", torch.arange(queue_size, dtype=torch.long), persistent=False)

    def route_query(self, wrapper: nn.Module | None) -> None:
        """Run the query encoder through `wrapper` (a DDP around `encoder_q`); None restores the plain call.

        The module tree (state_dict, checkpoints, `encoders()`) keeps the raw encoder either way.
        """
        route(self, "encoder_q", wrapper)

    def query(self, x: Tensor) -> Tensor:
        """q = normalize(f_q(x)); x: Nx3xHxW -> q: NxC."""
        return F.normalize(routed(self, "encoder_q")(x), dim=1)

    @torch.no_grad()
    def key(self, x: Tensor) -> Tensor:
        """k = normalize(f_k(x)) without gradient, with the batch shuffled for BN and unshuffled after.

        Several processes: MoCo's shuffle-BN (all-gather, a permutation broadcast from rank 0, forward this
        rank's slice, gather back and unshuffle). One process with split-BN: the batch is permuted on the
        device (argsort of uniform noise, graph-safe) so each BN group of keys mixes samples differently from
        the query's groups, as MoCo's colab does. One process with plain BN: no shuffle is needed.
        """
        world = dist.world_size()
        if world > 1:
            return self._key_shuffled_ddp(x, world)
        if self.bn_splits > 1:
            perm = torch.argsort(torch.rand(x.shape[0], device=x.device))
            k = F.normalize(self.encoder_k(x.index_select(0, perm)), dim=1)
            return torch.empty_like(k).index_copy_(0, perm, k)  # k[perm[i]] = k_shuffled[i]
        return F.normalize(self.encoder_k(x), dim=1)

    def _key_shuffled_ddp(self, x: Tensor, world: int) -> Tensor:
        n = x.shape[0]
        x_all = dist.gather(x)
        perm = torch.randperm(x_all.shape[0], device=x.device)
        tdist.broadcast(perm, src=0)
        rank = dist.info().rank
        idx_this = perm.view(world, n)[rank]
        k = F.normalize(self.encoder_k(x_all.index_select(0, idx_this)), dim=1)
        k_all = dist.gather(k)  # k_all[j] = key of sample perm[j]
        unshuffle = torch.argsort(perm)
        return k_all.index_select(0, unshuffle.view(world, n)[rank])

    def loss(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """margin InfoNCE against the current queue -> (loss, logits Nx(1+K)).

        No clone of the queue (MoCo's `self.queue.clone().detach()`): the step enqueues after `backward`,
        and autograd's version counter turns an enqueue before `backward` into a loud error, not a wrong
        gradient.
        """
        return margin_info_nce(q, k, self.queue, self.temperature, self.margin)

    def forward(self, im_q: Tensor, im_k: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(loss, logits, k) for a pair of views; no momentum update and no enqueue (the step does those)."""
        q = self.query(im_q)
        k = self.key(im_k)
        loss, logits = self.loss(q, k)
        return loss, logits, k

    @torch.no_grad()
    def momentum_update_(self) -> None:
        """f_k ← m·f_k + (1-m)·f_q over parameters (one fused foreach lerp; buffers untouched, as MoCo)."""
        pk = list(self.encoder_k.parameters())
        pq = [p.detach() for p in self.encoder_q.parameters()]
        torch._foreach_lerp_(pk, pq, 1.0 - self.momentum)

    @torch.no_grad()
    def enqueue_(self, keys: Tensor) -> None:
        """Write keys (all-gathered across processes) at the queue pointer, wrapping around; no host sync."""
        keys = dist.gather(keys.detach())
        n, k = keys.shape[0], self.queue_size
        if n > k:
            raise ValueError(f"cannot enqueue {n} keys into a queue of {k}: raise moco.queue_size")
        idx = torch.remainder(self.queue_ptr + self._arange[:n], k)
        self.queue.index_copy_(0, idx, keys.to(self.queue.dtype))
        self.queue_ptr.copy_(torch.remainder(self.queue_ptr + n, k))

    def encoders(self) -> nn.Module:
        """The query backbone (what the paper keeps: the teacher / the student's initialisation)."""
        return self.encoder_q.backbone

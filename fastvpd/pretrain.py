"""MoCo v2 (+ margin) pretraining: `python -m fastvpd.pretrain --config configs/X.yaml key=value ...`.

Several processes: `torchrun --nproc_per_node=G -m fastvpd.pretrain ...` (train.batch_size is the global
batch, split over ranks; DDP on the query encoder only; keys all-gathered before the enqueue; MoCo's
cross-process shuffle-BN replaces split-BN; rank 0 logs and checkpoints).

Reads top to bottom: config → data → model → optimizer → Task (the step + the kNN monitor) → engine.fit.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from fastvpd import config, dist, engine
from fastvpd.data import render_then, views_in_step
from fastvpd.knn import knn_accuracy
from fastvpd.moco import MoCo
from fastvpd.models import adapt_stem
from fastvpd.optim import base_lr, build_sgd
from fastvpd.step import MOCO_METRICS, DeviceMeters, GraphedStep, Precision, moco_step, pin_lr, setup_backends


class MocoTask:
    """The engine's Task for MoCo: a (graphed) `moco_step` per batch, a kNN monitor as evaluation.

    `model` is the plain MoCo module (its state_dict keys never carry a DDP prefix); with several
    processes `model.query` runs through a DDP wrapper (`MoCo.route_query`). With the cache backend the
    step also renders the two views from the batch's indices (`data.aug_in_step`), inside the graph.
    """

    def __init__(
        self,
        cfg: Any,
        model: MoCo,
        optimizer: torch.optim.Optimizer,
        precision: Precision,
        lr: float,
        eval_loaders: tuple[Any, Any] | None,
        say: Any,
        loader: Any,
    ) -> None:
        info = dist.info()
        self.cfg, self.model, self.optimizer, self.precision = cfg, model, optimizer, precision
        self.eval_loaders = eval_loaders
        self.meters = DeviceMeters(MOCO_METRICS, info.device)
        self.lr = torch.tensor(lr, dtype=torch.float32, device=info.device)
        pin_lr(optimizer, self.lr)
        skip = cfg.train.on_nonfinite == "skip"
        why = (
            ""
            if info.device.type != "cuda" or not cfg.train.cuda_graph
            else "train.on_nonfinite=skip syncs every step"
            if skip
            else "fp16 GradScaler syncs every step"
            if not precision.graphable
            else ""
        )
        key_stream = None
        if cfg.moco.overlap_key:
            if info.device.type == "cuda" and not info.distributed:
                key_stream = torch.cuda.Stream(info.device)
                say(
                    "moco.overlap_key: the key encoder runs on a second CUDA stream, beside the query forward"
                )
            else:
                say("moco.overlap_key needs one CUDA device in one process: the key encoder runs in sequence")
        fn = functools.partial(
            moco_step, model, optimizer, precision, self.meters, skip_nonfinite=skip, key_stream=key_stream
        )
        self.loader = loader
        self.in_step = views_in_step(cfg.data, loader, say)
        if self.in_step:
            fn = functools.partial(render_then, loader, fn, 2)
        self.step = GraphedStep(
            fn,
            enabled=cfg.train.cuda_graph and not why and info.device.type == "cuda",
            warmup=11 if info.distributed else 3,
            log=say,
            why_disabled=why,
            generators=loader.generators if self.in_step else (),
        )

    def train_step(self, batch: Any) -> None:
        if self.in_step:
            self.loader.seed_views(batch)  # host side; a replay reads the generator's seed
            self.step(batch.indices)
        else:
            self.step(batch.views[0], batch.views[1])

    def set_lr(self, lr: float) -> None:
        self.lr.fill_(lr)

    @torch.no_grad()
    def _features(self, loader: Any) -> tuple[torch.Tensor, torch.Tensor]:
        backbone = self.model.encoder_q.backbone
        feats, labels = [], []
        loader.set_epoch(0)
        for b in loader:
            with self.precision.autocast():
                feats.append(F.normalize(backbone(b.views[0]).float(), dim=1))
            labels.append(b.labels)
        return torch.cat(feats), torch.cat(labels)

    def evaluate(self, epoch: int) -> dict[str, float]:
        """kNN top-1 (k=eval.knn_k, T=eval.knn_t) of val images against the train split's backbone
        features (eval transform, BN in eval mode); main rank only."""
        if self.eval_loaders is None:
            return {}
        self.model.eval()
        try:
            bank, bank_labels = self._features(self.eval_loaders[0])
            val, val_labels = self._features(self.eval_loaders[1])
            top1 = knn_accuracy(
                val,
                val_labels,
                bank,
                bank_labels,
                self.eval_loaders[0].num_classes,
                k=self.cfg.eval.knn_k,
                t=self.cfg.eval.knn_t,
            )
        finally:
            self.model.train()
        return {"knn_top1": top1}

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "precision": self.precision.state_dict(),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.model.load_state_dict(sd["model"])
        self.optimizer.load_state_dict(sd["optimizer"])
        pin_lr(self.optimizer, self.lr)  # load_state_dict replaced the groups' lr tensor
        self.precision.load_state_dict(sd["precision"])


def _route_query_through_ddp(model: MoCo, device: torch.device) -> None:
    """Gradients of the query encoder are all-reduced by DDP; the module tree (checkpoints, momentum
    update, export) keeps the raw encoder."""
    ids = [device] if device.type == "cuda" else None
    model.route_query(DDP(model.encoder_q, device_ids=ids, broadcast_buffers=False))


def build(cfg: Any, say: Any = print) -> tuple[MocoTask, Any, Any]:
    """Everything `fit` needs: (task, train loader, schedule)."""
    prep = engine.prepare(cfg)
    info, precision, loader = prep.info, prep.precision, prep.loader
    eval_loaders = None
    if info.is_main and cfg.eval.knn_every > 0:
        eval_loaders = tuple(
            prep.eval_loader(cfg, split) for split in (cfg.data.train_split, cfg.data.val_split)
        )
    m = cfg.moco
    bn_splits = m.bn_splits if info.world_size == 1 else 1  # shuffle-BN across processes replaces it
    torch.manual_seed(cfg.train.seed)  # identical initial weights and queue on every rank
    model = MoCo(
        cfg.model.arch,
        m.dim,
        m.mlp_hidden,
        m.queue_size,
        m.momentum,
        m.temperature,
        m.margin,
        bn_splits,
        cfg.model.small_stem,
        m.split_bn,
    ).to(info.device)
    adapt_stem(model, cfg.model.stem_channels, cfg.model.stem_impl)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    setup_backends(cfg.train.seed, cfg.train.deterministic, info.device, info.rank)
    lr = base_lr(cfg.optim, cfg.train.batch_size)
    optimizer = build_sgd(
        model.encoder_q.parameters(), cfg.optim, torch.tensor(lr, dtype=torch.float32, device=info.device)
    )
    if cfg.train.compile:
        for enc in (model.encoder_q, model.encoder_k):
            enc.compile()
        say("torch.compile: query and key encoders compiled (first steps are slow)")
    if info.distributed:
        _route_query_through_ddp(model, info.device)
    task = MocoTask(cfg, model, optimizer, precision, lr, eval_loaders, say, loader)
    return task, loader, engine.schedule_for(cfg, loader, lr)


def run(argv: list[str] | None = None) -> engine.FitResult:
    """Run (or resume) a pretraining; returns fit's result (run_dir, how it stopped, last checkpoint).

    For callers in the same process (the demo), which must tell a finished run from one stopped by a
    signal; the command line uses `main`.
    """
    cfg = config.load(config.PretrainRun, argv)
    return engine.launch("pretrain", cfg, build, eval_every=cfg.eval.knn_every, best_key="knn_top1")


@config.main_guard
def main(argv: list[str] | None = None) -> Path:
    """Run (or resume) a pretraining; returns the run directory."""
    return run(argv).run_dir


if __name__ == "__main__":
    main()

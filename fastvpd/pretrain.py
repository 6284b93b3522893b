"""MoCo v2 (+ margin) pretraining: `python -m fastvpd.pretrain --config RECIPE key=value ...` (`--help` lists
the keys), or from Python `fastvpd.pretrain.run(...)`.

Several processes: `torchrun --nproc_per_node=G -m fastvpd.pretrain ...` (train.batch_size is the global
batch, split over ranks; DDP on the query encoder only; keys all-gathered before the enqueue; MoCo's
cross-process shuffle-BN replaces split-BN; rank 0 logs and checkpoints).

Reads top to bottom: config → data → model → optimizer → Task (the step + the kNN monitor) → engine.fit.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from fastvpd import config, dist, engine
from fastvpd.data import render_then, views_in_step
from fastvpd.data.manifest import Manifest
from fastvpd.knn import knn_accuracy
from fastvpd.moco import MoCo
from fastvpd.optim import base_lr, build_sgd
from fastvpd.step import MOCO_METRICS, DeviceMeters, GraphedStep, Precision, moco_step, pin_lr, setup_backends

KNN_T = 0.1  # the kNN monitor's vote temperature (exp(similarity / T) weights), as MoCo's monitor uses


class MocoTask:
    """The engine's Task for MoCo: a (graphed) `moco_step` per batch, a kNN monitor as evaluation.

    `model` is the plain MoCo module (its state_dict keys never carry a DDP prefix); with several
    processes `model.query` runs through a DDP wrapper (`MoCo.route_query`). With the cache backend the
    step also renders the two views from the batch's indices, inside the graph. With one CUDA device in one
    process the key encoder (momentum update and forward) runs on a second CUDA stream, beside the query
    forward.
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
        if info.device.type == "cuda" and not info.distributed:
            key_stream = torch.cuda.Stream(info.device)
            say("the key encoder runs on a second CUDA stream, beside the query forward")
        fn = functools.partial(
            moco_step, model, optimizer, precision, self.meters, skip_nonfinite=skip, key_stream=key_stream
        )
        self.loader = loader
        self.in_step = views_in_step(loader, say)
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
        """kNN top-1 (k=eval.knn_k, T=KNN_T) of val images against the train split's backbone
        features (eval transform, BN in eval mode); main rank only."""
        if self.eval_loaders is None:
            return {}
        self.model.eval()
        try:
            bank_loader, val_loader = self.eval_loaders
            if bank_loader is None:  # unlabelled train split: val's even samples are the bank, odd queries
                feats, labels = self._features(val_loader)
                bank, bank_labels, val, val_labels = feats[0::2], labels[0::2], feats[1::2], labels[1::2]
            else:
                bank, bank_labels = self._features(bank_loader)
                val, val_labels = self._features(val_loader)
            top1 = knn_accuracy(
                val,
                val_labels,
                bank,
                bank_labels,
                val_loader.num_classes,
                k=self.cfg.eval.knn_k,
                t=KNN_T,
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


def _knn_loaders(cfg: Any, prep: Any, say: Any) -> tuple[Any, Any] | None:
    """(bank, query) loaders of the kNN monitor: train and val when both carry labels; (None, val) when
    the train split is unlabelled (half of val is the bank); None (said once) without a labelled val."""
    manifest = Manifest.load(cfg.data.root)
    val = cfg.data.val_split
    if val not in manifest.splits or not manifest.labelled(val):
        say(f"kNN monitor off: {cfg.data.root} has no labelled split {val!r} (data.val_split)")
        return None
    if not manifest.labelled(config.TRAIN_SPLIT):
        say(f"kNN monitor: the train split has no labels, so half of {val!r} is the bank, half the queries")
        return None, prep.eval_loader(cfg, val)
    return prep.eval_loader(cfg, config.TRAIN_SPLIT), prep.eval_loader(cfg, val)


def build(cfg: Any, say: Any = print) -> tuple[MocoTask, Any, Any]:
    """Everything `fit` needs: (task, train loader, schedule)."""
    prep = engine.prepare(cfg)
    info, precision, loader = prep.info, prep.precision, prep.loader
    eval_loaders = None
    if info.is_main and cfg.eval.knn_every > 0:
        eval_loaders = _knn_loaders(cfg, prep, say)
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
    ).to(info.device, memory_format=torch.channels_last)
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


def run(cfg: Any = None, argv: list[str] | None = None) -> engine.FitResult:
    """Run (or resume) a pretraining from Python; returns its result: `run_dir`, `last_checkpoint`,
    `metrics` (the last training means and kNN top-1), `stopped` (done, max_steps or a signal's name).

    `cfg`: a `config.PretrainRun` (dataclass or OmegaConf), a mapping of overrides ({"train.epochs": 2}),
    or a list of command-line arguments; `argv` (e.g. ["--config", "demo_digits_pretrain"]) is applied
    first, a mapping on top of it. Mistakes raise `config.ConfigError` / `config.UserError`.
    """
    cfg = config.resolve(config.PretrainRun, cfg, argv)
    return engine.launch("pretrain", cfg, build, eval_every=cfg.eval.knn_every, best_key="knn_top1")


@config.main_guard
def main(argv: list[str] | None = None) -> Path:
    """The command line: run (or resume) a pretraining; returns the run directory."""
    return run(argv=sys.argv[1:] if argv is None else argv).run_dir


if __name__ == "__main__":
    main()

"""Linear probe (MoCo's `main_lincls.py` protocol): `python -m fastvpd.linear linear.backbone=CKPT ...`
(`--help` lists the keys), or from Python `fastvpd.linear.run(...)`.

The backbone comes from a pretraining checkpoint (the MoCo query encoder; `linear.backbone` names the
file), is frozen and kept in eval mode (BN on running statistics); only a new fc (init N(0, 0.01), bias 0)
is trained, with plain cross-entropy and SGD lr 30, no weight decay, ×0.1 at epochs 60 and 80 of 100
(LinearRun's defaults). Validation top-1/top-5 every `eval.every` epochs; checkpoints hold the whole
classifier, so `python -m fastvpd.evaluate` reads them like distillation checkpoints.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel as DDP

from fastvpd import config, dist, engine
from fastvpd.checkpoint import backbone_state, classifier_record, read_state
from fastvpd.classifier import Classifier
from fastvpd.config import UserError
from fastvpd.data.spec import eval_crop
from fastvpd.evaluate import evaluate_top
from fastvpd.models import route, routed
from fastvpd.optim import base_lr, build_sgd
from fastvpd.step import DeviceMeters, GraphedStep, Precision, pin_lr, setup_backends

LINEAR_METRICS = ["loss", "top1"]


class FrozenClassifier(Classifier):
    """A Classifier whose backbone is frozen and stays in eval mode whatever `.train()` is called with.

    Several processes: `route_fc(ddp)` makes the training path (`head`) call a DDP wrapper around `fc`, so
    the fc gradients are all-reduced; `fc`, the module tree and `state_dict` keep the raw layer (checkpoint
    keys carry no `module.`), and the plain forward (evaluation, no gradient) calls it directly.
    """

    def __init__(self, arch: str, num_classes: int, small_stem: bool = False) -> None:
        super().__init__(arch, num_classes, small_stem)
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        nn.init.normal_(self.fc.weight, mean=0.0, std=0.01)  # main_lincls.py's fc init
        nn.init.zeros_(self.fc.bias)
        self.train()

    def train(self, mode: bool = True) -> FrozenClassifier:
        super().train(mode)
        self.backbone.eval()
        return self

    def route_fc(self, wrapper: nn.Module | None) -> None:
        """Run `head` through `wrapper` (a DDP around this model's own `fc`); None restores the plain call
        (`fastvpd.models.route`: outside the module tree)."""
        route(self, "fc", wrapper)

    def head(self, feats: Tensor) -> Tensor:
        """Logits from pooled features, through the routed fc wrapper when one is set (the training path)."""
        return routed(self, "fc")(feats)


def linear_step(
    model: FrozenClassifier,
    optimizer: torch.optim.Optimizer,
    precision: Precision,
    meters: DeviceMeters,
    x: Tensor,
    y: Tensor,
    skip_nonfinite: bool = False,
) -> dict[str, Tensor]:
    """Frozen features (no graph kept) -> fc -> CE; SGD on the fc only. Metrics LINEAR_METRICS on device."""
    optimizer.zero_grad(set_to_none=True)
    with precision.autocast():
        with torch.no_grad():
            feats = model.backbone(x)
        logits = model.head(feats)  # DDP's wrapper when routed: it must see this call
    loss = F.cross_entropy(logits.float(), y)
    precision.backward_step(loss, optimizer, skip_nonfinite)
    top1 = (logits.detach().argmax(dim=1) == y).float().mean() * 100.0
    metrics = {"loss": loss.detach(), "top1": top1}
    meters.accumulate(metrics)
    return metrics


class LinearTask:
    """The engine's Task for the linear probe: a (graphed) `linear_step`, val top-1/top-5 as evaluation."""

    def __init__(
        self,
        cfg: Any,
        model: FrozenClassifier,
        optimizer: torch.optim.Optimizer,
        precision: Precision,
        lr: float,
        val_loader: Any | None,
        classes: list[str],
        say: Any,
    ) -> None:
        info = dist.info()
        self.cfg, self.model, self.optimizer, self.precision = cfg, model, optimizer, precision
        self.val_loader, self.classes = val_loader, classes
        self.meters = DeviceMeters(LINEAR_METRICS, info.device)
        self.lr = torch.tensor(lr, dtype=torch.float32, device=info.device)
        pin_lr(optimizer, self.lr)
        skip = cfg.train.on_nonfinite == "skip"
        gpu_graph = info.device.type == "cuda" and cfg.train.cuda_graph
        why = (
            "train.on_nonfinite=skip syncs every step"
            if skip and gpu_graph
            else "fp16 GradScaler syncs every step"
            if not precision.graphable and gpu_graph
            else ""
        )
        fn = functools.partial(linear_step, model, optimizer, precision, self.meters, skip_nonfinite=skip)
        self.step = GraphedStep(
            fn, enabled=gpu_graph and not why, warmup=11 if info.distributed else 3, log=say, why_disabled=why
        )

    def train_step(self, batch: Any) -> None:
        x = batch.views[0]
        self.step(x, batch.labels.to(x.device, non_blocking=True))

    def set_lr(self, lr: float) -> None:
        self.lr.fill_(lr)

    def evaluate(self, epoch: int) -> dict[str, float]:
        if self.val_loader is None:
            return {}
        m = evaluate_top(self.model, self.val_loader, self.precision)
        return {f"val_{k}": v for k, v in m.items()}

    def state_dict(self) -> dict[str, Any]:
        res = eval_crop(self.cfg.aug.res, self.cfg.aug.eval_res)
        return {
            "classifier": classifier_record(self.model, res, self.classes),
            "optimizer": self.optimizer.state_dict(),
            "precision": self.precision.state_dict(),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.model.load_state_dict(sd["classifier"]["state_dict"])
        self.optimizer.load_state_dict(sd["optimizer"])
        pin_lr(self.optimizer, self.lr)
        self.precision.load_state_dict(sd["precision"])


def _route_fc_through_ddp(model: FrozenClassifier, device: torch.device) -> None:
    """DDP on the fc only (the frozen backbone has no gradient to reduce), via `FrozenClassifier.route_fc`;
    every fc parameter is used in every step, so no `find_unused_parameters`."""
    ids = [device] if device.type == "cuda" else None
    model.route_fc(DDP(model.fc, device_ids=ids, broadcast_buffers=False))


def build(cfg: Any, say: Any = print) -> tuple[LinearTask, Any, Any]:
    """Everything `fit` needs: (task, train loader, schedule)."""
    path = cfg.linear.backbone
    if not path:
        raise UserError("set linear.backbone=PATH: the pretraining checkpoint whose backbone is probed")
    prep = engine.prepare(cfg, labels=True)
    info, precision, loader = prep.info, prep.precision, prep.loader
    val_loader = prep.eval_loader(cfg, cfg.data.val_split) if info.is_main and cfg.eval.every > 0 else None
    from fastvpd.data.manifest import Manifest

    classes = Manifest.load(cfg.data.root).classes
    m = cfg.model
    state = backbone_state(read_state(path), m.arch, m.small_stem, source=f"linear.backbone={path}")
    torch.manual_seed(cfg.train.seed)
    model = FrozenClassifier(m.arch, loader.num_classes, m.small_stem)
    model.backbone.load_state_dict(state)
    model = model.to(info.device, memory_format=torch.channels_last)
    setup_backends(cfg.train.seed, cfg.train.deterministic, info.device, info.rank)
    lr = base_lr(cfg.optim, cfg.train.batch_size)
    optimizer = build_sgd(
        list(model.fc.parameters()), cfg.optim, torch.tensor(lr, dtype=torch.float32, device=info.device)
    )
    if cfg.train.compile:
        model.backbone.compile()
        say("torch.compile: backbone compiled (first steps are slow)")
    if info.distributed:
        _route_fc_through_ddp(model, info.device)
    say(f"linear: frozen {m.arch} from {path}, fc to {loader.num_classes} classes")
    task = LinearTask(cfg, model, optimizer, precision, lr, val_loader, classes, say)
    return task, loader, engine.schedule_for(cfg, loader, lr)


def run(cfg: Any = None, argv: list[str] | None = None) -> engine.FitResult:
    """Run (or resume) a linear probe from Python; returns its result: `run_dir`,
    `last_checkpoint`, `metrics` (the last training means and val top-1/top-5), `stopped` (done, max_steps
    or a signal's name).

    `cfg`: a `config.LinearRun` (dataclass or OmegaConf), a mapping of overrides ({"train.epochs": 2}),
    or a list of command-line arguments; `argv` (e.g. ["--config", "demo_digits_linear"]) is applied first, a
    mapping on top of it. Mistakes raise `config.ConfigError` / `config.UserError`.
    """
    cfg = config.resolve(config.LinearRun, cfg, argv)
    return engine.launch("linear", cfg, build, eval_every=cfg.eval.every, best_key="val_top1")


@config.main_guard
def main(argv: list[str] | None = None) -> Path:
    """The command line: run (or resume) a linear probe; returns the run directory."""
    return run(argv=sys.argv[1:] if argv is None else argv).run_dir


if __name__ == "__main__":
    main()

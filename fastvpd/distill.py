"""Phase 2, self-distillation: `python -m fastvpd.distill --config RECIPE distill.teacher=CKPT ...` (`--help`
lists the keys), or from Python `fastvpd.distill.run(...)`.

Teacher and student both start from the MoCo *query* backbone of a pretraining checkpoint; the teacher is
frozen (never in the optimizer; its BN stays in training mode as in the authors' code unless
`distill.teacher_bn=eval`). The student (backbone + new fc) is trained with

    loss = smoothed_ce(logits, y, label_smoothing) + lam · Σ_i w_i·partial_L2(conn_i(s_i), t_i) / N

over the four pre-ReLU stage outputs (OFD), the connectors trained with the student. The distillation term
is switched on from epoch `distill.start_epoch`, counted from 1 as the progress bar shows (the authors'
`epoch < no_distill_epoch` with 1-based epochs: the default 5 gives 4 CE-only epochs). Baselines from the
same code: `distill.kind=none` (plain fine-tuning), `model.init=random distill.kind=none` (supervised from
scratch, no teacher), `distill.kind=l2` (L2 between pooled features).

Several processes: `torchrun --nproc_per_node=G -m fastvpd.distill ...` (DDP on the student and the
connectors; the teacher runs locally on each rank's shard; rank 0 validates and checkpoints).

Reads top to bottom: config → data → models → optimizer → Task (the step + validation) → engine.fit.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from fastvpd import config, dist, engine
from fastvpd.checkpoint import backbone_state, classifier_entry, classifier_record, read_state
from fastvpd.classifier import Classifier
from fastvpd.config import UserError
from fastvpd.data import render_then, views_in_step
from fastvpd.data.spec import eval_crop
from fastvpd.evaluate import evaluate_top
from fastvpd.ofd import DISTILL_METRICS, DistillNet, build_teacher, distill_step
from fastvpd.optim import base_lr, build_sgd
from fastvpd.step import DeviceMeters, GraphedStep, Precision, pin_lr, setup_backends


def distill_active(epoch: int, start_epoch: int) -> bool:
    """Is the distillation term on in 0-based epoch `epoch`? (start_epoch counts epochs from 1.)"""
    return epoch + 1 >= start_epoch


class DistillTask:
    """The engine's Task: a (graphed) `distill_step` per batch, top-1/top-5 on the val split as evaluation.

    The two phases (CE only / CE + distillation) are two step functions, each captured as its own CUDA
    graph; the CE-only one is dropped when the distillation starts. The current epoch is the train
    loader's (the engine calls `loader.set_epoch` before every epoch, also when resuming).
    """

    def __init__(
        self,
        cfg: Any,
        net: DistillNet,
        optimizer: torch.optim.Optimizer,
        precision: Precision,
        lr: float,
        loader: Any,
        val_loader: Any | None,
        classes: list[str],
        say: Any,
    ) -> None:
        info = dist.info()
        self.cfg, self.net, self.optimizer, self.precision = cfg, net, optimizer, precision
        self.loader, self.val_loader, self.classes, self.say = loader, val_loader, classes, say
        self.meters = DeviceMeters(DISTILL_METRICS, info.device)
        self.lr = torch.tensor(lr, dtype=torch.float32, device=info.device)
        pin_lr(optimizer, self.lr)
        skip = cfg.train.on_nonfinite == "skip"
        self.why = (
            "train.on_nonfinite=skip syncs every step"
            if skip and info.device.type == "cuda" and cfg.train.cuda_graph
            else "fp16 GradScaler syncs every step"
            if not precision.graphable and info.device.type == "cuda" and cfg.train.cuda_graph
            else ""
        )
        self.graph_on = cfg.train.cuda_graph and not self.why and info.device.type == "cuda"
        self.warmup = 11 if info.distributed else 3
        self.skip = skip
        self.steps: dict[bool, GraphedStep] = {}
        self.in_step = views_in_step(loader, say)  # cache backend: the step renders the view

    def _step_for(self, on: bool) -> GraphedStep:
        if on not in self.steps:
            if on:
                self.steps.pop(False, None)  # the CE-only graph is never needed again: free its memory
            d = self.cfg.distill
            fn = functools.partial(
                distill_step, self.net, self.optimizer, self.precision, self.meters,
                lam=d.lam, smoothing=d.label_smoothing, distill_on=on, skip_nonfinite=self.skip,
            )  # fmt: skip
            if self.in_step:
                fn = functools.partial(render_then, self.loader, fn, 1)  # fn(first view, labels)
            why, self.why = self.why, ""  # said once, not per phase
            self.steps[on] = GraphedStep(
                fn, enabled=self.graph_on, warmup=self.warmup, log=self.say, why_disabled=why,
                generators=self.loader.generators if self.in_step else (),
            )  # fmt: skip
            if on and self.net.kind != "none":
                self.say(f"distillation on from epoch {self.loader.epoch + 1} (λ={d.lam:g}, kind={d.kind})")
        return self.steps[on]

    def train_step(self, batch: Any) -> None:
        on = self.net.kind != "none" and distill_active(self.loader.epoch, self.cfg.distill.start_epoch)
        if self.in_step:
            self.loader.seed_views(batch)  # host side; a replay reads the generator's seed
            self._step_for(on)(batch.indices, batch.labels)
            return
        x = batch.views[0]
        self._step_for(on)(x, batch.labels.to(x.device, non_blocking=True))

    def set_lr(self, lr: float) -> None:
        self.lr.fill_(lr)

    def evaluate(self, epoch: int) -> dict[str, float]:
        """Student top-1/top-5 (%) and CE on the val split (resize res/0.875, centre crop); main rank."""
        if self.val_loader is None:
            return {}
        m = evaluate_top(self.net.student, self.val_loader, self.precision)
        return {f"val_{k}": v for k, v in m.items()}

    def state_dict(self) -> dict[str, Any]:
        net = self.net
        res = eval_crop(self.cfg.aug.res, self.cfg.aug.eval_res)
        return {
            "classifier": classifier_record(net.student, res, self.classes),
            "distiller": net.distiller.state_dict() if net.distiller is not None else {},
            "teacher_buffers": dict(net.teacher.named_buffers()) if net.teacher is not None else {},
            "optimizer": self.optimizer.state_dict(),
            "precision": self.precision.state_dict(),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        net = self.net
        net.student.load_state_dict(sd["classifier"]["state_dict"])
        if net.distiller is not None:
            net.distiller.load_state_dict(sd["distiller"])
        if net.teacher is not None:
            own = dict(net.teacher.named_buffers())
            with torch.no_grad():
                for k, v in sd["teacher_buffers"].items():
                    own[k].copy_(v)
        self.optimizer.load_state_dict(sd["optimizer"])
        pin_lr(self.optimizer, self.lr)  # load_state_dict replaced the groups' lr tensor
        self.precision.load_state_dict(sd["precision"])


def build_net(cfg: Any, num_classes: int, say: Any = print) -> DistillNet:
    """Student, teacher and connectors as the config asks (on the CPU, before `.to(device)`).

    model.init=moco: the student's backbone is the teacher file's (MoCo query) backbone; random: torchvision
    init. The teacher is loaded only when distill.kind != none.
    """
    m, d = cfg.model, cfg.distill
    need_file = m.init == "moco" or d.kind != "none"
    state = None
    if need_file:
        if not d.teacher:
            why = "model.init=moco" if m.init == "moco" else f"distill.kind={d.kind}"
            raise UserError(f"{why} needs distill.teacher=PATH (a pretraining checkpoint)")
        obj = read_state(d.teacher)
        rec = classifier_entry(obj)
        if rec is not None and int(rec.get("num_classes", num_classes)) != num_classes:
            raise UserError(
                f"distill.teacher={d.teacher} is a classifier for {rec['num_classes']} classes, the data has "
                f"{num_classes}: pass a checkpoint trained on this dataset"
            )
        state = backbone_state(obj, m.arch, m.small_stem, source=f"distill.teacher={d.teacher}")
    student = Classifier(m.arch, num_classes, m.small_stem)
    if m.init == "moco":
        student.backbone.load_state_dict(state)  # type: ignore[arg-type]
    teacher = build_teacher(state, m.arch, m.small_stem) if d.kind != "none" else None  # type: ignore[arg-type]
    net = DistillNet(student, teacher, d.kind, d.teacher_bn, list(d.stage_weights))
    say(
        f"distill: student {m.arch} ({m.init} init, {num_classes} classes), "
        + (f"teacher {d.teacher} (BN {d.teacher_bn}), kind={d.kind}" if teacher is not None else "no teacher")
    )
    return net


def _route_through_ddp(net: DistillNet, device: torch.device) -> None:
    """DDP on the student and (when it has trainable parameters) the connectors, via `DistillNet.route`:
    the forward calls the wrappers, checkpoints and `.train()` keep the raw modules.

    Two wrappers, because the connectors are absent from the CE-only epochs' graph: a wrapper that is not
    called in a step simply does no all-reduce, whereas one wrapper around both would need
    `find_unused_parameters=True` there. Within each wrapper every parameter takes part in every call it
    sees (all student layers feed the logits; every connector feeds the distillation term), so the default
    `find_unused_parameters=False` is correct. `broadcast_buffers=False`: each rank keeps the BN statistics
    of its own shard (no per-step broadcast); rank 0's are the ones checkpointed.
    """
    ids = [device] if device.type == "cuda" else None

    def wrap(mod: torch.nn.Module | None) -> DDP | None:
        if mod is None or not any(p.requires_grad for p in mod.parameters()):
            return None
        return DDP(mod, device_ids=ids, broadcast_buffers=False)

    net.route(wrap(net.student), wrap(net.distiller))


def build(cfg: Any, say: Any = print) -> tuple[DistillTask, Any, Any]:
    """Everything `fit` needs: (task, train loader, schedule)."""
    prep = engine.prepare(cfg, labels=True)
    info, precision, loader = prep.info, prep.precision, prep.loader
    val_loader = prep.eval_loader(cfg, cfg.data.val_split) if info.is_main and cfg.eval.every > 0 else None
    from fastvpd.data.manifest import Manifest

    classes = Manifest.load(cfg.data.root).classes
    torch.manual_seed(cfg.train.seed)  # identical fc / connector init on every rank
    net = build_net(cfg, loader.num_classes, say).to(info.device)
    net = net.to(memory_format=torch.channels_last)
    setup_backends(cfg.train.seed, cfg.train.deterministic, info.device, info.rank)
    lr = base_lr(cfg.optim, cfg.train.batch_size)
    optimizer = build_sgd(
        net.trainable(), cfg.optim, torch.tensor(lr, dtype=torch.float32, device=info.device)
    )
    if cfg.train.compile:
        net.compile()  # teacher taps, student, connectors and loss in one graph per phase, for Inductor
        say("torch.compile: the distillation net compiled (first steps are slow)")
    if info.distributed:
        _route_through_ddp(net, info.device)
    task = DistillTask(cfg, net, optimizer, precision, lr, loader, val_loader, classes, say)
    return task, loader, engine.schedule_for(cfg, loader, lr)


def run(cfg: Any = None, argv: list[str] | None = None) -> engine.FitResult:
    """Run (or resume) a distillation / fine-tuning / from-scratch run from Python; returns its result:
    `run_dir`, `last_checkpoint`, `metrics` (the last training means and val top-1/top-5), `stopped`
    (done, max_steps or a signal's name).

    `cfg`: a `config.DistillRun` (dataclass or OmegaConf), a mapping of overrides ({"train.epochs": 2}),
    or a list of command-line arguments; `argv` (e.g. ["--config", "demo_digits_distill"]) is applied first, a
    mapping on top of it. Mistakes raise `config.ConfigError` / `config.UserError`.
    """
    cfg = config.resolve(config.DistillRun, cfg, argv)
    return engine.launch("distill", cfg, build, eval_every=cfg.eval.every, best_key="val_top1")


@config.main_guard
def main(argv: list[str] | None = None) -> Path:
    """The command line: run (or resume) a distillation / fine-tuning / from-scratch run; returns the run
    directory."""
    return run(argv=sys.argv[1:] if argv is None else argv).run_dir


if __name__ == "__main__":
    main()

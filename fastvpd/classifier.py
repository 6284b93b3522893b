"""Pieces shared by distillation, the linear probe and evaluation.

- reading a backbone out of a pretraining checkpoint (the MoCo *query* encoder), a classifier checkpoint
  or an exported torchvision state dict, with a one-line error when it does not fit the configured arch;
- `Classifier` (backbone + fc) and the frozen `teacher`;
- `DistillNet` + `distill_step`: teacher forward, student forward/backward, connectors and the optimizer
  update as one pure step (CUDA-graph capturable, like `fastvpd.step.moco_step`);
- evaluation helpers: top-k counts without host syncs, softmax averaged over views (ten-crop) and over
  checkpoints (ensembles), the predictions CSV.
"""

from __future__ import annotations

import contextlib
import csv
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fastvpd import checkpoint, dist
from fastvpd.config import UserError
from fastvpd.losses import smoothed_ce
from fastvpd.models import FeatureTaps, build_backbone, route, routed, stage_channels
from fastvpd.ofd import OFDDistiller, pooled_l2
from fastvpd.step import DeviceMeters, Precision, bn_snapshot

__all__ = [
    "Classifier",
    "DistillNet",
    "L2Distiller",
    "DISTILL_METRICS",
    "read_state",
    "backbone_state",
    "build_teacher",
    "classifier_record",
    "load_classifier",
    "distill_step",
    "topk_correct",
    "predict",
    "evaluate_top",
    "ensemble",
    "image_ids",
    "write_predictions_csv",
]

_DROP = ("module", "_orig_mod")  # wrapper components in keys (DDP, torch.compile)
_PROBE = "layer1.0.conv1.weight"  # every torchvision ResNet has it: marks where a backbone's keys start


# ------------------------------------------------------------------------------------------- checkpoints
def read_state(path: str | Path) -> dict[str, Any]:
    """A fastvpd checkpoint (verified) or any `torch.load(weights_only=True)`-safe file, as a dict."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist: pass a pretraining/distillation checkpoint (.pt)")
    with open(path, "rb") as f:
        magic = f.read(len(checkpoint.MAGIC))
    if magic == checkpoint.MAGIC:
        return checkpoint.load(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path} is not a checkpoint this code can read safely ({why})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} does not hold a state dict (got {type(obj).__name__})")
    return obj


def _flatten(obj: Any, prefix: str = "") -> dict[str, Tensor]:
    """Every tensor in nested dicts, keyed by its dotted path without DDP/compile wrapper components."""
    out: dict[str, Tensor] = {}
    if isinstance(obj, Tensor):
        key = ".".join(p for p in prefix.split(".") if p and p not in _DROP)
        out[key] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(k, str):
                out.update(_flatten(v, f"{prefix}{k}."))
    return out


def _pick_prefix(prefixes: list[str]) -> str | None:
    """Which backbone to take when a file holds several: MoCo's query encoder, else the student/classifier,
    else the only one that is not a key encoder / teacher."""
    for want in ("encoder_q", "classifier", "student"):
        hits = [p for p in prefixes if want in p.split(".")]
        if len(hits) == 1:
            return hits[0]
    rest = [p for p in prefixes if not {"encoder_k", "teacher", "optimizer"} & set(p.split("."))]
    return rest[0] if len(rest) == 1 else None


def _saved_arch(obj: dict[str, Any]) -> str:
    m = obj.get("config", {}).get("model", {}) if isinstance(obj.get("config"), dict) else {}
    if not m:
        return ""
    return f" (it was trained with model.arch={m.get('arch')} model.small_stem={m.get('small_stem')})"


def backbone_state(
    obj: dict[str, Any], arch: str, small_stem: bool, source: str = "checkpoint"
) -> dict[str, Tensor]:
    """The backbone weights in `obj` with torchvision key names (no fc), checked against `arch`.

    Accepts a pretraining checkpoint (MoCo query backbone; split-BN keys are plain BN keys), a
    distillation/linear checkpoint (the student), an official MoCo `.pth.tar` (`module.encoder_q.*`) or a
    torchvision state dict. Raises UserError (one line) when nothing fits `arch`/`small_stem`.
    """
    flat = _flatten(obj)
    prefixes = sorted({k[: -len(_PROBE)] for k in flat if k == _PROBE or k.endswith("." + _PROBE)})
    prefix = _pick_prefix(prefixes)
    if prefix is None:
        what = "no ResNet backbone" if not prefixes else f"several backbones ({', '.join(prefixes)})"
        raise UserError(f"{source} holds {what}: pass a fastvpd pretraining/distillation checkpoint")
    state = {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "head."))}
    ref = build_backbone(arch, small_stem).state_dict()
    missing = [k for k in ref if k not in state]
    extra = [k for k in state if k not in ref]
    bad = [k for k in ref if k in state and tuple(state[k].shape) != tuple(ref[k].shape)]
    if missing or extra or bad:
        detail = (
            f"shape of {bad[0]} is {tuple(state[bad[0]].shape)}, expected {tuple(ref[bad[0]].shape)}"
            if bad
            else f"{len(missing)} missing / {len(extra)} unexpected keys, e.g. {(missing or extra)[0]}"
        )
        raise UserError(
            f"{source} does not fit model.arch={arch} model.small_stem={small_stem}{_saved_arch(obj)}: "
            f"{detail}; set model.arch/model.small_stem to match it"
        )
    return {k: state[k].to(ref[k].dtype) for k in ref}


# ------------------------------------------------------------------------------------------- models
class Classifier(nn.Module):
    """backbone (pooled features) + a linear classifier.

    forward(x) -> logits; forward(x, taps=True) -> (stage feats, pooled, logits) where the stage feats are
    the four pre-ReLU stage outputs OFD distils (`FeatureTaps`; same numbers as the plain forward).
    """

    def __init__(self, arch: str, num_classes: int, small_stem: bool = False) -> None:
        super().__init__()
        self.arch, self.small_stem, self.num_classes = arch, small_stem, num_classes
        self.backbone = build_backbone(arch, small_stem)
        self.fc = nn.Linear(self.backbone.feat_dim, num_classes)

    def forward(self, x: Tensor, taps: bool = False) -> Any:
        if not taps:
            return self.fc(self.backbone(x))
        feats, pooled = FeatureTaps(self.backbone)(x)  # a view over self.backbone, nothing copied
        return feats, pooled, self.fc(pooled)


def build_teacher(state: dict[str, Tensor], arch: str, small_stem: bool) -> nn.Module:
    """The frozen teacher backbone: `state` loaded, every parameter requires_grad=False."""
    teacher = build_backbone(arch, small_stem)
    teacher.load_state_dict(state)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def classifier_record(model: Classifier, res: int, classes: Sequence[str]) -> dict[str, Any]:
    """What `evaluate` needs to rebuild a classifier from a run checkpoint (stored under task.classifier)."""
    return {
        "arch": model.arch,
        "small_stem": bool(model.small_stem),
        "num_classes": int(model.num_classes),
        "res": int(res),
        "classes": list(classes),
        "state_dict": model.state_dict(),
    }


def load_classifier(path: str | Path) -> tuple[Classifier, dict[str, Any]]:
    """Rebuild the classifier of a distillation / linear-probe checkpoint -> (model in eval mode, record)."""
    obj = read_state(path)
    rec = obj.get("task", {}).get("classifier") if isinstance(obj.get("task"), dict) else None
    if not isinstance(rec, dict) or "state_dict" not in rec:
        raise UserError(
            f"{path} is not a classifier checkpoint (no task.classifier): pass a checkpoint of "
            "`python -m fastvpd.distill` or `python -m fastvpd.linear`"
        )
    model = Classifier(rec["arch"], int(rec["num_classes"]), bool(rec["small_stem"]))
    try:
        model.load_state_dict(rec["state_dict"])
    except RuntimeError as e:
        raise UserError(f"{path}: classifier weights do not load ({str(e).splitlines()[0]})") from None
    return model.eval(), rec


# ------------------------------------------------------------------------------------------- distillation
class L2Distiller(nn.Module):
    """distill.kind=l2: Σ(s - t)²/N between pooled features; a linear connector when the dims differ."""

    def __init__(self, s_dim: int, t_dim: int) -> None:
        super().__init__()
        self.connector: nn.Module = nn.Identity() if s_dim == t_dim else nn.Linear(s_dim, t_dim, bias=False)

    def forward(self, s_pooled: Tensor, t_pooled: Tensor) -> Tensor:
        return pooled_l2(self.connector(s_pooled), t_pooled)


class DistillNet(nn.Module):
    """Student (+ frozen teacher + connectors) for one distillation step.

    kind: ofd | l2 | none. teacher_bn: train keeps the teacher's BN on batch statistics (running stats
    update; the authors' code runs the teacher inside their Distiller in train mode), eval uses its running
    statistics. `.train()` never changes that choice.

    Several processes: `route(student_ddp, distiller_ddp)` makes the forward *call* the DDP wrappers (so
    their reducers see the forward whose backward they all-reduce), while `student`/`distiller`, the module
    tree, `state_dict`, `.train()` and `trainable()` keep the raw modules (checkpoint keys carry no
    `module.`). Two wrappers, not one around the whole net: the connectors are absent from the CE-only
    epochs' graph, and one wrapper would need `find_unused_parameters` (a graph walk every step).
    """

    def __init__(
        self,
        student: Classifier,
        teacher: nn.Module | None,
        kind: str,
        teacher_bn: str = "train",
        stage_weights: Sequence[float] = (0.125, 0.25, 0.5, 1.0),
    ) -> None:
        super().__init__()
        if kind != "none" and teacher is None:
            raise UserError(f"distill.kind={kind} needs a teacher: set distill.teacher=PATH")
        self.kind, self.teacher_bn = kind, teacher_bn
        self.student = student
        self.teacher = teacher if kind != "none" else None
        self.distiller: nn.Module | None = None
        if kind == "ofd":
            self.distiller = OFDDistiller(teacher, stage_channels(student.backbone), stage_weights)
        elif kind == "l2":
            self.distiller = L2Distiller(student.backbone.feat_dim, teacher.feat_dim)  # type: ignore[union-attr]
        self.train()

    def train(self, mode: bool = True) -> DistillNet:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.train(mode and self.teacher_bn == "train")
        return self

    def trainable(self) -> list[nn.Parameter]:
        """Student + connector parameters (what the authors' optimizer holds); never the teacher's."""
        mods = [self.student, self.distiller]
        return [p for m in mods if m is not None for p in m.parameters() if p.requires_grad]

    def route(self, student: nn.Module | None, distiller: nn.Module | None = None) -> None:
        """Call `student` / `distiller` (DDP wrappers around the raw modules) in the forward; None restores
        the plain call (`fastvpd.models.route`: outside the module tree, must wrap this net's own module)."""
        route(self, "student", student)
        route(self, "distiller", distiller)

    def forward(self, x: Tensor, distill_on: bool) -> tuple[Tensor, Tensor]:
        """(logits, distillation term already divided by N; exactly 0 when off)."""
        student = routed(self, "student")
        if self.kind == "none" or not distill_on:
            logits = student(x)
            return logits, logits.new_zeros((), dtype=torch.float32)
        with torch.no_grad():
            t_feats, t_pooled = FeatureTaps(self.teacher)(x)  # type: ignore[arg-type]
        s_feats, s_pooled, logits = student(x, taps=True)
        distiller = routed(self, "distiller")
        if self.kind == "ofd":
            return logits, distiller(s_feats, t_feats)
        return logits, distiller(s_pooled, t_pooled)


DISTILL_METRICS = ["loss", "ce", "distill", "top1"]


def distill_step(
    net: DistillNet,
    optimizer: torch.optim.Optimizer,
    precision: Precision,
    meters: DeviceMeters,
    x: Tensor,
    y: Tensor,
    lam: float = 1e-4,
    smoothing: float = 0.1,
    distill_on: bool = True,
    skip_nonfinite: bool = False,
) -> dict[str, Tensor]:
    """loss = smoothed_ce(student(x), y) + λ·distill; backward; SGD. Metrics `DISTILL_METRICS` on device.

    `distill_on` is a Python bool, so each phase is its own (graph-capturable) function: before
    `distill.start_epoch` the term is not computed at all (the loss is the CE alone, the connectors get no
    gradient and no weight decay, as in the authors' code where they are absent from that loss).
    """
    optimizer.zero_grad(set_to_none=True)
    restore_bn = bn_snapshot(net, skip_nonfinite)
    with precision.autocast():
        logits, dterm = net(x, distill_on)
        ce = smoothed_ce(logits, y, smoothing)
        loss = ce + lam * dterm if distill_on and net.kind != "none" else ce
    if not precision.backward_step(loss, optimizer, skip_nonfinite):
        restore_bn()
    top1 = (logits.detach().argmax(dim=1) == y).float().mean() * 100.0
    metrics = {
        "loss": loss.detach().float(),
        "ce": ce.detach().float(),
        "distill": dterm.detach().float(),
        "top1": top1,
    }
    meters.accumulate(metrics)
    return metrics


# ------------------------------------------------------------------------------------------- evaluation
def _autocast(precision: Precision | None) -> contextlib.AbstractContextManager:
    return precision.autocast() if precision is not None else contextlib.nullcontext()


def topk_correct(logits: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> Tensor:
    """Number of samples whose label is among the top-k scores, per k (float64 [len(ks)], on device)."""
    k_max = min(max(ks), logits.shape[1])
    top = logits.topk(k_max, dim=1).indices  # top: NxK
    hit = top == labels.view(-1, 1)
    return torch.stack([hit[:, : min(k, k_max)].any(dim=1).sum() for k in ks]).to(torch.float64)


@torch.no_grad()
def predict(
    model: nn.Module, loader: Any, precision: Precision | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Softmax probabilities for every sample of `loader` -> (probs N×C fp32, labels, indices) on device.

    Several views per batch (ten-crop) are averaged in probability space, as test-time augmentation
    usually is. Samples come back in the loader's order (sort by `indices` to get sample order).
    """
    was = model.training
    model.eval()
    probs, labels, indices = [], [], []
    loader.set_epoch(0)
    try:
        for b in loader:
            p = None
            for v in b.views:
                with _autocast(precision):
                    out = model(v)
                s = F.softmax(out.float(), dim=1)
                p = s if p is None else p + s
            probs.append(p / len(b.views))  # type: ignore[operator]
            labels.append(b.labels)
            indices.append(b.indices)
    finally:
        model.train(was)
    if not probs:
        raise UserError("the evaluation split is empty")
    return torch.cat(probs), torch.cat(labels), torch.cat(indices)


@torch.no_grad()
def evaluate_top(model: nn.Module, loader: Any, precision: Precision | None = None) -> dict[str, float]:
    """Top-1/top-5 (percent) and mean CE over `loader`; one host sync; summed over ranks when sharded."""
    was = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=loader.device)  # [n, top1, top5, ce]
    loader.set_epoch(0)
    try:
        for b in loader:
            with _autocast(precision):
                logits = model(b.views[0]).float()
            n = torch.tensor([float(b.labels.shape[0])], dtype=torch.float64, device=sums.device)
            ce = F.cross_entropy(logits, b.labels, reduction="sum").to(torch.float64).view(1)
            sums += torch.cat([n, topk_correct(logits, b.labels), ce])
    finally:
        model.train(was)
    if dist.world_size() > 1 and loader.world_size > 1:
        torch.distributed.all_reduce(sums)
    n, c1, c5, ce = sums.tolist()
    n = max(n, 1.0)
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "loss": ce / n}


def ensemble(probs: Iterable[Tensor]) -> Tensor:
    """Mean of several models' probability matrices (each N×C, same sample order)."""
    ps = list(probs)
    if not ps:
        raise ValueError("ensemble of nothing")
    if any(p.shape != ps[0].shape for p in ps):
        raise UserError(f"ensemble members disagree in shape: {[tuple(p.shape) for p in ps]}")
    return torch.stack([p.float() for p in ps]).mean(0)


def image_ids(manifest: Any, split: str) -> list[str]:
    """Per sample of `split` (sample order), the stem of its source file: the CSV's image_id."""
    return [Path(s["path"]).stem for s in manifest.sources(split)]


def write_predictions_csv(path: str | Path, ids: Sequence[str], classes: Sequence[int] | Tensor) -> Path:
    """`image_id,class_index` header, then one line per sample (atomically written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cls = classes.tolist() if isinstance(classes, Tensor) else list(classes)
    if len(cls) != len(ids):
        raise ValueError(f"{len(ids)} image ids but {len(cls)} predictions")
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["image_id", "class_index"])
        w.writerows(zip(ids, (int(c) for c in cls)))
    tmp.replace(path)
    return path

"""Evaluate classifier checkpoints: `python -m fastvpd.evaluate CKPT [CKPT ...] --data ROOT --split test`.

Each checkpoint (of `fastvpd.distill` or `fastvpd.linear`) is evaluated at its own resolution (or --res):
short side resized to res/0.875, centre crop; `--ten-crop` averages the softmax over the four corners and
the centre of the image and of its mirror. Several checkpoints form an ensemble: the mean of their
(test-time augmented) softmax outputs. Writes OUT/results.json (top-1/top-5 in %, per member and for the
ensemble), OUT/predictions.csv and OUT/probs.npy (the ensemble's probabilities, sample order).
Runs on the CPU as well (train.device logic: GPU when there is one). From Python: `run(...)`.

Also the evaluation helpers the trainers use: top-k counts without host syncs (`topk_correct`,
`evaluate_top`), softmax averaged over views (`predict`) and over checkpoints (`ensemble`), the CSV.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fastvpd import dist
from fastvpd.checkpoint import load_classifier
from fastvpd.config import Amp, Backend, DataConfig, Device, UserError, Verify, choices_of, main_guard
from fastvpd.data import build_loader, eval_spec
from fastvpd.data.manifest import Manifest
from fastvpd.step import Precision

__all__ = [
    "run",
    "main",
    "evaluate",
    "topk_correct",
    "predict",
    "evaluate_top",
    "ensemble",
    "image_ids",
    "write_predictions_csv",
]

CSV_HELP = (
    "predictions.csv: a header line `image_id,class_index`, then one line per image of the split in sample "
    "order; image_id is the stem of the image's source file name (e.g. n01440764_10026 for "
    "train/n01440764/n01440764_10026.JPEG), or, when stems repeat within the split, the file's path "
    "relative to the split folder (cat/001.jpg); class_index the predicted class's index into the sorted "
    "class folder names (manifest.json `classes`)."
)


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
    """Per sample of `split` (sample order), its predictions.csv image_id, unique within the split.

    The stem of the source file (the challenge's image_id) when no two files share one; otherwise the
    path relative to the split folder (`cat/001.jpg`), since users' class folders often repeat names.
    """
    rels = [PurePosixPath(s["path"]) for s in manifest.sources(split)]
    stems = [r.stem for r in rels]
    if len(set(stems)) == len(stems):
        return stems
    tops = {r.parts[0] for r in rels if len(r.parts) > 1}
    drop = 1 if len(tops) == 1 and all(len(r.parts) > 1 for r in rels) else 0
    ids = ["/".join(r.parts[drop:]) for r in rels]
    dup = [i for i, n in Counter(ids).items() if n > 1]
    if dup:  # the manifest lists one file twice: not something the converter writes
        raise UserError(f"{split} lists {dup[0]} {Counter(ids)[dup[0]]} times: re-convert the dataset")
    return ids


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


def _default_out(ckpt: Path, split: str) -> Path:
    """<run>/eval_<split> for <run>/checkpoints/X.pt, else eval_<split> beside the file."""
    run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    return run / f"eval_{split}"


def _scores(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    n = max(int(labels.shape[0]), 1)
    c1, c5 = topk_correct(probs, labels).tolist()
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n}


def evaluate(
    checkpoints: str | Path | Sequence[str | Path],
    data: str | Path,
    split: str = "test",
    ten_crop: bool = False,
    res: int | None = None,
    batch_size: int = 128,
    backend: str = "cache",
    device: str = "auto",
    amp: str = "bf16",
    verify: str = "fast",
    out: str | Path | None = None,
    say: Any = print,
) -> dict[str, Any]:
    """Evaluate one checkpoint or an ensemble; returns (and writes) the results dict."""
    ckpts = [checkpoints] if isinstance(checkpoints, (str, Path)) else list(checkpoints)
    if not ckpts:
        raise UserError("give at least one checkpoint")
    if batch_size <= 0:
        raise UserError(f"--batch-size must be > 0 (got {batch_size})")
    if res is not None and res <= 0:
        raise UserError(f"--res must be > 0 (got {res})")
    checks = (("--backend", backend, Backend), ("--device", device, Device), ("--amp", amp, Amp),
              ("--verify", verify, Verify))  # fmt: skip
    for flag, value, kind in checks:
        if str(value) not in choices_of(kind):
            raise UserError(f"{flag} must be one of {', '.join(choices_of(kind))} (got {value!r})")
    dev = dist.pick_device(device)
    precision = Precision(amp, dev)
    manifest = Manifest.load(data)
    n_cls = manifest.num_classes
    scored = manifest.labelled(split)  # a split converted without class folders: predictions only
    data_cfg = DataConfig(root=str(data), backend=backend, verify=verify)
    members, probs_all = [], []
    labels = order = None
    for ck in ckpts:
        model, rec = load_classifier(ck)
        if int(rec["num_classes"]) != n_cls:
            raise UserError(
                f"{ck} classifies {rec['num_classes']} classes, {data} has {n_cls}: evaluate on its dataset"
            )
        if rec.get("classes") and list(rec["classes"]) != manifest.classes:
            raise UserError(f"{ck} was trained with other class names than {data}'s: evaluate on its dataset")
        r = int(res or rec["res"])
        model = model.to(dev, memory_format=torch.channels_last)
        loader = build_loader(
            data_cfg, eval_spec(r, ten_crop), split, batch_size, dev, precision.dtype or torch.float32,
            train=False,
        )  # fmt: skip
        p, y, idx = predict(model, loader, precision)
        perm = torch.argsort(idx)  # back to sample order, so members line up
        p, y, idx = p[perm], y[perm], idx[perm]
        if order is None:
            labels, order = y, idx
        members.append(
            {"checkpoint": str(ck), "arch": rec["arch"], "res": r, **(_scores(p, y) if scored else {})}
        )
        top1 = f": top-1 {members[-1]['top1']:.2f}%" if scored else ""
        say(f"{ck}: {rec['arch']} @ {r}px{' ten-crop' if ten_crop else ''}{top1}")
        probs_all.append(p)
        del model
    probs = ensemble(probs_all)
    results: dict[str, Any] = {
        "split": split,
        "num_samples": int(labels.shape[0]),  # type: ignore[union-attr]
        "ten_crop": ten_crop,
        **(_scores(probs, labels) if scored else {}),  # type: ignore[arg-type]
        "members": members,
    }
    out_dir = Path(out) if out else _default_out(Path(ckpts[0]), split)
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = image_ids(manifest, split)
    if ids != [PurePosixPath(src["path"]).stem for src in manifest.sources(split)]:
        say(f"{split}: file names repeat across folders, so predictions.csv ids are paths within the split")
    if len(ids) != results["num_samples"]:
        raise UserError(
            f"{data}: manifest lists {len(ids)} {split} images, the loader gave {results['num_samples']}"
        )
    write_predictions_csv(
        out_dir / "predictions.csv", [ids[i] for i in order.tolist()], probs.argmax(1).cpu()
    )  # type: ignore[union-attr]
    np.save(out_dir / "probs.npy", probs.cpu().numpy().astype(np.float32))
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    results["out_dir"] = str(out_dir)
    kind = f"ensemble of {len(ckpts)}" if len(ckpts) > 1 else "model"
    if scored:
        say(f"{split}: {kind} top-1 {results['top1']:.2f}%, top-5 {results['top5']:.2f}% -> {out_dir}")
    else:
        say(f"{split}: no labels (converted without class folders), predictions only -> {out_dir}")
    return results


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m fastvpd.evaluate",
        description=__doc__.split("\n\n")[0] + " " + CSV_HELP,
    )
    ap.add_argument("checkpoints", nargs="+", help="classifier checkpoints (.pt); several = an ensemble")
    ap.add_argument("--data", required=True, help="converted dataset folder (holds manifest.json)")
    ap.add_argument("--split", default="test", help="split to evaluate (default test)")
    ap.add_argument("--ten-crop", action="store_true", help="10-crop test-time augmentation (mean softmax)")
    ap.add_argument("--res", type=int, default=None, help="crop size (default: each checkpoint's own)")
    ap.add_argument("--out", default=None, help="output folder (default <run>/eval_<split>)")
    ap.add_argument("--batch-size", type=int, default=128, help="images per batch (default 128)")
    ap.add_argument(
        "--backend", default="cache", choices=choices_of(Backend), help="data loader (default cache)"
    )
    ap.add_argument(
        "--device", default="auto", choices=choices_of(Device), help="default: a GPU when there is one"
    )
    ap.add_argument("--amp", default="bf16", choices=choices_of(Amp), help="GPU autocast (default bf16)")
    ap.add_argument(
        "--verify", default="fast", choices=choices_of(Verify), help="manifest check (default fast)"
    )
    return ap


def run(
    options: Mapping[str, Any] | Sequence[str] | None = None,
    argv: Sequence[str] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Evaluate from Python; returns the results dict (top1, top5, num_samples, members, out_dir, ...).

    `options`: a mapping of `evaluate`'s keyword arguments ({"checkpoints": [CKPT], "data": ROOT,
    "split": "val", "ten_crop": True}; keyword arguments work too) or a list of command-line arguments;
    `argv` (["CKPT", "--data", ROOT]) is parsed first, a mapping on top of it. Mistakes raise
    `fastvpd.config.UserError` (the command line prints them in one line).
    """
    if isinstance(options, (str, bytes)) or (options is not None and not isinstance(options, Mapping)):
        if argv is not None:
            raise TypeError("run() takes one list of command-line arguments")
        argv, options = [str(a) for a in options], None  # type: ignore[union-attr]
    params: dict[str, Any] = vars(_parser().parse_args(list(argv))) if argv is not None else {}
    params.update(options or {})
    params.update(kwargs)
    known = evaluate.__code__.co_varnames[: evaluate.__code__.co_argcount]
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise UserError(f"evaluate has no option {unknown[0]!r}: one of {', '.join(known)}")
    if "checkpoints" not in params or "data" not in params:
        raise UserError("evaluate needs checkpoints=[PATH, ...] and data=ROOT")
    return evaluate(**params)


@main_guard
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse the command line, evaluate, return the results dict (top1, top5, members, out_dir, ...)."""
    return run(argv=sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()

"""Evaluate classifier checkpoints: `python -m fastvpd.evaluate CKPT [CKPT ...] --data ROOT --split test`.

Each checkpoint (of `fastvpd.distill` or `fastvpd.linear`) is evaluated at its own resolution (or --res):
short side resized to res/0.875, centre crop; `--ten-crop` averages the softmax over the four corners and
the centre of the image and of its mirror. Several checkpoints form an ensemble: the mean of their
(test-time augmented) softmax outputs. Writes OUT/results.json (top-1/top-5 in %, per member and for the
ensemble), OUT/predictions.csv and OUT/probs.npy (the ensemble's probabilities, sample order).
Runs on the CPU as well (train.device logic: GPU when there is one).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastvpd import dist
from fastvpd.classifier import (
    ensemble,
    image_ids,
    load_classifier,
    predict,
    topk_correct,
    write_predictions_csv,
)
from fastvpd.config import DataConfig, UserError, main_guard
from fastvpd.data import build_loader, eval_spec
from fastvpd.data.manifest import Manifest
from fastvpd.step import Precision

CSV_HELP = (
    "predictions.csv: a header line `image_id,class_index`, then one line per image of the split in sample "
    "order; image_id is the stem of the image's source file name (e.g. n01440764_10026 for "
    "train/n01440764/n01440764_10026.JPEG), class_index the predicted class's index into the sorted class "
    "folder names (manifest.json `classes`)."
)


def _default_out(ckpt: Path, split: str) -> Path:
    """<run>/eval_<split> for <run>/checkpoints/X.pt, else eval_<split> beside the file."""
    run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    return run / f"eval_{split}"


def _scores(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    n = max(int(labels.shape[0]), 1)
    c1, c5 = topk_correct(probs, labels).tolist()
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n}


def evaluate(
    ckpts: list[str | Path],
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
    if not ckpts:
        raise UserError("give at least one checkpoint")
    if batch_size <= 0:
        raise UserError(f"--batch-size must be > 0 (got {batch_size})")
    dev = dist.pick_device(device)
    precision = Precision(amp, dev)
    manifest = Manifest.load(data)
    n_cls = manifest.num_classes
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
        members.append({"checkpoint": str(ck), "arch": rec["arch"], "res": r, **_scores(p, y)})
        say(f"{ck}: {rec['arch']} @ {r}px{' ten-crop' if ten_crop else ''}: top-1 {members[-1]['top1']:.2f}%")
        probs_all.append(p)
        del model
    probs = ensemble(probs_all)
    results: dict[str, Any] = {
        "split": split,
        "num_samples": int(labels.shape[0]),  # type: ignore[union-attr]
        "ten_crop": ten_crop,
        **_scores(probs, labels),  # type: ignore[arg-type]
        "members": members,
    }
    out_dir = Path(out) if out else _default_out(Path(ckpts[0]), split)
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = image_ids(manifest, split)
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
    say(f"{split}: {kind} top-1 {results['top1']:.2f}%, top-5 {results['top5']:.2f}% -> {out_dir}")
    return results


@main_guard
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse the command line, evaluate, return the results dict (top1, top5, members, out_dir, ...)."""
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
    ap.add_argument("--backend", default="cache", help="data backend: cache | ffcv | dali | torchvision")
    ap.add_argument("--device", default="auto", help="auto | cuda | cpu")
    ap.add_argument("--amp", default="bf16", help="GPU autocast: bf16 | fp16 | none")
    ap.add_argument("--verify", default="fast", help="manifest check: fast | full | off")
    a = ap.parse_args(argv)
    if a.res is not None and a.res <= 0:
        raise UserError(f"--res must be > 0 (got {a.res})")
    if a.amp not in ("bf16", "fp16", "none"):
        raise UserError(f"--amp must be bf16, fp16 or none (got {a.amp!r})")
    return evaluate(
        a.checkpoints, a.data, a.split, a.ten_crop, a.res, a.batch_size, a.backend, a.device, a.amp, a.verify,
        a.out,
    )  # fmt: skip


if __name__ == "__main__":
    main()

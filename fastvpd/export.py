"""`python -m fastvpd.export CKPT OUT`: a run's model as torchvision / timm / safetensors files.

CKPT: a checkpoint of `fastvpd.distill` or `fastvpd.linear` (the classifier: backbone + fc), or of
`fastvpd.pretrain` (the MoCo query backbone, without fc); a run folder (or its `checkpoints/`) means its
newest valid checkpoint. The checkpoint is verified (checksum, nothing executed) first.

Writes, beside each other (OUT's suffix is replaced):
- OUT.pt: `torch.save` of a plain state dict with torchvision's key names (`conv1.weight`, ..., `fc.bias`);
- OUT.safetensors: the same tensors (`pip install 'fastvpd[export]'`);
- OUT.json: arch, kind (classifier | backbone), num_classes, class names, input size, resize, mean/std,
  small_stem, and `load`: Python that rebuilds the model in torchvision and in timm.

A classifier loads with `strict=True` into `torchvision.models.<arch>(num_classes=N)` and into
`timm.create_model("<arch>", num_classes=N)`. A backbone has no fc: `strict=False`, and only `fc.weight`
/ `fc.bias` are reported missing. A small-stem model (`model.small_stem=true`, for 32-px data such as the
digits demo) has a 3×3 stride-1 conv1 and no max-pool, which no stock architecture has: the JSON says
`small_stem: true` and its `load` snippet swaps those two layers before loading.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fastvpd import checkpoint
from fastvpd.config import UserError, main_guard
from fastvpd.data.spec import EVAL_CROP_FRACTION, IMAGENET_MEAN, IMAGENET_STD, eval_crop
from fastvpd.extras import require
from fastvpd.models import build_backbone, unwrapped_key

__all__ = ["Exported", "export", "resolve_checkpoint", "main"]

FORMAT = "fastvpd-export/1"


@dataclass
class Exported:
    """What `export` wrote: the three files, the tensors and the JSON's contents."""

    pt: Path
    safetensors: Path
    json: Path
    state_dict: dict[str, Tensor]
    meta: dict[str, Any]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file as is; a run folder or its `checkpoints/` -> its newest valid checkpoint."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise UserError(f"{p} does not exist: pass a checkpoint (.pt) or a run folder")
    d = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    found = checkpoint.latest_valid(d)
    if found is None:
        raise UserError(f"{p} holds no valid checkpoint: pass a checkpoint file or a run folder")
    return found[0]


def _load_snippet(meta: dict[str, Any], pt_name: str) -> dict[str, str]:
    """Python that rebuilds the exported model as `model` in torchvision and in timm."""
    arch, n = meta["arch"], meta["num_classes"]
    ncls = f"num_classes={n}" if n else ""
    strict = "True" if meta["fc"] else "False"
    lines = {
        "torchvision": ["import torch, torchvision", f"model = torchvision.models.{arch}({ncls})"],
        "timm": [
            "import timm, torch",
            f"model = timm.create_model({arch!r}, pretrained=False{', ' + ncls if ncls else ''})",
        ],
    }
    for key in lines:
        if meta["small_stem"]:  # 3x3 stride-1 conv1, no max-pool (fastvpd.models.build_backbone)
            lines[key] += [
                f"model.conv1 = torch.nn.Conv2d(3, {meta['conv1_out_channels']}, 3, 1, 1, bias=False)",
                "model.maxpool = torch.nn.Identity()",
            ]
        lines[key] += [
            f"sd = torch.load({pt_name!r}, map_location='cpu', weights_only=True)",
            f"model.load_state_dict(sd, strict={strict})" + ("" if meta["fc"] else "  # no fc in a backbone"),
            "model.eval()",
        ]
    return {k: "\n".join(v) for k, v in lines.items()}


def _classifier_tensors(rec: dict[str, Any]) -> dict[str, Tensor]:
    """`Classifier` keys (`backbone.X`, `fc.*`) -> torchvision's (`X`, `fc.*`)."""
    out = {}
    for k, v in rec["state_dict"].items():
        k = unwrapped_key(k)
        out[k[len("backbone.") :] if k.startswith("backbone.") else k] = v
    return out


def export(ckpt: str | Path, out: str | Path) -> Exported:
    """Write OUT.pt, OUT.safetensors and OUT.json for the model in `ckpt` (see the module docstring)."""
    st = require("safetensors.torch", "export", "the .safetensors file")
    src = resolve_checkpoint(ckpt)
    obj = checkpoint.read_state(src)
    cfg = obj.get("config") if isinstance(obj.get("config"), dict) else {}
    rec = checkpoint.classifier_entry(obj)
    if rec is not None:
        arch, small_stem = str(rec["arch"]), bool(rec["small_stem"])
        sd, res = _classifier_tensors(rec), int(rec["res"])
        num_classes, classes = int(rec["num_classes"]), list(rec.get("classes") or [])
    else:
        model_cfg = cfg.get("model", {})
        if "arch" not in model_cfg:
            raise UserError(f"{src} names no model.arch: pass a checkpoint written by fastvpd")
        arch, small_stem = str(model_cfg["arch"]), bool(model_cfg.get("small_stem", False))
        sd = checkpoint.backbone_state(obj, arch, small_stem, source=str(src))
        aug = cfg.get("aug", {})
        res = eval_crop(int(aug.get("res", 224)), int(aug.get("eval_res", -1)))
        num_classes, classes = 0, []
    ref = build_backbone(arch, small_stem).state_dict()
    missing = [k for k in ref if k not in sd]
    if missing:
        raise UserError(f"{src}: the {arch} weights lack {missing[0]} ({len(missing)} keys): not exportable")
    sd = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in sd.items()}
    meta = {
        "format": FORMAT,
        "kind": "classifier" if num_classes else "backbone",
        "arch": arch,
        "num_classes": num_classes,
        "class_names": classes,
        "fc": bool(num_classes),
        "small_stem": small_stem,
        "conv1_out_channels": int(sd["conv1.weight"].shape[0]),
        "input_size": [3, res, res],
        "resize": round(res / EVAL_CROP_FRACTION),  # short side, bilinear + antialias, then centre crop
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "source": str(src),
    }
    out = Path(out)
    base = out.with_suffix("") if out.suffix in (".pt", ".pth", ".safetensors", ".json") else out
    paths = [base.with_name(base.name + ext) for ext in (".pt", ".safetensors", ".json")]
    meta["load"] = _load_snippet(meta, paths[0].name)
    base.parent.mkdir(parents=True, exist_ok=True)
    writers = (
        lambda p: torch.save(sd, p),
        lambda p: st.save_file(sd, str(p), metadata={"format": FORMAT, "arch": arch}),
        lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"),
    )
    for path, write in zip(paths, writers):
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            write(tmp)
            tmp.replace(path)
        except OSError as e:
            raise UserError(
                f"could not write {path} ({e.strerror or e}): free disk space or pick OUT"
            ) from None
        finally:
            tmp.unlink(missing_ok=True)
    return Exported(paths[0], paths[1], paths[2], sd, meta)


def how_to_load(ex: Exported) -> str:
    """The CLI's closing lines: what was written and how to load it."""
    m = ex.meta
    what = (
        f"{m['arch']} classifier, {m['num_classes']} classes"
        if m["fc"]
        else f"{m['arch']} backbone without fc: load with strict=False (fc.weight/fc.bias stay missing)"
    )
    lines = [f"wrote {ex.pt}, {ex.safetensors}, {ex.json}: {what}, {len(ex.state_dict)} tensors"]
    if m["small_stem"]:
        lines.append(
            "small stem (3x3 conv1, no max-pool): replace model.conv1 and model.maxpool before loading"
        )
    lines += ["load in torchvision:", *("  " + ln for ln in m["load"]["torchvision"].splitlines())]
    return "\n".join(lines)


@main_guard
def main(argv: list[str] | None = None) -> Exported:
    """Export a checkpoint; prints what was written and the torchvision loading code."""
    ap = argparse.ArgumentParser(
        prog="python -m fastvpd.export",
        description=__doc__.split("\n\n")[0] + " Writes OUT.pt, OUT.safetensors and OUT.json.",
    )
    ap.add_argument("checkpoint", help="a distill / linear / pretrain checkpoint (.pt), or a run folder")
    ap.add_argument("out", help="output path; OUT.pt, OUT.safetensors and OUT.json are written")
    args = ap.parse_args(argv)
    ex = export(args.checkpoint, args.out)
    print(how_to_load(ex))
    return ex


if __name__ == "__main__":
    main()

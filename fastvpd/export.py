"""`python -m fastvpd.export CKPT OUT`: a pretraining checkpoint's query backbone as a plain state dict.

OUT is a `torch.save`d dict with torchvision key names (no fc): load it with
`torchvision.models.<arch>().load_state_dict(sd, strict=False)` (or `fastvpd.models.build_backbone(arch,
small_stem=True)` for small-stem runs). The checkpoint is verified (checksum, weights_only) first.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from fastvpd import checkpoint
from fastvpd.config import UserError, main_guard
from fastvpd.models import backbone_state_for_torchvision, build_backbone

PREFIX = "encoder_q.backbone."


def export_backbone(ckpt_path: str | Path, out: str | Path) -> dict[str, torch.Tensor]:
    """Write the query backbone of the pretraining checkpoint `ckpt_path` to `out`; returns the dict."""
    state = checkpoint.load(ckpt_path)
    model_sd = state.get("task", {}).get("model", {})
    sd = {k[len(PREFIX) :]: v for k, v in model_sd.items() if k.startswith(PREFIX)}
    if not sd:
        raise UserError(f"{ckpt_path} holds no MoCo query backbone (is it a pretraining checkpoint?)")
    model_cfg = state.get("config", {}).get("model", {})
    backbone = build_backbone(model_cfg.get("arch", "resnet50"), bool(model_cfg.get("small_stem", False)))
    backbone.load_state_dict(sd)  # SplitBatchNorm keeps BatchNorm2d's keys, so this is exact
    out_sd = backbone_state_for_torchvision(backbone)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    torch.save(out_sd, tmp)
    tmp.replace(out)
    return out_sd


@main_guard
def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(prog="python -m fastvpd.export", description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="a pretraining checkpoint (runs/.../checkpoints/last.pt)")
    ap.add_argument("out", help="output .pt file (torchvision state dict of the backbone)")
    args = ap.parse_args(argv)
    sd = export_backbone(args.checkpoint, args.out)
    print(f"wrote {args.out}: {len(sd)} tensors")
    return Path(args.out)


if __name__ == "__main__":
    main()

"""Data loading: one AugSpec (spec.py), four backends (cache, ffcv, dali, torchvision), one contract.

`build_loader(...)` returns an iterable of `Batch(views, labels, indices)` with channels-last,
normalised views of the requested dtype on the requested device (see ARCHITECTURE.md). The loaders'
shared base is in base.py, the augmentation engine in augment/.
"""

from __future__ import annotations

from typing import Any

import torch

from fastvpd.config import UserError
from fastvpd.data.base import (
    Batch,
    LoaderBase,
    measure_loader,
    mix_seed,
    num_batches,
    render_then,
    shard_indices,
    torch_threads_kept,
    views_in_step,
)
from fastvpd.data.spec import AugSpec, eval_spec, from_config, moco_v2, supervised, with_res

__all__ = [
    "AugSpec",
    "Batch",
    "LoaderBase",
    "build_loader",
    "eval_spec",
    "from_config",
    "measure_loader",
    "mix_seed",
    "moco_v2",
    "num_batches",
    "render_then",
    "shard_indices",
    "supervised",
    "torch_threads_kept",
    "views_in_step",
    "with_res",
]

BACKENDS = ("cache", "ffcv", "dali", "torchvision")


def build_loader(
    data_cfg: Any,
    spec: AugSpec,
    split: str,
    batch_size: int,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    train: bool = True,
    **hooks: Any,
) -> LoaderBase:
    """Loader for `split` of the converted dataset at data_cfg.root, rendered by data_cfg.backend.

    `hooks`: constructor arguments of the backend's loader that are not user settings, for benchmarks and
    tests (e.g. `aug_kernel="triton"`, DALI's `pipelines=4`)."""
    from fastvpd.data.manifest import Manifest

    backend = data_cfg.backend
    if backend not in BACKENDS:
        raise UserError(f"data.backend={backend!r} is not one of {', '.join(BACKENDS)}")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    manifest = Manifest.load(data_cfg.root)
    fmt = {"cache": "cache", "ffcv": "ffcv", "dali": "dali", "torchvision": "files"}[backend]
    manifest.verify(split, [fmt], data_cfg.verify)
    common = dict(
        spec=spec,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        seed=seed,
        rank=rank,
        world_size=world_size,
        train=train,
    )
    workers = int(getattr(data_cfg, "workers", 0))
    if backend == "cache":
        from fastvpd.data.cache import CacheLoader

        return CacheLoader(manifest, split, **common, **hooks)
    if backend == "ffcv":
        from fastvpd.data.ffcv import FFCVLoader

        decode = str(getattr(data_cfg, "ffcv_decode", "twice"))
        return FFCVLoader(manifest, split, workers=workers, decode=decode, **common, **hooks)
    if backend == "dali":
        from fastvpd.data.dali import DALILoader

        return DALILoader(manifest, split, workers=workers, **common, **hooks)
    from fastvpd.data.torchvision import TorchvisionLoader

    return TorchvisionLoader(manifest, split, workers=workers, **common, **hooks)

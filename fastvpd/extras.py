"""Optional dependencies: which extra brings each, and one clear message when absent.

Nothing is imported here up front: each probe/require call tries its module then (a module already imported
is Python's cached one), so tests can block a module through sys.modules.

    nb = probe("numba")  # the module, or None when the extra is not installed
    plt = require("matplotlib.pyplot", "demo", "the demo's chart")  # the module, or UserError naming it

Core dependencies (torch, torchvision, numpy, pillow, pyyaml, omegaconf, tqdm, tensorboard) are
imported directly; everything here is in an extra of pyproject.toml.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from fastvpd.config import UserError

# module -> the pyproject extra that installs it
EXTRA_OF = {
    "numba": "cpu",
    "sklearn": "demo",
    "matplotlib": "demo",
    "ffcv": "ffcv",
    "nvidia.dali": "dali",
    "pynvml": "gpu",
    "psutil": "gpu",
    "safetensors": "export",
    "timm": "test",
}


def _load(name: str) -> tuple[ModuleType | None, str]:
    """(module, "") or (None, why it did not import: a broken build counts as absent)."""
    try:
        if name.split(".")[0] == "ffcv":
            from fastvpd.data.base import torch_threads_kept

            with torch_threads_kept():  # FFCV's import sets torch's thread count to 1
                return importlib.import_module(name), ""
        return importlib.import_module(name), ""
    except Exception as e:  # noqa: BLE001 - missing package or its native libraries
        return None, f"{type(e).__name__}: {e}"


def probe(name: str) -> ModuleType | None:
    """The module, or None when it is not installed (or fails to import: a broken build counts as absent)."""
    return _load(name)[0]


def require(name: str, extra: str | None = None, purpose: str = "") -> ModuleType:
    """The module, or a UserError naming the extra to install: one line, for the entry point to print."""
    mod = probe(name)
    if mod is not None:
        return mod
    top = name.split(".")[0] if name.split(".")[0] in EXTRA_OF else name
    extra = extra or EXTRA_OF.get(name) or EXTRA_OF.get(top, "")
    what = f" for {purpose}" if purpose else ""
    raise UserError(f"{name} is needed{what}: install it with pip install 'fastvpd[{extra}]'")


def require_ffcv(purpose: str, modules: tuple[str, ...], alternative: str = "") -> ModuleType:
    """`ffcv` once `modules` (its submodules that the caller uses) import, else a one-line UserError that
    says why FFCV is not usable, for `purpose`, and how to install it (or `alternative`)."""
    for name in ("ffcv", *modules):
        if probe(name) is None:
            other = f" or {alternative}" if alternative else ""
            raise UserError(
                f"{purpose} needs FFCV ({_load(name)[1]}): install it with pip install 'fastvpd[ffcv]'{other}"
            )
    return _load("ffcv")[0]  # type: ignore[return-value]

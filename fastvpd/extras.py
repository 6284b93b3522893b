"""Optional dependencies, probed once at import: which extra brings each, and one clear message when absent.

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


def probe(name: str) -> ModuleType | None:
    """The module, or None when it is not installed (or fails to import: a broken build counts as absent)."""
    try:
        return importlib.import_module(name)
    except Exception:
        return None


def require(name: str, extra: str | None = None, purpose: str = "") -> ModuleType:
    """The module, or a UserError naming the extra to install: one line, for the entry point to print."""
    mod = probe(name)
    if mod is not None:
        return mod
    top = name.split(".")[0] if name.split(".")[0] in EXTRA_OF else name
    extra = extra or EXTRA_OF.get(name) or EXTRA_OF.get(top, "")
    what = f" for {purpose}" if purpose else ""
    raise UserError(f"{name} is needed{what}: install it with pip install 'fastvpd[{extra}]'")

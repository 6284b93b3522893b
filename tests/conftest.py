"""Shared fixtures: the embedded digits data, made and converted once per test session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# One intra-op thread: the suite uses tiny tensors, where thread start-up costs more than it buys.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):  # type: ignore[no-untyped-def]
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run benchmarks/gpu_suite.sh on a GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def replay_views():  # type: ignore[no-untyped-def]
    """replay(deferred, step, batch, strict): seed a deferred cache loader's generator on the host for
    `batch`, then run the captured `step` on its indices; with `strict`, a host sync inside is an error."""

    def replay(deferred, step, batch, strict: bool):  # type: ignore[no-untyped-def]
        if strict:
            torch.cuda.set_sync_debug_mode("error")
        try:
            deferred.seed_views(batch)
            return step(batch.indices)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    return replay


@pytest.fixture(scope="session")
def digits_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ImageFolder tree of the scikit-learn digits: train/ val/ (50 per class) and test/ (the rest)."""
    from data_tools.make_digits import make_digits

    out = tmp_path_factory.mktemp("digits_src")
    make_digits(out, seed=0)
    return out


@pytest.fixture(scope="session")
def digits_converted(digits_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits_src converted into every format (ffcv, dali, cache) with manifest.json."""
    from data_tools.convert import convert

    out = tmp_path_factory.mktemp("digits_conv")
    convert(digits_src, out, formats=("ffcv", "dali", "cache"), workers=2, progress=False)
    return out

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
def one_thread():  # type: ignore[no-untyped-def]
    """One intra-op thread for the test (restored after): batches in the loader and augmentation tests
    are tiny, and on a shared 2-core box OpenMP contention costs more than threads buy."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def triton_child():  # type: ignore[no-untyped-def]
    """run(code, *args) -> dict: `code` in a fresh Python with TRITON_INTERPRET=1 and no visible GPU
    (Triton reads that switch at its first import), returning the JSON the child prints after `RESULT `."""
    import json
    import os
    import subprocess

    def run(code: str, *args: str) -> dict:
        env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
        cmd = [sys.executable, "-c", code, *args]
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
        assert p.returncode == 0 and line, p.stderr[-3000:]
        return json.loads(line[len("RESULT ") :])

    return run


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
    from fastvpd.datasets.digits import make_digits

    out = tmp_path_factory.mktemp("digits_src")
    make_digits(out, seed=0)
    return out


@pytest.fixture(scope="session")
def digits_converted(digits_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits_src converted into every format (ffcv, dali, cache) with manifest.json."""
    from fastvpd.convert import convert

    out = tmp_path_factory.mktemp("digits_conv")
    convert(digits_src, out, formats=("ffcv", "dali", "cache"), workers=2, progress=False)
    return out

"""`train.compile=true`: the compiled encoders train exactly like the eager ones and checkpoint the same keys.

Inductor's C++ code generation takes minutes per model on 2 cores, so these tests compile through the
`aot_eager` backend: Dynamo traces the same graphs and AOTAutograd builds the same joint forward/backward
that inductor would then lower. That covers what fastvpd owns (which modules are compiled, in-place
`Module.compile` keeping checkpoint keys, the momentum update and optimiser on compiled modules, resume
across compile on/off); inductor's kernels are measured on a GPU by `benchmarks/throughput.py --compile`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from fastvpd import checkpoint, distill, pretrain

TINY = [
    "model.arch=resnet18",
    "model.small_stem=true",
    "aug.res=16",
    "train.batch_size=16",
    "train.epochs=1",
    "train.max_steps=3",
    "train.device=cpu",
    "train.deterministic=true",
    "train.amp=none",
    "log.every=1",
    "log.tensorboard=false",
    "log.progress=false",
    "ckpt.every=1",
]
MOCO = ["moco.queue_size=64", "moco.mlp_hidden=16", "moco.dim=16", "moco.bn_splits=2", "eval.knn_every=0"]


@pytest.fixture
def compiled(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Route nn.Module.compile through the aot_eager backend; record the class of every compiled module."""
    calls: list[str] = []
    original = nn.Module.compile

    def compile_aot_eager(self: nn.Module, *args: object, **kwargs: object) -> None:
        calls.append(type(self).__name__)
        kwargs.setdefault("backend", "aot_eager")
        original(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "compile", compile_aot_eager)
    torch._dynamo.reset()
    yield calls
    torch._dynamo.reset()


def _weights(run: Path) -> dict[str, torch.Tensor]:
    """Trained tensors of a run's last checkpoint: MoCo's model, or the student and its connectors."""
    task = checkpoint.load(run / "checkpoints" / "last.pt")["task"]
    if "model" in task:
        return task["model"]
    connectors = {f"distiller.{k}": v for k, v in task["distiller"].items()}
    return {**task["classifier"]["state_dict"], **connectors}


def _assert_close(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float = 1e-4, atol: float = 1e-5
) -> None:
    assert a.keys() == b.keys()  # in-place Module.compile: no `_orig_mod.` in the checkpoint
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=k)


def test_pretrain_compiled_trains_like_eager(
    digits_converted: Path, tmp_path: Path, compiled: list[str]
) -> None:
    # One step: compiled, split-BN is one reduction over a view (models._split_bn_one_pass) instead of
    # the per-block kernels, so the two runs agree to float rounding, and this tiny MoCo (8-sample BN
    # groups) amplifies rounding ~50x per step (a 1e-7 relative nudge of every BN input gives 4e-4 after
    # three steps); after one step the weights agree to ~2e-5.
    args = [f"data.root={digits_converted}", *TINY, *MOCO, "train.max_steps=1"]
    eager = pretrain.main([*args, f"train.out_dir={tmp_path / 'eager'}"])
    assert compiled == []
    comp = pretrain.main([*args, f"train.out_dir={tmp_path / 'comp'}", "train.compile=true"])
    assert compiled == ["Encoder", "Encoder"]  # query and key encoders
    _assert_close(_weights(eager), _weights(comp), rtol=1e-3, atol=1e-4)
    # a compiled run's checkpoint resumes in an eager run (and the step count goes on)
    more = pretrain.main([*args, f"train.out_dir={tmp_path / 'comp'}", "train.max_steps=3"])
    assert checkpoint.load(more / "checkpoints" / "last.pt")["progress"]["global_step"] == 3


def test_distill_compiled_student_trains_like_eager(
    digits_converted: Path, tmp_path: Path, compiled: list[str]
) -> None:
    teacher = pretrain.main(
        [f"data.root={digits_converted}", *TINY, *MOCO, f"train.out_dir={tmp_path / 'pre'}"]
    )
    args = [
        f"data.root={digits_converted}",
        *TINY,
        f"distill.teacher={teacher / 'checkpoints' / 'last.pt'}",
        "distill.start_epoch=0",
        "eval.every=0",
    ]
    eager = distill.main([*args, f"train.out_dir={tmp_path / 'eager'}"])
    comp = distill.main([*args, f"train.out_dir={tmp_path / 'comp'}", "train.compile=true"])
    assert compiled == ["DistillNet"]  # teacher taps + student + connectors + OFD loss
    _assert_close(_weights(eager), _weights(comp))


@pytest.mark.parametrize("impl", ["s2d", "im2col"])
def test_rewritten_stems_compile_with_inductor(impl: str) -> None:
    """adapt_stem's forms through Inductor itself (one small stem, seconds on CPU): the benchmark's stem
    experiments (benchmarks/experiments/stems.py) compile them inside the whole step on a GPU, so their
    view/unfold/copy chains must lower, and give the convolution's output and weight gradient."""
    from fastvpd.models import adapt_stem, build_backbone

    torch._dynamo.reset()
    try:
        torch.manual_seed(5)
        net = build_backbone("resnet18")
        plain = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        plain.weight.data.copy_(net.conv1.weight)
        adapt_stem(net, 4, impl)
        x = torch.randn(2, 3, 40, 40).to(memory_format=torch.channels_last)
        y = torch.compile(net.conv1)(x)
        want = plain(x)
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
        up = torch.randn_like(want)
        (y * up).sum().backward()
        (want * up).sum().backward()
        torch.testing.assert_close(net.conv1.weight.grad, plain.weight.grad, rtol=1e-4, atol=1e-4)
    finally:
        torch._dynamo.reset()

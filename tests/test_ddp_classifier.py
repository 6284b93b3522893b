"""Two gloo processes take the same distillation / linear-probe steps as one process on the global batch.

The DDP wrappers are routed (`DistillNet.route`, `FrozenClassifier.route_fc`), not stored in the module
tree, so this also checks that the wrappers are what the forward calls (else the ranks' gradients would
not be averaged and the weights would match a half-batch step instead) and that state dicts stay raw.

BN needs care, as in test_dist.py: two processes normalise over their halves, one over the whole batch.
So every BN (student, teacher with teacher_bn=eval, OFD connectors) runs on running statistics; what is
left to compare is the gradient averaging DDP must get right. The distillation run takes a CE-only step
(the connector wrapper is not called at all: the reason for two wrappers) and then an OFD step.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from fastvpd import dist
from fastvpd.classifier import Classifier
from fastvpd.config import OptimConfig
from fastvpd.distill import _route_through_ddp
from fastvpd.linear import LINEAR_METRICS, FrozenClassifier, _route_fc_through_ddp, linear_step
from fastvpd.models import build_backbone
from fastvpd.ofd import DistillNet, build_teacher, distill_step
from fastvpd.optim import build_sgd
from fastvpd.step import DeviceMeters, Precision, pin_lr

B, RES, CLASSES = 8, 16, 4
CPU = torch.device("cpu")


def _data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, RES, RES, generator=g), torch.randint(0, CLASSES, (B,), generator=g)


def _distill_setup() -> tuple[DistillNet, torch.optim.Optimizer]:
    torch.manual_seed(0)
    teacher = build_teacher(build_backbone("resnet18", small_stem=True).state_dict(), "resnet18", True)
    net = DistillNet(Classifier("resnet18", CLASSES, small_stem=True), teacher, "ofd", teacher_bn="eval")
    net.eval()  # every BN on running statistics (see the module docstring)
    lr = torch.tensor(0.1)
    opt = build_sgd(net.trainable(), OptimConfig(), lr)
    pin_lr(opt, lr)
    return net, opt


def _distill_run(net: DistillNet, opt: torch.optim.Optimizer, part: slice) -> None:
    """A CE-only step, then a CE + OFD step (λ=1 so the connectors' update is not negligible)."""
    meters = DeviceMeters(["loss", "ce", "distill", "top1"], CPU)
    for seed, on in ((1, False), (2, True)):
        x, y = _data(seed)
        distill_step(net, opt, Precision("none", CPU), meters, x[part], y[part], lam=1.0, distill_on=on)


def _linear_setup() -> tuple[FrozenClassifier, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = FrozenClassifier("resnet18", CLASSES, small_stem=True)
    with torch.no_grad():
        model.fc.weight.mul_(100.0)  # gradients well above the comparison tolerance
    lr = torch.tensor(1.0)
    opt = build_sgd(model.fc.parameters(), OptimConfig(weight_decay=0.0), lr)
    pin_lr(opt, lr)
    return model, opt


def _linear_run(model: FrozenClassifier, opt: torch.optim.Optimizer, part: slice) -> None:
    meters = DeviceMeters(LINEAR_METRICS, CPU)
    for seed in (3, 4):
        x, y = _data(seed)
        linear_step(model, opt, Precision("none", CPU), meters, x[part], y[part])


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    info = dist.init("cpu")
    half = slice(rank * B // 2, (rank + 1) * B // 2)
    net, opt = _distill_setup()
    _route_through_ddp(net, info.device)
    _distill_run(net, opt, half)
    model, lopt = _linear_setup()
    _route_fc_through_ddp(model, info.device)
    _linear_run(model, lopt, half)
    torch.save({"distill": net.state_dict(), "linear": model.state_dict()}, f"{out}.{rank}")
    dist.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], keys: list[str]) -> bool:
    return all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4) for k in keys)


def test_two_process_distill_and_linear_steps_equal_single_process(tmp_path: Path, one_thread) -> None:  # noqa: ANN001
    """The single-process reference runs on one thread, as the workers do (an earlier test may leave more)."""
    out = str(tmp_path / "ddp.pt")
    mp.start_processes(_worker, args=(_free_port(), out), nprocs=2, join=True, start_method="fork")
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]

    # distillation: student + connectors as one process on the whole batch; the teacher untouched
    init, _ = _distill_setup()
    init_sd = {k: v.clone() for k, v in init.state_dict().items()}
    single, opt = _distill_setup()
    _distill_run(single, opt, slice(None))
    ref = single.state_dict()
    assert sorted(ref) == sorted(init_sd)  # same keys as a never-routed net: no `module.` anywhere
    trained = [k for k in ref if k.startswith(("student.", "distiller.connectors."))]
    assert any(k.startswith("distiller.connectors.") and k.endswith("weight") for k in trained)
    for sd in ranks:
        got = sd["distill"]
        assert sorted(got) == sorted(ref) and not any("module" in k.split(".") for k in got)
        for k in trained:
            assert torch.allclose(got[k], ref[k], atol=1e-5, rtol=1e-4), k
        for k in [k for k in got if k.startswith("teacher.")]:
            assert torch.equal(got[k], init_sd[k]), k
    conn_w = [k for k in trained if k.startswith("distiller.connectors.") and k.endswith("0.weight")]
    assert conn_w and not _close(ref, init_sd, conn_w)  # the OFD step did move the connectors
    alone, opt = _distill_setup()
    _distill_run(alone, opt, slice(0, B // 2))  # what rank 0 would hold without gradient averaging
    assert not _close(alone.state_dict(), ref, trained)

    # linear probe: fc as one process; the frozen backbone untouched
    lin_init, _ = _linear_setup()
    model, lopt = _linear_setup()
    _linear_run(model, lopt, slice(None))
    lref, linit = model.state_dict(), lin_init.state_dict()
    fc = ["fc.weight", "fc.bias"]
    assert not _close(lref, linit, fc)
    for sd in ranks:
        got = sd["linear"]
        assert sorted(got) == sorted(lref) and not any("module" in k.split(".") for k in got)
        assert _close(got, lref, fc)
        assert all(torch.equal(got[k], linit[k]) for k in got if k.startswith("backbone."))
    alone_l, lopt = _linear_setup()
    _linear_run(alone_l, lopt, slice(0, B // 2))
    assert not _close(alone_l.state_dict(), lref, fc)


def test_route_rejects_foreign_wrappers_and_none_restores_the_plain_call() -> None:
    net, _ = _distill_setup()
    other = Classifier("resnet18", CLASSES, small_stem=True)
    calls: list[int] = []

    class Spy(torch.nn.Module):
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

        def forward(self, *a: object, **kw: object) -> object:
            calls.append(1)
            return self.module(*a, **kw)

    with pytest.raises(ValueError, match="student"):
        net.route(Spy(other), None)
    x, _ = _data(5)
    plain = net(x, True)
    net.route(Spy(net.student), Spy(net.distiller))  # type: ignore[arg-type]
    routed = net(x, True)
    assert len(calls) == 2 and all(torch.equal(a, b) for a, b in zip(plain, routed))
    assert "_student_call" not in dict(net.named_modules()) and "Spy" not in repr(net)
    net.route(None, None)
    net(x, True)
    assert len(calls) == 2
    model, _ = _linear_setup()
    with pytest.raises(ValueError, match="fc"):
        model.route_fc(Spy(torch.nn.Linear(2, 2)))
    model.route_fc(Spy(model.fc))
    feats = torch.randn(3, model.fc.in_features)
    assert torch.equal(model.head(feats), model.fc(feats)) and len(calls) == 3

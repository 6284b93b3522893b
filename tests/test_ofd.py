"""OFD connectors and distiller; the distillation net's CE-only epochs."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

from fastvpd.classifier import Classifier
from fastvpd.losses import ofd_margin, ofd_partial_l2, smoothed_ce
from fastvpd.models import FeatureTaps, build_backbone, stage_bn, stage_channels
from fastvpd.ofd import (
    DISTILL_METRICS,
    Connector,
    DistillNet,
    OFDDistiller,
    build_teacher,
    distill_step,
    pooled_l2,
)
from fastvpd.step import DeviceMeters, Precision


def test_connector_init_matches_ofd() -> None:
    torch.manual_seed(0)
    conn = Connector(256, 512)
    conv, bn = conn[0], conn[1]
    assert conv.kernel_size == (1, 1) and conv.bias is None and conv.weight.shape == (512, 256, 1, 1)
    # OFD: normal_(0, sqrt(2 / n)), n = k*k*out_channels.
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2.0 / 512), rel=0.02)
    assert abs(conv.weight.mean().item()) < 1e-3
    assert torch.equal(bn.weight, torch.ones(512)) and torch.equal(bn.bias, torch.zeros(512))


def _teacher() -> nn.Module:
    torch.manual_seed(1)
    t = build_backbone("resnet18", small_stem=True)
    for bn in stage_bn(t):  # trained-looking BN so the margins differ per channel and hit both branches
        nn.init.normal_(bn.weight, 0.5, 0.3)
        nn.init.normal_(bn.bias, 0.0, 1.0)
    return t.eval()


def test_distiller_margins_and_loss_equal_the_manual_sum() -> None:
    teacher = _teacher()
    student = build_backbone("resnet18", small_stem=True).eval()
    dist = OFDDistiller(teacher, stage_channels(student))
    assert dist.stage_weights == (0.125, 0.25, 0.5, 1.0)
    for m, bn in zip(dist.margins(), stage_bn(teacher)):
        assert torch.equal(m, ofd_margin(bn.weight, bn.bias)) and (m <= 0).all()
    assert {n for n, _ in dist.named_buffers() if n.startswith("margin")} == {f"margin{i}" for i in range(4)}
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        t_feats, _ = FeatureTaps(teacher)(x)
    s_feats, _ = FeatureTaps(student)(x)
    dist.eval()
    loss = dist(s_feats, t_feats)
    manual = (
        sum(
            w * ofd_partial_l2(c(s), t, m)
            for w, c, s, t, m in zip(dist.stage_weights, dist.connectors, s_feats, t_feats, dist.margins())
        )
        / 4
    )
    assert loss.item() == pytest.approx(manual.item(), rel=1e-5) and loss.item() > 0
    loss.backward()
    assert all(p.grad is not None for p in dist.connectors.parameters())
    assert student.conv1.weight.grad is not None
    assert teacher.conv1.weight.grad is None  # teacher features are detached


def test_distiller_divides_by_batch_and_weights_stages() -> None:
    teacher = _teacher()
    dist = OFDDistiller(teacher, [8, 16, 32, 64]).eval()
    g = torch.Generator().manual_seed(2)
    chans_t = stage_channels(teacher)
    s = [torch.randn(2, c, 2, 2, generator=g) for c in (8, 16, 32, 64)]
    t = [torch.randn(2, c, 2, 2, generator=g) for c in chans_t]
    one = dist(s, t)
    doubled = dist([torch.cat([a, a]) for a in s], [torch.cat([b, b]) for b in t])
    assert doubled.item() == pytest.approx(one.item(), rel=1e-6)  # per-sample mean, λ left to the caller
    only_last = OFDDistiller(teacher, [8, 16, 32, 64], stage_weights=[0, 0, 0, 1]).eval()
    only_last.load_state_dict(dist.state_dict())
    last = ofd_partial_l2(dist.connectors[3](s[3]), t[3], dist.margins()[3]) / 2
    assert only_last(s, t).item() == pytest.approx(last.item(), rel=1e-6)
    with pytest.raises(ValueError):
        OFDDistiller(teacher, [8, 16, 32])


def test_pooled_l2() -> None:
    s = torch.tensor([[1.0, 2.0], [0.0, 0.0]], requires_grad=True)
    t = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    loss = pooled_l2(s, t)
    assert loss.item() == pytest.approx((1 + 4 + 1 + 1) / 2)
    loss.backward()
    assert torch.allclose(s.grad, (s - t).detach())


def _bn_stats(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.named_buffers() if k.endswith(("running_mean", "running_var"))}


@pytest.mark.parametrize("teacher_bn", ["train", "eval"])
def test_ce_only_steps_run_teacher_and_connectors_forward_but_train_on_the_ce_alone(teacher_bn: str) -> None:
    """Before distill.start_epoch the authors' Distiller still runs teacher and connectors forward in train
    mode (their BN statistics move; the checkpoints carry them); the loss and the gradients are the CE's."""
    torch.manual_seed(0)
    student = Classifier("resnet18", 3, small_stem=True)
    teacher = build_teacher(_teacher().state_dict(), "resnet18", True)
    net = DistillNet(student, teacher, "ofd", teacher_bn=teacher_bn)
    plain = copy.deepcopy(student)  # the reference: the student alone, trained on the CE
    t_before, c_before = _bn_stats(net.teacher), _bn_stats(net.distiller)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 1])

    opt = torch.optim.SGD(net.trainable(), lr=0.0)
    meters = DeviceMeters(DISTILL_METRICS, torch.device("cpu"))
    m = distill_step(net, opt, Precision("none", torch.device("cpu")), meters, x, y, distill_on=False)
    ce = smoothed_ce(plain(x), y, 0.1)
    ce.backward()

    assert m["loss"] == m["ce"] and m["distill"] == 0.0
    assert m["ce"] == pytest.approx(ce.item(), abs=1e-6)
    for (name, p), q in zip(net.student.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert all(p.grad is None for p in net.distiller.parameters())  # no gradient, so no weight decay
    for name, v in _bn_stats(net.student).items():  # the student's own statistics: as the plain forward's
        assert torch.equal(v, _bn_stats(plain)[name]), name
    c_moved = [k for k, v in _bn_stats(net.distiller).items() if not torch.equal(v, c_before[k])]
    t_moved = [k for k, v in _bn_stats(net.teacher).items() if not torch.equal(v, t_before[k])]
    assert len(c_moved) == 2 * len(net.distiller.connectors)  # every connector BN's mean and var
    if teacher_bn == "train":
        assert len(t_moved) == len(t_before)
    else:
        assert t_moved == []

"""Phase 2 (self-distillation): loss assembly, the frozen teacher, initialisation, baselines, errors, e2e."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from fastvpd import checkpoint, config
from fastvpd.checkpoint import backbone_state, read_state
from fastvpd.classifier import Classifier
from fastvpd.config import UserError
from fastvpd.distill import build_net, distill_active
from fastvpd.moco import MoCo
from fastvpd.models import backbone_state_for_torchvision
from fastvpd.ofd import DISTILL_METRICS, DistillNet, L2Distiller, OFDDistiller, build_teacher, distill_step
from fastvpd.step import DeviceMeters, Precision

ARCH = "resnet18"


def _moco(seed: int = 0) -> MoCo:
    torch.manual_seed(seed)
    m = MoCo(ARCH, dim=4, mlp_hidden=8, queue_size=8, bn_splits=2, small_stem=False)
    with torch.no_grad():  # make the key encoder differ from the query encoder, so picking q is tested
        for p in m.encoder_k.parameters():
            p.add_(0.5)
        for name, b in m.encoder_q.backbone.named_buffers():  # non-trivial BN statistics
            if name.endswith("running_mean"):
                b.normal_()
    return m


def _pretrain_ckpt(path: Path, moco: MoCo, arch: str = ARCH, small_stem: bool = False) -> Path:
    """A checkpoint laid out as fastvpd.pretrain writes it (task.model = MoCo state, config.model)."""
    state = {
        "task": {"model": moco.state_dict()},
        "config": {"model": {"arch": arch, "small_stem": small_stem}},
    }
    return checkpoint.save(path, state, global_step=1, epoch=1)


def _cfg(teacher: str = "", **over: str) -> object:
    args = [f"model.arch={ARCH}", "model.small_stem=false"] + (
        [f"distill.teacher={teacher}"] if teacher else []
    )
    args += [f"{k}={v}" for k, v in over.items()]
    return config.load(config.DistillRun, args)


def _net(tmp_path: Path, **over: str) -> tuple[DistillNet, MoCo]:
    moco = _moco()
    ck = _pretrain_ckpt(tmp_path / "pre.pt", moco)
    return build_net(_cfg(str(ck), **over), num_classes=3, say=lambda *_: None), moco


def _step(net: DistillNet, lr: float, lam: float = 1e-4, on: bool = True, steps: int = 1) -> dict:
    torch.manual_seed(1)
    opt = torch.optim.SGD(net.trainable(), lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-4)
    meters = DeviceMeters(DISTILL_METRICS, torch.device("cpu"))
    out = {}
    for i in range(steps):
        g = torch.Generator().manual_seed(i)
        x, y = torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 3, (4,), generator=g)
        out = distill_step(
            net, opt, Precision("none", torch.device("cpu")), meters, x, y, lam=lam, distill_on=on
        )
    return {k: float(v) for k, v in out.items()}


def test_distill_term_is_zero_before_start_epoch_and_positive_after(tmp_path: Path) -> None:
    net, _ = _net(tmp_path)
    assert [distill_active(e, 5) for e in range(6)] == [False] * 4 + [True] * 2  # epoch 5 counted from 1
    assert distill_active(0, 0) and distill_active(0, 1)
    x = torch.randn(4, 3, 16, 16)
    _, off = net(x, distill_on=False)
    assert off.item() == 0.0
    _, on = net(x, distill_on=True)
    assert on.item() > 0.0
    m = _step(net, lr=0.0, on=False)
    assert m["distill"] == 0.0 and m["loss"] == m["ce"]
    m = _step(net, lr=0.0, on=True)
    assert m["distill"] > 0.0 and m["loss"] > m["ce"]


def test_lambda_scales_the_term_linearly(tmp_path: Path) -> None:
    net, _ = _net(tmp_path, **{"distill.teacher_bn": "eval"})
    a = _step(net, lr=0.0, lam=1e-4)  # lr 0: the weights do not move between the two measurements
    b = _step(net, lr=0.0, lam=2e-4)
    assert a["distill"] == pytest.approx(b["distill"], rel=1e-6)
    assert b["loss"] - b["ce"] == pytest.approx(2 * (a["loss"] - a["ce"]), rel=1e-5)
    assert a["loss"] - a["ce"] == pytest.approx(1e-4 * a["distill"], rel=1e-5)


@pytest.mark.parametrize("teacher_bn", ["train", "eval"])
def test_teacher_is_frozen_and_bit_identical_after_training(tmp_path: Path, teacher_bn: str) -> None:
    net, _ = _net(tmp_path, **{"distill.teacher_bn": teacher_bn})
    t_params = {k: v.clone() for k, v in net.teacher.named_parameters()}
    t_bufs = {k: v.clone() for k, v in net.teacher.named_buffers()}
    s_before = copy.deepcopy(net.student.state_dict())
    assert not any(p.requires_grad for p in net.teacher.parameters())
    assert {id(p) for p in net.trainable()}.isdisjoint(id(p) for p in net.teacher.parameters())
    net.train()
    assert net.teacher.training == (teacher_bn == "train") and net.student.training
    _step(net, lr=0.1, steps=2)
    for k, v in net.teacher.named_parameters():
        assert torch.equal(v, t_params[k]), k
    moved = [k for k, v in net.teacher.named_buffers() if not torch.equal(v, t_bufs[k])]
    if teacher_bn == "eval":
        assert moved == []
    else:  # batch statistics: running stats update, as in the authors' code
        assert any(k.endswith("running_mean") for k in moved)
    assert any(not torch.equal(v, s_before[k]) for k, v in net.student.state_dict().items())


def test_student_and_teacher_start_from_the_moco_query_backbone(tmp_path: Path) -> None:
    net, moco = _net(tmp_path)
    want = backbone_state_for_torchvision(moco.encoder_q.backbone)  # split-BN keys == plain BN keys
    for name, sd in (("student", net.student.backbone.state_dict()), ("teacher", net.teacher.state_dict())):
        assert set(sd) == set(want), name
        for k in want:
            assert torch.equal(sd[k], want[k]), (name, k)
    k_state = moco.encoder_k.backbone.state_dict()
    assert not torch.equal(net.student.backbone.conv1.weight, k_state["conv1.weight"])
    assert isinstance(net.distiller, OFDDistiller)
    assert net.student.fc.out_features == 3


def test_baseline_modes_build_the_right_models(tmp_path: Path) -> None:
    scratch = build_net(_cfg("", **{"model.init": "random", "distill.kind": "none"}), 3, say=lambda *_: None)
    assert scratch.teacher is None and scratch.distiller is None  # no teacher file needed at all
    finetune, moco = _net(tmp_path, **{"distill.kind": "none"})
    assert finetune.teacher is None and finetune.distiller is None
    assert torch.equal(finetune.student.backbone.conv1.weight, moco.encoder_q.backbone.conv1.weight)
    assert {id(p) for p in finetune.trainable()} == {id(p) for p in finetune.student.parameters()}
    l2, _ = _net(tmp_path, **{"distill.kind": "l2"})
    assert isinstance(l2.distiller, L2Distiller) and l2.teacher is not None
    x = torch.randn(4, 3, 16, 16)
    assert l2(x, distill_on=True)[1].item() == 0.0  # same weights, identity connector: nothing to distil
    with torch.no_grad():
        l2.student.backbone.layer4[1].conv2.weight.mul_(1.5)
    assert l2(x, distill_on=True)[1].item() > 0.0
    with pytest.raises(UserError, match="distill.teacher"):
        build_net(_cfg("", **{"distill.kind": "ofd"}), 3)
    ofd, _ = _net(tmp_path)
    conn = {id(p) for p in ofd.distiller.parameters()}
    assert conn and conn <= {id(p) for p in ofd.trainable()}  # connectors train with the student


def test_backbone_from_official_moco_and_torchvision_files(tmp_path: Path) -> None:
    moco = _moco()
    q = backbone_state_for_torchvision(moco.encoder_q.backbone)
    official = {f"module.encoder_q.{k}": v for k, v in q.items()}
    official["module.encoder_q.fc.0.weight"] = torch.zeros(2, 2)  # MoCo's MLP head: dropped
    official.update({f"module.encoder_k.{k}": v + 1 for k, v in q.items()})
    torch.save({"state_dict": official, "epoch": 3}, tmp_path / "moco.pth.tar")
    got = backbone_state(read_state(tmp_path / "moco.pth.tar"), ARCH, False)
    assert all(torch.equal(got[k], q[k]) for k in q)
    torch.save(q, tmp_path / "tv.pth")
    got = backbone_state(read_state(tmp_path / "tv.pth"), ARCH, False)
    assert all(torch.equal(got[k], q[k]) for k in q)
    teacher = build_teacher(got, ARCH, False)
    assert not any(p.requires_grad for p in teacher.parameters())


def test_mismatching_teacher_is_a_one_line_error(tmp_path: Path) -> None:
    ck = _pretrain_ckpt(tmp_path / "pre.pt", _moco())
    obj = read_state(ck)
    with pytest.raises(UserError, match="model.arch=resnet34") as e:
        backbone_state(obj, "resnet34", False, source="t")
    assert "\n" not in str(e.value) and "resnet18" in str(e.value)
    with pytest.raises(UserError, match="small_stem"):
        backbone_state(obj, ARCH, True, source="t")
    with pytest.raises(UserError, match="does not exist"):
        read_state(tmp_path / "nope.pt")
    cls = Classifier(ARCH, 7)  # a classifier checkpoint as teacher: its class count must match the data
    rec = {"arch": ARCH, "small_stem": False, "num_classes": 7, "res": 16, "state_dict": cls.state_dict()}
    ck7 = checkpoint.save(tmp_path / "cls7.pt", {"task": {"classifier": rec}}, global_step=0, epoch=0)
    with pytest.raises(UserError, match="7 classes") as e:
        build_net(_cfg(str(ck7)), num_classes=3, say=lambda *_: None)
    assert "\n" not in str(e.value)
    net = build_net(_cfg(str(ck7)), num_classes=7, say=lambda *_: None)
    assert torch.equal(net.teacher.conv1.weight, cls.backbone.conv1.weight)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError):
        read_state(tmp_path / "junk.pt")


def test_classifier_taps_match_the_plain_forward() -> None:
    torch.manual_seed(0)
    c = Classifier(ARCH, 5, small_stem=True).eval()  # the 32-px stem: taps work for it too
    x = torch.randn(2, 3, 16, 16)
    feats, pooled, logits = c(x, taps=True)
    assert len(feats) == 4 and pooled.shape == (2, 512)
    assert torch.equal(logits, c(x))


@pytest.mark.slow
def test_end_to_end_pretrain_distill_evaluate(digits_converted: Path, tmp_path: Path, capsys) -> None:
    """pretrain (2 steps) → distill (2 epochs, distillation from the 2nd) → evaluate --ten-crop."""
    from fastvpd import distill, evaluate, pretrain

    root = Path(__file__).resolve().parents[1] / "configs"
    common = [f"data.root={digits_converted}", "aug.res=16", "log.progress=false", "log.tensorboard=false"]
    pre = pretrain.main(
        ["--config", str(root / "demo_digits_pretrain.yaml"), f"train.out_dir={tmp_path / 'pre'}",
         "train.max_steps=2", "eval.knn_every=0", *common]
    )  # fmt: skip
    teacher = Path(pre) / "checkpoints" / "last.pt"
    run = distill.main(
        ["--config", str(root / "demo_digits_distill.yaml"), f"train.out_dir={tmp_path / 'dis'}",
         f"distill.teacher={teacher}", "train.epochs=2", "train.batch_size=250", "distill.start_epoch=2",
         "eval.every=1", *common]
    )  # fmt: skip
    rows = [__import__("json").loads(s) for s in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "distill" in r]
    assert {r["epoch"] for r in train_rows} == {1, 2}
    assert all(r["distill"] == 0.0 for r in train_rows if r["epoch"] == 1)
    assert all(r["distill"] > 0.0 for r in train_rows if r["epoch"] == 2)
    assert [r["epoch"] for r in rows if "val_top1" in r] == [1, 2]
    assert (Path(run) / "checkpoints" / "best.pt").is_file()
    res = evaluate.main(
        [str(Path(run) / "checkpoints" / "last.pt"), "--data", str(digits_converted), "--split", "val",
         "--ten-crop", "--out", str(tmp_path / "ev")]
    )  # fmt: skip
    assert res["num_samples"] == 500 and 0.0 <= res["top1"] <= res["top5"] <= 100.0
    assert (tmp_path / "ev" / "predictions.csv").read_text().count("\n") == 501
    # the same teacher for a student of another arch: one line, exit code 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        distill.main(
            ["--config", str(root / "demo_digits_distill.yaml"), f"train.out_dir={tmp_path / 'bad'}",
             f"distill.teacher={teacher}", "model.arch=resnet34", *common]
        )  # fmt: skip
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "model.arch=resnet34" in err

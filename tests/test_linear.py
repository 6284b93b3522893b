"""Linear probe: frozen backbone in eval mode, only the fc trains, MoCo's init, end-to-end on digits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fastvpd import checkpoint
from fastvpd.checkpoint import load_classifier
from fastvpd.linear import LINEAR_METRICS, FrozenClassifier, linear_step
from fastvpd.moco import MoCo
from fastvpd.models import backbone_state_for_torchvision
from fastvpd.step import DeviceMeters, Precision

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_frozen_backbone_stays_in_eval_mode_and_bit_identical() -> None:
    torch.manual_seed(0)
    model = FrozenClassifier("resnet18", 4, small_stem=False)
    assert 0.005 < model.fc.weight.std().item() < 0.015 and torch.equal(model.fc.bias, torch.zeros(4))
    model.train()
    assert model.training and model.fc.training and not model.backbone.training
    assert not any(m.training for m in model.backbone.modules())
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    fc_before = model.fc.weight.clone()
    opt = torch.optim.SGD(model.fc.parameters(), lr=30.0, momentum=0.9)
    meters = DeviceMeters(LINEAR_METRICS, torch.device("cpu"))
    for i in range(2):
        g = torch.Generator().manual_seed(i)
        x, y = torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 4, (4,), generator=g)
        m = linear_step(model, opt, Precision("none", torch.device("cpu")), meters, x, y)
        assert torch.isfinite(m["loss"])
    for k, v in model.backbone.state_dict().items():  # weights AND BN running statistics
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.backbone.parameters())
    assert not torch.equal(model.fc.weight, fc_before)


@pytest.mark.slow
def test_linear_probe_end_to_end(digits_converted: Path, tmp_path: Path, capsys) -> None:
    from fastvpd import evaluate, linear

    torch.manual_seed(0)
    moco = MoCo("resnet18", dim=8, mlp_hidden=16, queue_size=256, bn_splits=2, small_stem=False)
    state = {
        "task": {"model": moco.state_dict()},
        "config": {"model": {"arch": "resnet18", "small_stem": False}},
    }
    pre = checkpoint.save(tmp_path / "pre.pt", state, global_step=1, epoch=1)
    common = [f"data.root={digits_converted}", f"linear.backbone={pre}", "aug.res=16", "log.progress=false",
              "log.tensorboard=false"]  # fmt: skip
    run = linear.main(
        ["--config", str(CONFIGS / "demo_digits_linear.yaml"), f"train.out_dir={tmp_path / 'lin'}",
         "train.epochs=2", "train.batch_size=250", "eval.every=1", *common]
    )  # fmt: skip
    rows = [json.loads(s) for s in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_top1" in r]
    assert [r["epoch"] for r in evals] == [1, 2] and all(0 <= r["val_top1"] <= 100 for r in evals)
    assert "val top-1" in capsys.readouterr().out
    model, rec = load_classifier(Path(run) / "checkpoints" / "last.pt")
    assert rec["num_classes"] == 10 and rec["res"] == 16
    want = backbone_state_for_torchvision(moco.encoder_q.backbone)
    got = model.backbone.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)  # MoCo's lincls sanity check: backbone untouched
    res = evaluate.main([str(Path(run) / "checkpoints" / "last.pt"), "--data", str(digits_converted),
                         "--split", "val", "--out", str(tmp_path / "ev")])  # fmt: skip
    assert res["top1"] == pytest.approx(evals[-1]["val_top1"], abs=1e-6)  # same transform, same number
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        linear.main(["--config", str(CONFIGS / "demo_digits_linear.yaml"), "model.init=random", *common])
    assert e.value.code == 2 and "unknown config key 'model.init'" in capsys.readouterr().err

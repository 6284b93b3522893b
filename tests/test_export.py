"""`python -m fastvpd.export`: the distilled classifier in torchvision and timm (strict=True, the logits of
fastvpd.evaluate), the backbone-only export of a pretraining run, small-stem models, the CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from fastvpd import checkpoint, distill, evaluate
from fastvpd.checkpoint import classifier_record, load_classifier
from fastvpd.classifier import Classifier
from fastvpd.config import DataConfig, UserError
from fastvpd.data import build_loader, eval_spec
from fastvpd.export import export, main
from fastvpd.moco import MoCo

timm = pytest.importorskip("timm")
pytest.importorskip("safetensors")
from safetensors.torch import load_file  # noqa: E402
from tiny_data import converted_tree  # noqa: E402

RES = 16
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes x (8 train, 4 val) 20-px images, converted to the cache."""
    return converted_tree(tmp_path_factory, "exp", {"train": 8, "val": 4}, classes=3, size=20)


@pytest.fixture(scope="module")
def runs(data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A pretraining checkpoint (MoCo layout) and the distillation run trained from it (2 steps)."""
    base = tmp_path_factory.mktemp("exp_runs")
    torch.manual_seed(0)
    moco = MoCo("resnet18", dim=8, mlp_hidden=16, queue_size=12, bn_splits=1, small_stem=False)
    cfg = {"model": {"arch": "resnet18", "small_stem": False}, "aug": {"res": RES, "eval_res": -1}}
    state = {"task": {"model": moco.state_dict()}, "config": cfg}
    pre = checkpoint.save(base / "pre" / "checkpoints" / "last.pt", state, global_step=1, epoch=1)
    dis = distill.main(
        [f"data.root={data}", f"train.out_dir={base / 'dis'}", f"distill.teacher={pre}",
         "model.arch=resnet18", "model.small_stem=false", f"aug.res={RES}", "train.batch_size=12",
         "train.epochs=1", "train.max_steps=2", "distill.start_epoch=1", "train.device=cpu", "train.amp=none",
         "eval.every=0", "log.progress=false", "log.tensorboard=false", "optim.lr=0.5"]
    )  # fmt: skip
    return {"pre": pre, "dis": Path(dis) / "checkpoints" / "last.pt"}


def _val_views(data: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The val split as fastvpd.evaluate feeds it (eval transform at RES), in sample order."""
    loader = build_loader(
        DataConfig(root=str(data)), eval_spec(RES), "val", 5, CPU, torch.float32, train=False
    )
    loader.set_epoch(0)
    xs, idx = zip(*((b.views[0], b.indices) for b in loader))
    x, i = torch.cat(xs), torch.cat(idx)
    return x[torch.argsort(i)], torch.sort(i).values


def _run_snippet(code: str, where: Path, monkeypatch: pytest.MonkeyPatch) -> torch.nn.Module:
    monkeypatch.chdir(where)
    scope: dict = {}
    exec(code, scope)  # the JSON's own loading code, as a user would paste it
    return scope["model"]


def test_distilled_classifier_loads_strict_into_torchvision_and_timm_with_evaluates_logits(
    data: Path, runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ex = export(runs["dis"], tmp_path / "model.pt")
    meta = json.loads(ex.json.read_text())
    assert meta["kind"] == "classifier" and meta["arch"] == "resnet18" and meta["fc"] is True
    assert meta["num_classes"] == 3 and meta["class_names"] == ["c0", "c1", "c2"]
    assert meta["input_size"] == [3, RES, RES] and meta["resize"] == round(RES / 0.875)
    assert meta["mean"] == pytest.approx([0.485, 0.456, 0.406]) and meta["small_stem"] is False
    sd = torch.load(ex.pt, map_location="cpu", weights_only=True)
    st = load_file(str(ex.safetensors))
    assert set(sd) == set(st) and all(torch.equal(sd[k], st[k]) for k in sd)

    tv = torchvision.models.resnet18(num_classes=3)
    tv.load_state_dict(sd, strict=True)
    tm = timm.create_model("resnet18", pretrained=False, num_classes=3)
    tm.load_state_dict(st, strict=True)
    ours, _ = load_classifier(runs["dis"])
    x, idx = _val_views(data)
    with torch.no_grad():
        want = ours(x)
        got_tv, got_tm = tv.eval()(x), tm.eval()(x)
    assert torch.equal(got_tv, want)
    torch.testing.assert_close(got_tm, want, rtol=1e-5, atol=1e-5)

    res = evaluate.run(checkpoints=[runs["dis"]], data=data, split="val", device="cpu", amp="none",
                       out=tmp_path / "ev", say=lambda *_: None)  # fmt: skip
    probs = torch.from_numpy(np.load(tmp_path / "ev" / "probs.npy"))
    assert res["num_samples"] == len(idx) == 12
    for got in (got_tv, got_tm):  # evaluate's softmax of the same images, sample order
        torch.testing.assert_close(got.softmax(1), probs, rtol=1e-5, atol=1e-6)

    for lib in ("torchvision", "timm"):  # the JSON's own snippets give the same model
        model = _run_snippet(meta["load"][lib], tmp_path, monkeypatch)
        with torch.no_grad():
            torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)


def test_pretraining_export_is_a_backbone_without_fc(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ex = main([str(runs["pre"].parent.parent), str(tmp_path / "backbone")])  # a run folder: its last.pt
    out = capsys.readouterr().out
    assert "strict=False" in out and "without fc" in out
    assert ex.pt == tmp_path / "backbone.pt" and ex.safetensors.is_file()
    meta = json.loads(ex.json.read_text())
    assert meta["kind"] == "backbone" and meta["fc"] is False and meta["num_classes"] == 0
    assert "strict=False" in meta["load"]["torchvision"] and meta["input_size"] == [3, RES, RES]
    sd = torch.load(ex.pt, weights_only=True)
    for model in (torchvision.models.resnet18(), timm.create_model("resnet18", pretrained=False)):
        missing, unexpected = model.load_state_dict(sd, strict=False)
        assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected
    q = checkpoint.load(runs["pre"])["task"]["model"]
    assert torch.equal(sd["layer4.1.bn2.running_var"], q["encoder_q.backbone.layer4.1.bn2.running_var"])


def test_small_stem_classifier_says_so_and_its_snippets_rebuild_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(3)
    clf = Classifier("resnet18", 10, small_stem=True).eval()
    with torch.no_grad():
        for name, b in clf.named_buffers():
            if name.endswith("running_mean"):
                b.normal_()  # running statistics that matter in eval mode
    rec = classifier_record(clf, 32, [str(i) for i in range(10)])
    ck = checkpoint.save(tmp_path / "digits.pt", {"task": {"classifier": rec}, "config": {}}, global_step=0)
    ex = export(ck, tmp_path / "out" / "digits.pt")
    meta = json.loads(ex.json.read_text())
    assert meta["small_stem"] is True and meta["conv1_out_channels"] == 64
    with pytest.raises(RuntimeError, match="conv1.weight"):  # why the JSON says so: no stock arch fits
        torchvision.models.resnet18(num_classes=10).load_state_dict(ex.state_dict)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = clf(x)
        for lib in ("torchvision", "timm"):
            model = _run_snippet(meta["load"][lib], ex.pt.parent, monkeypatch)
            torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)


def test_cli_help_and_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "OUT.safetensors" in capsys.readouterr().out
    (tmp_path / "notes.txt").write_text("hello\n")
    for bad in (tmp_path / "notes.txt", tmp_path / "missing.pt", tmp_path):
        with pytest.raises(SystemExit) as e:
            main([str(bad), str(tmp_path / "o")])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("error:") and "\n" not in err, err
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # the export extra not installed
    with pytest.raises(UserError, match=r"fastvpd\[export\]"):
        export(tmp_path / "notes.txt", tmp_path / "o")

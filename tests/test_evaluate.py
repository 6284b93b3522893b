"""Evaluation: top-k counting, ten-crop views and averaging, ensembles (mean of softmax), CSV, errors."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from fastvpd import checkpoint
from fastvpd.checkpoint import classifier_record
from fastvpd.classifier import Classifier
from fastvpd.config import DataConfig
from fastvpd.data import Batch, build_loader, eval_spec
from fastvpd.data.manifest import Manifest
from fastvpd.evaluate import ensemble, predict, topk_correct
from fastvpd.evaluate import main as evaluate_main


def _classifier_ckpt(path: Path, seed: int, classes: list[str], res: int = 16) -> Path:
    torch.manual_seed(seed)
    model = Classifier("resnet18", len(classes), small_stem=False)
    with torch.no_grad():
        model.fc.weight.mul_(20.0)  # confident, seed-dependent predictions
    state = {"task": {"classifier": classifier_record(model, res, classes)}, "config": {}}
    return checkpoint.save(path, state, global_step=0, epoch=0)


def test_topk_correct_known_answer() -> None:
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.2, 0.7], [0.5, 0.3, 0.2], [0.0, 0.1, 0.9]])
    labels = torch.tensor([0, 1, 2, 0])  # ranks of the label: 1st, 2nd, 3rd, 3rd
    assert topk_correct(logits, labels, (1, 2, 3)).tolist() == [1.0, 2.0, 4.0]
    assert topk_correct(logits, labels, (1, 5)).tolist() == [1.0, 4.0]  # k > classes: every sample counts


class _MeanModel(nn.Module):
    """logits = [mean(x), 0]: a known function of the input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([m, torch.zeros_like(m)], dim=1)


class _TenViewLoader:
    """Two batches of 3 samples whose 10 views are constant images of value j (view j)."""

    device = torch.device("cpu")

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        pass

    def __iter__(self):  # type: ignore[no-untyped-def]
        for b in range(2):
            views = [torch.full((3, 3, 4, 4), float(j)) for j in range(10)]
            yield Batch(views, torch.zeros(3, dtype=torch.long), torch.arange(3) + 3 * b)


def test_predict_averages_softmax_over_ten_views_known_answer() -> None:
    probs, labels, idx = predict(_MeanModel(), _TenViewLoader())
    want = sum(1.0 / (1.0 + math.exp(-j)) for j in range(10)) / 10  # softmax([j, 0])[0] = sigmoid(j)
    assert probs.shape == (6, 2) and idx.tolist() == list(range(6)) and labels.shape == (6,)
    assert torch.allclose(probs[:, 0], torch.full((6,), want, dtype=torch.float32), atol=1e-6)
    assert torch.allclose(probs.sum(1), torch.ones(6))
    # averaging logits instead of probabilities would give sigmoid(4.5): a different number
    assert abs(want - 1.0 / (1.0 + math.exp(-4.5))) > 0.01


def test_ten_crop_views_are_corners_centre_and_mirrors(digits_converted: Path) -> None:
    cfg = DataConfig(root=str(digits_converted), backend="cache")
    ten = build_loader(cfg, eval_spec(16, ten_crop=True), "val", 8, "cpu", train=False)
    one = build_loader(cfg, eval_spec(16), "val", 8, "cpu", train=False)
    b10, b1 = next(iter(ten)), next(iter(one))
    assert len(b10.views) == 10 and all(v.shape == (8, 3, 16, 16) for v in b10.views)
    assert torch.equal(b10.indices, b1.indices)
    torch.testing.assert_close(b10.views[4], b1.views[0])  # the centre crop is the single-crop view
    # crops of the mirrored image: its top-left corner is the original top-right one, mirrored, etc.
    for mirrored, original in ((5, 1), (6, 0), (7, 3), (8, 2)):
        torch.testing.assert_close(b10.views[mirrored], b10.views[original].flip(-1))
    assert not torch.equal(b10.views[0], b10.views[3])


def test_ensemble_is_the_mean_of_softmax() -> None:
    a, b = torch.softmax(torch.randn(5, 4), 1), torch.softmax(torch.randn(5, 4), 1)
    assert torch.allclose(ensemble([a, b]), (a + b) / 2)
    with pytest.raises(Exception, match="shape"):
        ensemble([a, b[:3]])


def test_evaluate_cli_ensemble_csv_and_results(digits_converted: Path, tmp_path: Path) -> None:
    man = Manifest.load(digits_converted)
    c1 = _classifier_ckpt(tmp_path / "a" / "checkpoints" / "last.pt", 1, man.classes)
    c2 = _classifier_ckpt(tmp_path / "b.pt", 2, man.classes)
    args = ["--data", str(digits_converted), "--split", "val", "--batch-size", "200"]
    r1 = evaluate_main([str(c1), *args, "--out", str(tmp_path / "e1")])
    r2 = evaluate_main([str(c2), *args, "--out", str(tmp_path / "e2")])
    rr = evaluate_main([str(c1), str(c2), *args, "--out", str(tmp_path / "ens")])
    p1, p2, pe = (np.load(tmp_path / d / "probs.npy") for d in ("e1", "e2", "ens"))
    assert pe.shape == (500, 10)
    np.testing.assert_allclose(pe, (p1 + p2) / 2, rtol=1e-5, atol=1e-6)
    assert [m["top1"] for m in rr["members"]] == [r1["top1"], r2["top1"]]
    labels = np.array(man.labels("val"))
    assert rr["top1"] == pytest.approx(100.0 * float((pe.argmax(1) == labels).mean()))
    assert json.loads((tmp_path / "ens" / "results.json").read_text())["top1"] == rr["top1"]
    with open(tmp_path / "ens" / "predictions.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["image_id", "class_index"] and len(rows) == 501
    assert [r[0] for r in rows[1:]] == [Path(s["path"]).stem for s in man.sources("val")]
    assert [int(r[1]) for r in rows[1:]] == pe.argmax(1).tolist()
    # default output folder: <run>/eval_<split> for <run>/checkpoints/last.pt
    r = evaluate_main([str(c1), *args, "--res", "8"])
    assert Path(r["out_dir"]) == tmp_path / "a" / "eval_val" and r["members"][0]["res"] == 8


def test_evaluate_errors_are_one_line(digits_converted: Path, tmp_path: Path, capsys) -> None:
    man = Manifest.load(digits_converted)
    wrong = _classifier_ckpt(tmp_path / "w.pt", 0, [f"c{i}" for i in range(7)])
    not_cls = checkpoint.save(tmp_path / "pre.pt", {"task": {"model": {}}}, global_step=0, epoch=0)
    for ck, msg in (
        (wrong, "7 classes"),
        (not_cls, "not a classifier checkpoint"),
        (tmp_path / "x.pt", "exist"),
    ):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            evaluate_main([str(ck), "--data", str(digits_converted), "--split", "val"])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("error:") and "\n" not in err and msg in err, err
    assert man.num_classes == 10


@pytest.fixture(scope="module")
def repeated_names(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two classes whose files are named alike (c0/0.png, c1/0.png, ...), as users' folders often are."""
    from PIL import Image

    from fastvpd.convert import convert

    src = tmp_path_factory.mktemp("dup_src")
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in range(2):
            (src / split / f"c{c}").mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(
                    src / split / f"c{c}" / f"{i}.png"
                )
    out = tmp_path_factory.mktemp("dup_conv")
    convert(src, out, formats=("cache",), workers=1, progress=False)
    return out


@pytest.mark.parametrize("ten_crop", [False, True])
def test_predictions_csv_ids_are_unique_when_file_names_repeat_across_folders(
    repeated_names: Path, tmp_path: Path, ten_crop: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    ck = _classifier_ckpt(tmp_path / "m.pt", 0, ["c0", "c1"], res=8)
    evaluate_main([str(ck), "--data", str(repeated_names), "--out", str(tmp_path / "ev"), "--device", "cpu"]
                  + (["--ten-crop"] if ten_crop else []))  # fmt: skip
    assert "paths within the split" in capsys.readouterr().out
    with open(tmp_path / "ev" / "predictions.csv", newline="") as f:
        ids = [r[0] for r in list(csv.reader(f))[1:]]
    assert sorted(ids) == [f"c{c}/{i}.png" for c in range(2) for i in range(3)]  # unique, one per image


def test_run_takes_a_mapping_keywords_or_argv(repeated_names: Path, tmp_path: Path) -> None:
    from fastvpd.config import UserError
    from fastvpd.evaluate import run

    ck = _classifier_ckpt(tmp_path / "m.pt", 1, ["c0", "c1"], res=8)
    quiet = {"device": "cpu", "say": lambda *_: None}
    a = run({"checkpoints": [ck], "data": repeated_names, "out": tmp_path / "a", **quiet})
    b = run(checkpoints=str(ck), data=str(repeated_names), out=tmp_path / "b", **quiet)
    c = run([str(ck), "--data", str(repeated_names), "--out", str(tmp_path / "c"), "--device", "cpu"])
    d = run({"out": tmp_path / "d", "say": lambda *_: None}, argv=[str(ck), "--data", str(repeated_names)])
    assert a["num_samples"] == 6 and a["top1"] == b["top1"] == c["top1"] == d["top1"]
    assert Path(d["out_dir"]) == tmp_path / "d"  # the mapping goes on top of argv
    with pytest.raises(UserError, match="no option 'tencrop'"):
        run(checkpoints=[ck], data=repeated_names, tencrop=True)
    with pytest.raises(UserError, match="needs checkpoints"):
        run(data=repeated_names)
    with pytest.raises(UserError, match="--device must be one of auto, cuda, cpu"):  # not a silent CPU run
        run(checkpoints=[ck], data=repeated_names, device="gpu")


def test_unlabelled_split_gets_predictions_and_no_scores(tmp_path: Path, capsys) -> None:
    """A test split converted from a flat folder (a challenge's test set): predictions, no made-up top-1."""
    from PIL import Image

    from fastvpd.convert import convert

    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    for d, n in (("train/c0", 2), ("train/c1", 2), ("test", 3)):
        (src / d).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(src / d / f"{i}.png")
    convert(src, tmp_path / "conv", formats=("cache",), workers=1, progress=False)
    ck = _classifier_ckpt(tmp_path / "m.pt", 0, ["c0", "c1"], res=8)
    ev = tmp_path / "ev"
    conv = str(tmp_path / "conv")
    evaluate_main([str(ck), "--data", conv, "--split", "test", "--out", str(ev), "--device", "cpu"])
    out = capsys.readouterr().out
    assert "no labels" in out and "top-1" not in out
    results = json.loads((ev / "results.json").read_text())
    assert results["num_samples"] == 3 and "top1" not in results and "top1" not in results["members"][0]
    with open(ev / "predictions.csv", newline="") as f:
        rows = list(csv.reader(f))[1:]
    assert sorted(r[0] for r in rows) == ["0", "1", "2"] and {r[1] for r in rows} <= {"0", "1"}

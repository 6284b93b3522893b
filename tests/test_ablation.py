"""The negatives ablation's plumbing: a real (one-epoch) run through pretrain → kNN → linear probe → test,
resume from the kept results, the --jobs workers, the table/chart/README block. Not the sweep itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastvpd import ablation, demo
from fastvpd.ablation import MARK_BEGIN, MARK_END, RunResult, summarise, table, update_readme

TINY = ["--seeds", "0", "--epochs", "1", "aug.res=16", "train.epochs=1", "log.progress=false",
        "log.tensorboard=false", "train.device=cpu"]  # fmt: skip


@pytest.mark.slow
def test_one_real_run_end_to_end_then_resume_and_jobs(tmp_path: Path, capsys) -> None:
    out = tmp_path / "abl"
    readme = tmp_path / "README.md"
    readme.write_text("# project\n\ntext\n")
    args = ["--ablation", "negatives", "--out", str(out), "--queues", "64", "--margins", "0.4"]
    demo.main([*args, "--readme", str(readme), *TINY])
    run = out / "K64_m0.4" / "seed0"
    res = json.loads((run / "result.json").read_text())
    assert res["queue"] == 64 and res["margin"] == 0.4 and res["seed"] == 0
    assert 10.0 < res["knn_top1"] <= 100.0 and 10.0 < res["linear_top1"] <= 100.0  # 10 classes: above chance
    assert res["seconds"] > 0 and res["cpu_seconds"] > 0
    cfg = (run / "pretrain" / "config.yaml").read_text()
    assert "queue_size: 64" in cfg and "margin: 0.4" in cfg and "val_split: test" in cfg
    probe = json.loads((run / "test" / "results.json").read_text())
    assert probe["split"] == "test" and probe["top1"] == pytest.approx(res["linear_top1"])
    summary = json.loads((out / "results.json").read_text())
    assert summary["summary"][0]["linear"][0] == pytest.approx(res["linear_top1"])
    assert (out / "results.png").stat().st_size > 0 and (tmp_path / "docs" / "ablation_results.png").is_file()
    text = readme.read_text()
    assert text.startswith("# project\n\ntext\n") and text.count(MARK_BEGIN) == 1 and "| 64 |" in text
    capsys.readouterr()

    # resume: the kept result is reused (no training), then the same through two worker processes
    before = (run / "result.json").stat().st_mtime_ns
    ablation.main(["--out", str(out), "--queues", "64", "--margins", "0.4", *TINY])
    assert "pretrain: resnet18" not in capsys.readouterr().out
    ablation.main(["--out", str(out), "--queues", "64", "--margins", "0.4", "--jobs", "2", *TINY])
    assert (run / "result.json").stat().st_mtime_ns == before
    assert sorted(p.name for p in (out / "logs").iterdir()) == ["job0.log", "job1.log"]


def _r(k: int, m: float, s: int, lin: float, knn: float) -> RunResult:
    return RunResult(k, m, s, knn, lin, 1.0, 1.0)


def test_summary_table_and_chart_one_line_per_margin(tmp_path: Path) -> None:
    rs = [_r(64, 0.0, s, 80.0 + s, 70.0) for s in range(3)] + [_r(4096, 0.0, 0, 90.0, 75.0)]
    rs += [_r(64, 0.4, s, 85.0, 72.0 + 2 * s) for s in range(3)]
    rows = summarise(rs)
    assert [(r["margin"], r["queue"], r["seeds"]) for r in rows] == [
        (0.0, 64, 3),
        (0.0, 4096, 1),
        (0.4, 64, 3),
    ]
    assert rows[0]["linear"] == pytest.approx((81.0, 1.0)) and rows[2]["knn"] == pytest.approx((74.0, 2.0))
    md = table(rows, 500, "head")
    lines = md.splitlines()
    head = (
        "| queue K | keys per training image | linear, m = 0 | linear, m = 0.4 | kNN, m = 0 | kNN, m = 0.4 |"
    )
    assert lines[2] == head
    assert lines[4] == "| 64 | 0.13 | 81.0 ± 1.0 | 85.0 ± 0.0 | 70.0 ± 0.0 | 74.0 ± 2.0 |"
    assert lines[5] == "| 4096 | 8.2 | 90.0 ± 0.0 | – | 75.0 ± 0.0 | – |"  # a missing cell is a dash
    pytest.importorskip("matplotlib")
    ablation.chart(rows, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_readme_block_is_added_once_then_replaced(tmp_path: Path) -> None:
    readme = tmp_path / "R.md"
    readme.write_text("# R\n\n<!-- demo-results:begin -->\nx\n<!-- demo-results:end -->\n")
    update_readme(readme, "first")
    update_readme(readme, "second")
    text = readme.read_text()
    assert text.count(MARK_BEGIN) == text.count(MARK_END) == 1
    assert "second" in text and "first" not in text and "<!-- demo-results:begin -->\nx\n" in text
    assert text.index(MARK_BEGIN) < text.index("second") < text.index(MARK_END)


def test_bad_arguments_are_one_line_errors(tmp_path: Path, capsys) -> None:
    for argv in (
        ["--ablation", "widths"],
        ["--ablation", "negatives", "--queues", "a,b"],
        ["--ablation", "negatives", "--epochs", "0"],
    ):
        with pytest.raises(SystemExit) as e:
            demo.main([*argv, "--out", str(tmp_path / "x")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error:") and err.count("\n") == 1, (argv, err)

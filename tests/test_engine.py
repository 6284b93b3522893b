"""engine.fit with a tiny Task: exact resume (mid-epoch, at an epoch end, after a crash), non-finite
handling, resume modes, logging. The MoCo-specific end-to-end runs live in test_pretrain.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from fastvpd import checkpoint, config, engine
from fastvpd.config import PretrainRun, UserError
from fastvpd.step import DeviceMeters, Precision, pin_lr

TIMING = {"samples_per_s", "data_wait"}


class ToyLoader:
    """The loader contract in miniature: shuffled from (seed, epoch), per-batch noise from (epoch, step)."""

    def __init__(self, n: int = 40, batch: int = 4, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(n, 8, generator=g)
        self.y = self.x @ torch.randn(8, 1, generator=g) / 3
        self.batch, self.seed, self.epoch, self.start = batch, seed, 0, 0

    def __len__(self) -> int:
        return len(self.x) // self.batch

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start = epoch, start_step

    def __iter__(self):  # type: ignore[no-untyped-def]
        order = torch.randperm(
            len(self.x), generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        )
        for i in range(self.start, len(self)):
            idx = order[i * self.batch : (i + 1) * self.batch]
            noise = torch.randn(len(idx), 8, generator=torch.Generator().manual_seed(self.epoch * 100 + i))
            yield self.x[idx] + 0.01 * noise, self.y[idx]

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "epoch": self.epoch, "start": self.start}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.seed, self.epoch, self.start = sd["seed"], sd["epoch"], sd["start"]


class ToyTask:
    """Linear model + dropout (global torch RNG) + a ring buffer: everything resume must restore."""

    def __init__(self, nan_at: int = -1, crash_at: int = -1, skip: bool = False) -> None:
        self.model = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.Dropout(0.2), torch.nn.Linear(16, 1)
        )
        self.queue = torch.zeros(12, 1)
        self.ptr = torch.zeros((), dtype=torch.long)
        self.lr = torch.tensor(0.05)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=self.lr, momentum=0.9, foreach=True)
        pin_lr(self.opt, self.lr)
        self.precision = Precision("none", torch.device("cpu"))
        self.meters = DeviceMeters(["loss", "mean_out"], torch.device("cpu"))
        self.calls, self.nan_at, self.crash_at, self.skip = 0, nan_at, crash_at, skip

    def train_step(self, batch: Any) -> None:
        self.calls += 1
        if self.calls == self.crash_at:
            raise RuntimeError("simulated crash")
        x, y = batch
        self.opt.zero_grad(set_to_none=True)
        out = self.model(x)
        loss = F.mse_loss(out, y) + 0.0 * self.queue.sum()
        if self.calls == self.nan_at:
            loss = loss * float("nan")
        applied = self.precision.backward_step(loss, self.opt, skip_nonfinite=self.skip)
        if applied:
            idx = (self.ptr + torch.arange(4)) % 12
            self.queue.index_copy_(0, idx, out.detach())
            self.ptr.copy_((self.ptr + 4) % 12)
        self.meters.accumulate({"loss": loss.detach(), "mean_out": out.detach().mean()})

    def set_lr(self, lr: float) -> None:
        self.lr.fill_(lr)

    def evaluate(self, epoch: int) -> dict[str, float]:
        self.model.eval()
        with torch.no_grad():
            v = -float(F.mse_loss(self.model(torch.ones(3, 8)), torch.zeros(3, 1)))
        self.model.train()
        return {"val": v}

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "opt": self.opt.state_dict(),
            "queue": self.queue.clone(),
            "ptr": self.ptr.clone(),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.model.load_state_dict(sd["model"])
        self.opt.load_state_dict(sd["opt"])
        pin_lr(self.opt, self.lr)
        self.queue.copy_(sd["queue"])
        self.ptr.copy_(sd["ptr"])


def _cfg(out: Path, **over: Any) -> Any:
    args = [
        f"train.out_dir={out}",
        "train.epochs=3",
        "train.batch_size=4",
        "train.deterministic=true",
        "log.every=3",
        "log.progress=false",
        "log.tensorboard=false",
        "ckpt.every=1",
        "ckpt.keep=2",
        "moco.queue_size=16",
        "moco.bn_splits=1",
    ] + [f"{k}={v}" for k, v in over.items()]
    return config.load(PretrainRun, args)


def _fit(out: Path, task_kw: dict | None = None, **over: Any) -> tuple[ToyTask, engine.FitResult]:
    torch.manual_seed(0)
    task = ToyTask(**(task_kw or {}))
    cfg = _cfg(out, **over)
    res = engine.fit(cfg, task, ToyLoader(), lambda g: 0.01 * (1 - g / 30), eval_every=1, best_key="val")
    return task, res


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _same(a: ToyTask, b: ToyTask) -> None:
    for (k, x), (_, y) in zip(a.state_dict()["model"].items(), b.state_dict()["model"].items()):
        assert torch.equal(x, y), k
    assert torch.equal(a.queue, b.queue) and torch.equal(a.ptr, b.ptr)
    for sa, sb in zip(a.opt.state.values(), b.opt.state.values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[ToyTask, Path]:
    out = tmp_path_factory.mktemp("ref")
    task, res = _fit(out)
    assert res.stopped == "done" and res.global_step == 30 and res.epoch == 3
    return task, out


@pytest.mark.parametrize("stop_at", [4, 10, 17])  # mid-window, exactly at an epoch end, mid-epoch 2
def test_resume_is_bit_exact(tmp_path: Path, reference: tuple[ToyTask, Path], stop_at: int) -> None:
    _, first = _fit(tmp_path, **{"train.max_steps": stop_at})
    assert first.stopped == "max_steps" and first.global_step == stop_at
    task, res = _fit(tmp_path)  # resume=auto, fresh objects
    assert res.stopped == "done" and res.global_step == 30
    _same(task, reference[0])
    assert _metrics(tmp_path) == _metrics(reference[1])


def test_resume_after_crash(tmp_path: Path, reference: tuple[ToyTask, Path]) -> None:
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(tmp_path, {"crash_at": 16})  # last checkpoint: end of epoch 1 (step 10)
    assert checkpoint.read_header(tmp_path / "checkpoints" / "last.pt")["global_step"] == 10
    task, res = _fit(tmp_path)
    _same(task, reference[0])
    assert _metrics(tmp_path) == _metrics(reference[1])  # lines logged after step 10 were replaced


def test_run_dir_contents(reference: tuple[ToyTask, Path]) -> None:
    run = reference[1]
    assert config.load(PretrainRun, ["--config", str(run / "config.yaml")]).train.epochs == 3
    names = sorted(p.name for p in (run / "checkpoints").glob("*.pt"))
    assert names == ["best.pt", "last.pt", "step_00000020.pt", "step_00000030.pt"]
    rows = _metrics(run)
    assert [r["step"] for r in rows if "loss" in r] == [3, 6, 9, 10, 12, 15, 18, 20, 21, 24, 27, 30]
    assert [r["epoch"] for r in rows if "val" in r] == [1, 2, 3]
    st = checkpoint.load(run / "checkpoints" / "last.pt")
    assert st["progress"]["global_step"] == 30 and st["config"]["train"]["epochs"] == 3


def test_nonfinite_stops_naming_step_and_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(
        engine.NonFiniteLoss, match=r"step 14 .*loss=nan.*last good checkpoint: .*step_00000010\.pt"
    ):
        _fit(tmp_path, {"nan_at": 14})
    # nothing after the NaN was saved: the last checkpoint is the end of epoch 1
    assert checkpoint.read_header(tmp_path / "checkpoints" / "last.pt")["global_step"] == 10


def test_nonfinite_skip_counts(tmp_path: Path) -> None:
    task, res = _fit(tmp_path, {"nan_at": 14, "skip": True}, **{"train.on_nonfinite": "skip"})
    assert res.stopped == "done"
    rows = _metrics(tmp_path)
    assert sum(r.get("skipped", 0) for r in rows) == 1
    assert all(r["loss"] == r["loss"] for r in rows if "loss" in r)  # no NaN in the logged means


def test_resume_never_refuses_existing_run(tmp_path: Path) -> None:
    _fit(tmp_path, **{"train.max_steps": 2})
    with pytest.raises(UserError, match="train.resume=auto"):
        _fit(tmp_path, **{"train.resume": "never"})
    with pytest.raises(UserError, match="no such checkpoint"):
        _fit(tmp_path, **{"train.resume": str(tmp_path / "nope.pt")})

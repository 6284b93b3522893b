"""The outer training loop, shared by pretraining, distillation and linear evaluation.

`fit(cfg, task, loader, schedule, ...)` owns everything that is not the method: epochs and steps, the
learning-rate schedule, logging at the `log.every` cadence (the only host syncs), evaluation hooks,
checkpoints (cadence, end, SIGTERM/SIGINT, best), resume and non-finite detection. The method lives in a
`Task` (see the Protocol below); the step itself lives in fastvpd/step.py.

Checkpoint position is (epoch, step_in_epoch) with step_in_epoch in [0, steps_per_epoch];
step_in_epoch == steps_per_epoch means "epoch trained, its end-of-epoch hooks (eval, periodic
checkpoint) not yet run", so a run stopped at any step — by `train.max_steps`, a signal or a crash after a
checkpoint — resumes into exactly the computation the uninterrupted run would have done. With
`train.deterministic=true` on CPU a resumed run is bit-exact (weights, queue, optimizer, metrics).

Signals: SIGTERM/SIGINT set a flag; the loop saves a checkpoint at the next step boundary and `fit`
returns normally (exit code 0). Time to exit: at most one step + one checkpoint write on one process; with
several processes the ranks agree at the next log read, so at most `log.every` steps + one write. A second
SIGINT aborts at once.

Run dir (`train.out_dir`): config.yaml, metrics.jsonl, tb/, checkpoints/{step_XXXXXXXX,last,best}.pt.
`train.resume`: auto = newest valid checkpoint in <out_dir>/checkpoints (fresh if none); a path = that
file; never = fresh, refused when <out_dir>/checkpoints already holds checkpoints (choose another out_dir).
"""

from __future__ import annotations

import functools
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from fastvpd import checkpoint, config, dist
from fastvpd.config import UserError
from fastvpd.data import build_loader, from_config
from fastvpd.data.manifest import Manifest
from fastvpd.log import RunLogger
from fastvpd.optim import lr_at
from fastvpd.step import DeviceMeters, Precision, rng_state, set_rng_state, setup_backends

# Config keys that may differ between a checkpoint and the run resuming it: how long to train, where files
# are (a moved dataset or teacher file), how the step executes, logging/checkpoint/evaluation cadence, and
# the two recovery levers a non-finite loss error names (optim.lr, train.amp). Any other difference
# refuses the resume (a prefix ending in "." covers a section).
RESUME_SAFE = (
    "train.epochs",
    "train.max_steps",
    "train.resume",
    "train.out_dir",
    "train.device",
    "train.cuda_graph",
    "train.compile",
    "train.deterministic",
    "train.on_nonfinite",
    "train.amp",
    "optim.lr",
    "data.root",
    "data.workers",
    "data.verify",
    "data.val_split",
    "distill.teacher",
    "linear.backbone",
    "log.",
    "ckpt.",
    "eval.",
)


class Task(Protocol):
    """What `fit` needs from a method (MoCo pretraining, distillation, linear probe).

    - `meters`: DeviceMeters the step accumulates into; read by the engine at the log cadence.
    - `train_step(batch)`: one optimisation step, enqueued on the device, no host sync.
    - `set_lr(lr)`: write the scheduled learning rate (a float) into the optimizer's lr tensor.
    - `evaluate(epoch)`: metrics (floats) for epoch `epoch` (0-based, just finished); may sync; must leave
      the modules in training mode. Called on every rank (rank 0's result is logged).
    - `state_dict()` / `load_state_dict(sd)`: models, optimizer, scaler (tensors + plain containers).
    """

    meters: DeviceMeters

    def train_step(self, batch: Any) -> None: ...
    def set_lr(self, lr: float) -> None: ...
    def evaluate(self, epoch: int) -> dict[str, float]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, sd: dict[str, Any]) -> None: ...


class NonFiniteLoss(UserError):
    """The loss became NaN/inf with train.on_nonfinite=stop."""


@dataclass
class FitResult:
    run_dir: Path
    global_step: int
    epoch: int  # epochs fully done
    stopped: str  # done | max_steps | the signal's name (SIGTERM, SIGINT)
    last_checkpoint: Path | None
    eval: dict[str, float] = field(default_factory=dict)  # the last evaluation's metrics
    train: dict[str, float] = field(default_factory=dict)  # the last log window's training means (loss, ...)

    @property
    def metrics(self) -> dict[str, float]:
        """The final metrics: the last training means and the last evaluation."""
        return {**self.train, **self.eval}

    @property
    def interrupted(self) -> bool:
        """Stopped early by a signal (its checkpoint is saved; resume=auto continues it)."""
        return self.stopped not in ("done", "max_steps")


class _StopFlag:
    """SIGTERM/SIGINT → `requested`; installed only in the main thread, restored by `close`."""

    def __init__(self) -> None:
        self.requested = ""
        self._old: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def close(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _resume_safe(key: str) -> bool:
    return any(key == v or (v.endswith(".") and key.startswith(v)) for v in RESUME_SAFE)


def config_diff(saved: dict, now: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) for each key both configs hold with different values.

    A key only one side holds (a config key added or removed between versions) is not compared.
    """
    out = []
    for k in sorted(set(saved) & set(now)):
        key = f"{prefix}{k}"
        a, b = saved[k], now[k]
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, key + ".")
        elif a != b:
            out.append((key, a, b))
    return out


def check_resume_config(cfg: Any, state: dict, path: Path, mode: str) -> list[str]:
    """Refuse (UserError, one line) to resume `state` when the config differs from the one it was written
    with in a key outside RESUME_SAFE; returns "key: old -> new" for the allowed differences."""
    saved = state.get("config")
    if not isinstance(saved, dict):
        return []
    diff = config_diff(saved, config.to_dict(cfg))
    bad = [f"{k} ({a!r} -> {b!r})" for k, a, b in diff if not _resume_safe(k)]
    if bad:
        way = (
            "to start a new run with this config choose another train.out_dir"
            if mode == "auto"
            else "pass a checkpoint written with this config, or start a new run with train.resume=never"
        )
        raise UserError(
            f"cannot resume from {path}: it was written with another config: {', '.join(bad)}; {way} "
            f"(keys that may change on resume: {', '.join(RESUME_SAFE)})"
        )
    return [f"{k}: {a!r} -> {b!r}" for k, a, b in diff]


def _find_resume(cfg: Any, ckpt_dir: Path, say: Callable[[str], None]) -> tuple[Path, dict] | None:
    mode = cfg.train.resume
    if mode == "never":
        if checkpoint.candidates(ckpt_dir):
            raise UserError(
                f"{ckpt_dir} already holds checkpoints: set train.resume=auto to continue that "
                "run or choose another train.out_dir"
            )
        return None
    if mode == "auto":
        found = checkpoint.latest_valid(ckpt_dir, warn=say)
        if found is None and (checkpoint.candidates(ckpt_dir) or (ckpt_dir.parent / "config.yaml").is_file()):
            say(f"train.resume=auto: no valid checkpoint in {ckpt_dir}, so this run starts from step 0")
        return found
    path = Path(mode)
    if not path.is_file():
        raise UserError(f"train.resume={mode}: no such checkpoint file (use auto, never or a .pt path)")
    return path, checkpoint.load(path)


def fit(
    cfg: Any,
    task: Task,
    loader: Any,
    schedule: Callable[[int], float],
    eval_every: int = 0,
    best_key: str | None = None,
    global_batch: int | None = None,
) -> FitResult:
    """Train `task` on `loader` for cfg.train.epochs (or cfg.train.max_steps) steps.

    schedule(global_step) -> lr. eval_every: run task.evaluate every N epochs and after the last one
    (0 = never). best_key: an evaluate() metric (higher is better) that refreshes checkpoints/best.pt.
    """
    info = dist.info()
    run_dir = Path(cfg.train.out_dir)
    ckpts = checkpoint.CheckpointDir(run_dir / "checkpoints", cfg.ckpt.keep)
    say = (lambda m: print(m, flush=True)) if info.is_main else (lambda m: None)
    spe, epochs = len(loader), cfg.train.epochs
    total = spe * epochs
    limit = total if cfg.train.max_steps < 0 else min(total, cfg.train.max_steps)
    global_batch = global_batch or cfg.train.batch_size
    epoch, in_epoch, g, best, last_eval = 0, 0, 0, -math.inf, {}
    last_train: dict[str, float] = {}

    found = _find_resume(cfg, ckpts.dir, say) if info.is_main else None
    refusal = None
    if found is not None:
        try:
            changed = check_resume_config(cfg, found[1], found[0], cfg.train.resume)
        except UserError as e:
            refusal = str(e)
    refusal = dist.broadcast_object(refusal)  # every rank stops on rank 0's word, none hangs
    if refusal:
        raise UserError(refusal)
    resume_path = dist.broadcast_object(str(found[0]) if found else None)
    last_ckpt = Path(resume_path) if resume_path else None
    if resume_path:
        state = found[1] if found else checkpoint.load(resume_path)
        try:
            task.load_state_dict(state["task"])
        except (KeyError, RuntimeError, ValueError) as e:  # not caught by the config check: another program
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(
                f"cannot resume from {resume_path}: its state does not fit this run ({why[:200]}); choose "
                "another train.out_dir or train.resume=never"
            ) from None
        p = state["progress"]
        epoch, in_epoch, g, best = p["epoch"], p["step_in_epoch"], p["global_step"], p["best"]
        if p.get("steps_per_epoch", spe) != spe:
            raise UserError(
                f"{resume_path} was written with {p['steps_per_epoch']} steps per epoch, this run "
                f"has {spe}: resume with the same data and train.batch_size"
            )
        ranks = state["ranks"]
        if len(ranks) == info.world_size:
            set_rng_state(ranks[info.rank]["rng"])
            loader.load_state_dict(ranks[info.rank]["loader"])
            task.meters.load_state_dict(ranks[info.rank]["meters"])
        else:
            say(
                f"warning: checkpoint has {len(ranks)} ranks, this run {info.world_size}: RNG states reseeded"
            )
        for line in changed if found else []:
            say(f"config differs from the checkpoint's (allowed on resume): {line}")
        say(f"resumed from {resume_path} at epoch {epoch + 1}, step {g}")
    if info.is_main:
        config.save(cfg, run_dir / "config.yaml")
    logger = RunLogger(
        run_dir,
        limit,
        resume_step=g,
        tensorboard=cfg.log.tensorboard,
        progress=cfg.log.progress,
        enabled=info.is_main,
    )
    stop = _StopFlag()

    def save(periodic: bool = False, is_best: bool = False) -> Path | None:
        nonlocal last_ckpt
        per_rank = dist.all_gather_object(
            {"rng": rng_state(), "loader": loader.state_dict(), "meters": task.meters.state_dict()}
        )
        if not info.is_main:
            return None
        state = {
            "task": task.state_dict(),
            "ranks": per_rank,
            "progress": {
                "epoch": epoch,
                "step_in_epoch": in_epoch,
                "global_step": g,
                "best": best,
                "steps_per_epoch": spe,
            },
            "config": config.to_dict(cfg),
        }
        last_ckpt = ckpts.save(state, g, epoch, periodic=periodic, best=is_best)
        return last_ckpt

    t_win, wait_win, steps_win = time.perf_counter(), 0.0, 0

    def check_finite(m: dict[str, Any]) -> None:
        if m["nonfinite"] and cfg.train.on_nonfinite == "stop":
            bad = g - m["steps"] + m["first_bad"] + 1
            parts = ", ".join(f"{k}={v:.4g}" for k, v in m["bad_values"].items())
            raise NonFiniteLoss(
                f"non-finite loss at step {bad} (epoch {epoch + 1}): {parts}; last good checkpoint: "
                f"{last_ckpt or 'none'}. Lower optim.lr / use train.amp=bf16 or none, then resume "
                "(train.resume=auto), or set train.on_nonfinite=skip"
            )

    def read_meters() -> None:
        """The one host sync per log window: meters → metrics.jsonl, bar, non-finite check."""
        nonlocal t_win, wait_win, steps_win
        m = task.meters.read()
        dt = max(time.perf_counter() - t_win, 1e-9)
        check_finite(m)
        row = {"epoch": epoch + 1, **m["mean"], "lr": schedule(g - 1)}
        if cfg.train.on_nonfinite == "skip":
            row["skipped"] = m["nonfinite"]
        row.update({"samples_per_s": steps_win * global_batch / dt, "data_wait": wait_win / dt})
        logger.log(g, row)
        last_train.clear()
        last_train.update(m["mean"])
        logger.advance(steps_win, g, steps_win * global_batch / dt, m["mean"])
        t_win, wait_win, steps_win = time.perf_counter(), 0.0, 0

    def stop_requested(at_read: bool) -> bool:
        if info.world_size == 1:
            return bool(stop.requested)
        if not at_read:
            return False
        flag = torch.tensor([1.0 if stop.requested else 0.0], device=info.device)
        return bool(dist.all_reduce_max(flag).item())

    stopped = "done"
    try:
        while epoch < epochs and not (g >= limit and in_epoch < spe):
            if in_epoch < spe:  # ---- train (the rest of) this epoch
                logger.start_epoch(epoch, epochs, spe, initial=in_epoch)
                loader.set_epoch(epoch, in_epoch)
                batches = iter(loader)
                t0 = time.perf_counter()
                while in_epoch < spe and g < limit:
                    batch = next(batches, None)
                    if batch is None:
                        raise UserError(
                            f"the loader ended after {in_epoch} of its {spe} batches (epoch {epoch})"
                        )
                    wait_win += time.perf_counter() - t0
                    task.set_lr(schedule(g))
                    task.train_step(batch)
                    g, in_epoch, steps_win = g + 1, in_epoch + 1, steps_win + 1
                    at_read = g % cfg.log.every == 0 or in_epoch == spe
                    if at_read:
                        read_meters()
                    if stop_requested(at_read):
                        stopped = stop.requested or "signal"
                        break
                    t0 = time.perf_counter()
                del batches
                logger.close_bar()
                if stopped != "done" or (g >= limit and limit < total):
                    stopped = "max_steps" if stopped == "done" else stopped
                    check_finite(task.meters.read(reset=False))  # the open window stays in the checkpoint
                    save()
                    logger.info(f"stopped ({stopped}) at step {g}; checkpoint {last_ckpt}")
                    break
            # ---- end of epoch: evaluation, best, periodic checkpoint
            done = epoch + 1
            is_best = False
            if eval_every > 0 and (done % eval_every == 0 or done == epochs):
                last_eval = task.evaluate(epoch)
                logger.log(g, {"epoch": done, **last_eval})
                logger.info(f"epoch {done}: " + ", ".join(f"{k}={v:.4g}" for k, v in last_eval.items()))
                if best_key and last_eval.get(best_key, -math.inf) > best:
                    best, is_best = last_eval[best_key], True
                best, is_best = dist.broadcast_object((best, is_best))  # rank 0 evaluates; all ranks save
            epoch, in_epoch = done, 0
            periodic = cfg.ckpt.every > 0 and done % cfg.ckpt.every == 0
            if periodic or is_best or done == epochs:
                save(periodic=periodic, is_best=is_best)
    finally:
        stop.close()
        logger.close()
    if stopped == "done" and limit < total:  # resumed at (or past) train.max_steps
        stopped = "max_steps"
    return FitResult(run_dir, g, epoch, stopped, last_ckpt, last_eval, last_train)


def launch(
    name: str,
    cfg: Any,
    build: Callable[[Any, Callable[..., None]], tuple[Task, Any, Callable[[int], float]]],
    eval_every: int,
    best_key: str,
) -> FitResult:
    """The shared body of every entry point: init processes, build, say what runs, fit, shut down.

    `build(cfg, say) -> (task, loader, schedule)`; `say` prints on rank 0 only. Returns fit's result
    with a one-line summary already printed.
    """
    info = dist.init(cfg.train.device)
    say = print if info.is_main else (lambda *_: None)
    loader = None
    try:
        task, loader, schedule = build(cfg, say)
        say(
            f"{name}: {cfg.model.arch}, {len(loader)} steps/epoch x {cfg.train.epochs} epochs, "
            f"global batch {cfg.train.batch_size} on {info.world_size} x {info.device.type}, "
            f"out {cfg.train.out_dir}"
        )
        result = fit(cfg, task, loader, schedule, eval_every=eval_every, best_key=best_key)
        label = best_key.replace("_", " ").replace("top1", "top-1")  # val_top1 -> "val top-1"
        best = f"{label} {result.eval[best_key]:.2f}%, " if best_key in result.eval else ""
        done = f"{name}: {result.stopped} at step {result.global_step}"
        say(f"{done}; {best}checkpoint {result.last_checkpoint}")
        return result
    finally:
        if loader is not None:
            loader.close()  # the torchvision backend stops its persistent workers now, not at a later GC
        dist.shutdown()


@dataclass
class Prepared:
    """What every trainer's `build` starts from (see `prepare`)."""

    info: Any  # dist.DistInfo
    precision: Precision
    dtype: torch.dtype
    per_rank: int
    loader: Any  # the training loader (this rank's shard)

    def eval_loader(self, cfg: Any, split: str) -> Any:
        """A deterministic evaluation loader of `split` with this run's batch, device and dtype."""
        spec = from_config(config.aug_settings(cfg.aug), train=False)
        return build_loader(
            cfg.data, spec, split, self.per_rank, self.info.device, self.dtype, cfg.train.seed, train=False
        )


def prepare(cfg: Any, labels: bool = False) -> Prepared:
    """The prologue shared by pretrain/distill/linear: seeds and kernels, the per-rank batch, precision,
    and the training loader (its augmentation recipe from `cfg.aug`). `labels`: the run trains on the
    training split's labels, so a split converted without class folders is refused in one line."""
    manifest = Manifest.load(cfg.data.root) if labels else None
    if manifest is not None and not manifest.labelled(config.TRAIN_SPLIT):
        raise UserError(
            f"{cfg.data.root}: its {config.TRAIN_SPLIT} split was converted without labels (no class "
            "folders); distillation and the linear probe train on labels: convert a tree of class folders"
        )
    val = cfg.data.val_split
    if manifest is not None and cfg.eval.every > 0 and val in manifest.splits and not manifest.labelled(val):
        raise UserError(
            f"{cfg.data.root}: the validation split {val!r} has no labels to score: set eval.every=0, or "
            "data.val_split to a labelled split"
        )
    info = dist.info()
    setup_backends(cfg.train.seed, cfg.train.deterministic, info.device, info.rank)
    if cfg.train.batch_size % info.world_size:
        raise config.ConfigError(
            f"train.batch_size={cfg.train.batch_size} must be divisible by the {info.world_size} processes"
        )
    per_rank = cfg.train.batch_size // info.world_size
    precision = Precision(cfg.train.amp, info.device)
    dtype = precision.dtype or torch.float32
    spec = from_config(config.aug_settings(cfg.aug), train=True)
    loader = build_loader(
        cfg.data, spec, config.TRAIN_SPLIT, per_rank, info.device, dtype, cfg.train.seed, info.rank,
        info.world_size, train=True,
    )  # fmt: skip
    return Prepared(info, precision, dtype, per_rank, loader)


def schedule_for(cfg: Any, loader: Any, base: float) -> Callable[[int], float]:
    """The learning rate of each global step, from `cfg.optim` over the run's length."""
    return functools.partial(
        lr_at, steps_per_epoch=len(loader), optim_cfg=cfg.optim, base_lr=base, epochs=cfg.train.epochs
    )

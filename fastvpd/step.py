"""Training steps as functions over static tensors, and the CUDA-graph wrapper that replays them.

A step takes device tensors, does forward + backward + optimizer update, accumulates its metrics into
`DeviceMeters` in place and returns a dict of 0-d device tensors. Nothing in a step reads a value back to
the host, so the whole step can be captured once as a CUDA graph (`GraphedStep`) and replayed; the engine
reads the meters once every `log.every` steps. Rules a step must follow to stay capturable:

- the learning rate lives in ONE 0-d device tensor shared by all param groups (`pin_lr`); the engine
  writes it with `fill_` before each step (a kernel argument, no sync);
- only in-place updates of pre-allocated state (queue, pointer, meters, optimizer buffers);
- no `.item()`, `bool(tensor)`, `print(tensor)`, data-dependent shapes.

`train.on_nonfinite=skip` breaks the last rule on purpose (it must decide on the host whether to apply the
update), so it runs eagerly with one sync per step.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fastvpd import dist

StepFn = Callable[..., dict[str, Tensor]]


# ---------------------------------------------------------------- process-wide settings
def setup_backends(seed: int, deterministic: bool, device: torch.device, rank: int = 0) -> None:
    """Seed every RNG (per rank), pick kernels: TF32 + cudnn autotune for speed, or deterministic."""
    s = seed + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)  # also turns it off again (several runs, one process)
    torch.backends.cudnn.benchmark = device.type == "cuda" and not deterministic
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = not deterministic
        torch.backends.cudnn.allow_tf32 = not deterministic


def rng_state() -> dict[str, Any]:
    """torch (CPU + CUDA), numpy and python RNG states as tensors/plain containers (weights_only-safe)."""
    st = np.random.get_state()
    py = random.getstate()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(st[1].astype(np.int64)),
            "pos": int(st[2]),
            "has_gauss": int(st[3]),
            "gauss": float(st[4]),
        },
        "python": {"version": py[0], "state": torch.tensor(py[1], dtype=torch.int64), "gauss": py[2]},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    p = st["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


# ---------------------------------------------------------------- precision
class Precision:
    """Autocast + optional GradScaler from `train.amp`.

    GPU: bf16 (default, no scaler), fp16 (+GradScaler; not graph-capturable: its step syncs) or none.
    CPU always runs fp32 (CPU autocast is slow and not what a GPU run would do).
    """

    def __init__(self, amp: str, device: torch.device) -> None:
        self.device = device
        self.dtype: torch.dtype | None = None
        if device.type == "cuda" and amp != "none":
            self.dtype = torch.bfloat16 if amp == "bf16" else torch.float16
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None

    @property
    def graphable(self) -> bool:
        return self.scaler is None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward_step(
        self, loss: Tensor, optimizer: torch.optim.Optimizer, skip_nonfinite: bool = False
    ) -> bool:
        """backward + optimizer.step. With `skip_nonfinite` (one host sync) a non-finite loss skips the
        update and returns False; otherwise always returns True without syncing."""
        if skip_nonfinite and not bool(torch.isfinite(loss.detach())):
            optimizer.zero_grad(set_to_none=True)
            return False
        if self.scaler is None:
            loss.backward()
            optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.update()
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict() if self.scaler is not None else {}}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if self.scaler is not None and sd.get("scaler"):
            self.scaler.load_state_dict(sd["scaler"])


_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def bn_snapshot(module: torch.nn.Module, enabled: bool) -> Callable[[], None]:
    """Skip mode only: copy the BatchNorm running statistics now; the returned function puts them back.

    A skipped (non-finite) step has already run its forward, which wrote the bad batch into the running
    statistics; restoring them makes the skip leave no trace. Disabled (the default) it costs nothing.
    """
    if not enabled:
        return lambda: None
    bufs = [b for name, b in module.named_buffers() if name.rsplit(".", 1)[-1] in _BN_BUFFERS]
    saved = [b.clone() for b in bufs]

    @torch.no_grad()
    def restore() -> None:
        for b, v in zip(bufs, saved):
            b.copy_(v)

    return restore


def pin_lr(optimizer: torch.optim.Optimizer, lr: Tensor) -> None:
    """Make every param group read the learning rate from the same 0-d device tensor `lr`.

    Call after building the optimizer AND after `optimizer.load_state_dict` (which replaces group lrs).
    SGD with a Tensor lr is graph-safe only with `fused=True` on CUDA (foreach SGD calls `.item()`).
    """
    for g in optimizer.param_groups:
        g["lr"] = lr


# ---------------------------------------------------------------- device meters
class DeviceMeters:
    """Running sums of a step's 0-d metrics, on device; `read()` costs one host sync.

    A step whose `check` metric (the loss) is not finite is counted in `nonfinite` and left out of the
    sums (so `skip` mode still logs clean means); the index of the first such step in the current window
    and its metric values are kept so a NaN can be reported precisely at the next read.
    Layout of `buf`: [steps, nonfinite, first_bad, sums..., values_at_first_bad...]. In-place only, so
    `accumulate` can live inside a captured CUDA graph.
    """

    def __init__(self, names: list[str], device: torch.device, check: str = "loss") -> None:
        self.names = list(names)
        self.check = check
        self.n = len(self.names)
        dtype = torch.float64 if device.type == "cpu" else torch.float32
        self.buf = torch.zeros(3 + 2 * self.n, dtype=dtype, device=device)
        self.buf[2] = -1

    def accumulate(self, metrics: dict[str, Tensor]) -> None:
        vals = torch.stack([metrics[k].detach().float() for k in self.names]).to(self.buf.dtype)
        bad = ~torch.isfinite(metrics[self.check].detach())
        newly = bad & (self.buf[1] == 0)
        self.buf[2].copy_(torch.where(newly, self.buf[0], self.buf[2]))
        self.buf[3 + self.n :].copy_(torch.where(newly, vals, self.buf[3 + self.n :]))
        self.buf[3 : 3 + self.n].add_(torch.where(bad, torch.zeros_like(vals), vals))
        self.buf[1].add_(bad.to(self.buf.dtype))
        self.buf[0].add_(1)

    def read(self, reset: bool = True) -> dict[str, Any]:
        """{'steps', 'nonfinite', 'first_bad', 'mean': {name: mean over finite steps}, 'bad_values'}.

        One host sync; with several processes the step counts and sums are summed over ranks first
        (one small all-reduce), `first_bad`/`bad_values` stay this rank's.
        """
        b = self.buf.clone()
        if dist.world_size() > 1:
            head = torch.cat([b[:2], b[3 : 3 + self.n]])
            torch.distributed.all_reduce(head)
            b[:2], b[3 : 3 + self.n] = head[:2], head[2:]
        v = b.tolist()
        if reset:
            self.reset()
        steps, bad = int(v[0]), int(v[1])
        return {
            "steps": steps,
            "nonfinite": bad,
            "first_bad": int(v[2]),
            "mean": {k: v[3 + i] / max(1, steps - bad) for i, k in enumerate(self.names)},
            "bad_values": {k: v[3 + self.n + i] for i, k in enumerate(self.names)},
        }

    def reset(self) -> None:
        self.buf.zero_()
        self.buf[2] = -1

    def state_dict(self) -> dict[str, Tensor]:
        return {"buf": self.buf.detach().cpu().clone()}

    def load_state_dict(self, sd: dict[str, Tensor]) -> None:
        self.buf.copy_(sd["buf"].to(self.buf.dtype))


# ---------------------------------------------------------------- the MoCo step
MOCO_METRICS = ["loss", "acc"]


def moco_step(
    model: Any,
    optimizer: torch.optim.Optimizer,
    precision: Precision,
    meters: DeviceMeters,
    v1: Tensor,
    v2: Tensor,
    skip_nonfinite: bool = False,
    key_stream: torch.cuda.Stream | None = None,
) -> dict[str, Tensor]:
    """One MoCo step on views `v1` (query) and `v2` (key); returns 0-d device metrics `MOCO_METRICS`.

    Order is MoCo's official one: the key encoder is momentum-updated from the current query weights
    BEFORE the key forward (so the first step's keys come from θ_k = θ_q), the loss is taken against the
    queue as it was before this batch, and this batch's keys are enqueued last (`MoCo.enqueue_`
    all-gathers them over ranks itself). `acc` = fraction of queries whose positive logit is the largest.
    `key_stream` (pretraining passes one with one CUDA device in one process): run the momentum update
    and key forward there, beside the query forward (`key_beside_query`); the same computation, scheduled
    concurrently.
    """
    optimizer.zero_grad(set_to_none=True)
    restore_bn = bn_snapshot(model, skip_nonfinite)
    if key_stream is not None:
        q, k = key_beside_query(model, precision, v1, v2, key_stream)
    else:
        model.momentum_update_()
        with precision.autocast():
            q = model.query(v1)
            with torch.no_grad():
                k = model.key(v2)
    with precision.autocast():
        loss, logits = model.loss(q, k)
    applied = precision.backward_step(loss, optimizer, skip_nonfinite)
    if applied:
        model.enqueue_(k.detach())
    else:
        restore_bn()
    acc = (logits.detach().argmax(dim=1) == 0).float().mean()
    metrics = {"loss": loss.detach().float(), "acc": acc}
    meters.accumulate(metrics)
    return metrics


def key_beside_query(
    model: Any, precision: Precision, v1: Tensor, v2: Tensor, side: torch.cuda.Stream
) -> tuple[Tensor, Tensor]:
    """(q, k) with the key encoder's momentum update and forward on stream `side`, concurrent with the
    query forward on the current stream: the two only share reads of θ_q, and the query's backward and
    optimizer step (which write θ_q) come after the join. Many of ResNet's kernels (BN statistics, the
    late stages' small convolutions) leave SMs idle that the other encoder can use.

    Safe without `record_stream`: every side phase starts by waiting for all the work queued on the
    current stream, so memory the side stream frees (k, after its uses here) is reused only after those
    uses. Capturable: `side` forks from the capturing stream and joins it again.
    """
    main = torch.cuda.current_stream(v1.device)
    side.wait_stream(main)  # v2 written, θ_q final for this step
    with torch.cuda.stream(side):
        model.momentum_update_()
        with precision.autocast(), torch.no_grad():
            k = model.key(v2)
    with precision.autocast():
        q = model.query(v1)
    main.wait_stream(side)
    return q, k


# ---------------------------------------------------------------- CUDA graphs
class GraphedStep:
    """Replay `fn(*tensors) -> dict[str, Tensor]` as one CUDA graph; eager where that is not possible.

    `enabled=False` (CPU, fp16 scaler, skip-mode, user choice) calls `fn` directly. Otherwise the first
    `warmup` calls run eagerly on a side stream (real training steps: they also create the optimizer state
    and let cuDNN/DDP settle; DDP needs ~11), the next call captures `fn` once into static input buffers
    and then replays it, so every batch is trained exactly once. Later calls copy their inputs into the
    static buffers and replay. A capture failure, or inputs of another shape, fall back to eager with one
    log line. The returned dict holds the graph's static outputs: read them before the next call.

    `generators`: non-default CUDA generators `fn` draws from (the cache loader's augmentation). They are
    registered with the graph, so each replay draws from the generator's current seed and offset exactly
    as the eager call would (the default generator is registered by PyTorch itself).
    """

    def __init__(
        self,
        fn: StepFn,
        enabled: bool = True,
        warmup: int = 3,
        log: Callable[[str], None] = print,
        why_disabled: str = "",
        generators: Sequence[torch.Generator] = (),
    ) -> None:
        self.fn = fn
        self.generators = list(generators)
        self.log = log
        self.warmup = warmup
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_in: list[Tensor] = []
        self.static_out: dict[str, Tensor] = {}
        self.enabled = enabled and torch.cuda.is_available()
        if enabled and not self.enabled:
            why_disabled = why_disabled or "no CUDA device"
        if why_disabled:
            self.log(f"cuda graph off: {why_disabled}; running the step eagerly")
        self._warned_shape = False

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, *inputs: Tensor) -> dict[str, Tensor]:
        if not self.enabled:
            return self.fn(*inputs)
        self.calls += 1
        if self.graph is None and self.calls <= self.warmup:
            return self._side_stream(inputs)
        if self.graph is None:
            return self._capture(inputs)
        if any(s.shape != t.shape or s.dtype != t.dtype for s, t in zip(self.static_in, inputs)):
            if not self._warned_shape:
                self.log("cuda graph: input shape changed; running such steps eagerly")
                self._warned_shape = True
            return self.fn(*inputs)
        for s, t in zip(self.static_in, inputs):
            s.copy_(t, non_blocking=True)
        self.graph.replay()
        return self.static_out

    def _side_stream(self, inputs: tuple[Tensor, ...]) -> dict[str, Tensor]:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            out = self.fn(*inputs)
        torch.cuda.current_stream().wait_stream(s)
        return out

    def _capture(self, inputs: tuple[Tensor, ...]) -> dict[str, Tensor]:
        self.static_in = [t.detach().clone() for t in inputs]
        graph = torch.cuda.CUDAGraph()
        states = [g.get_state() for g in self.generators]
        torch.cuda.synchronize()
        try:
            for g in self.generators:
                graph.register_generator_state(g)
            with torch.cuda.graph(graph):
                out = self.fn(*self.static_in)
        except Exception as e:  # capture is all-or-nothing: nothing ran, so this step is simply redone
            torch.cuda.synchronize()
            for g, st in zip(self.generators, states):
                g.set_state(st)  # the eager redo draws what the graph would have
            self.enabled = False
            self.static_in = []
            self.log(
                f"cuda graph off: capture failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                "running the step eagerly"
            )
            return self.fn(*inputs)
        self.graph, self.static_out = graph, out
        self.log(f"cuda graph: captured the step after {self.warmup} warm-up steps")
        graph.replay()  # capture records kernels without running them: run this step now
        return self.static_out

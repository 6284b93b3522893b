"""Typed configuration: dataclasses + YAML recipes (configs/) + dotted CLI overrides.

OmegaConf structured configs give type checking and unknown-key rejection for free; this module only
turns their exceptions into one-line errors (exit code 2) and adds the cross-field checks.
"""

from __future__ import annotations

import difflib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError


class ConfigError(ValueError):
    """A user mistake in a config or on the command line: printed as one line, exit code 2."""


@dataclass
class DataConfig:
    root: str = "data/digits_converted"  # output folder of data_tools/convert.py (holds manifest.json)
    backend: str = "cache"  # cache | ffcv | dali | torchvision
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    workers: int = 0  # host worker threads/processes for ffcv/dali/torchvision; 0 = all cores
    verify: str = "fast"  # manifest check before training: fast (sizes + header hashes) | full | off
    pin_host_cache: bool = True  # cache backend: pinned host memory when the cache does not fit on the GPU
    # dali backend colour jitter: exact (torchvision's per-sample op order and ops inside DALI: six
    # coord_transform blend slots around one exact hue; 248 DALI operators in the two-view pipeline, a
    # fifth of the conditional rendering that ran 802 samples/s on an H100, launch-bound) | fused (one
    # color_twist: fixed order, mid-grey contrast pivot, linear hue; 3-9x the first exact rendering on
    # CPU) | device (DALI only decodes, crops and flips into uint8; jitter/grayscale/blur/normalise as the
    # ffcv backend, on the loader's device with gpu_aug's torchvision-exact ops, data.aug_kernel=triton
    # allowed; 2 CPU cores at 224 px: 220 two-view samples/s against exact's 31; not yet timed on a GPU)
    dali_jitter: str = "exact"
    # dali backend, random-crop views: once (one whole decode per sample, both views cut from it:
    # 1.1-1.2x the loader rate of `twice` at 224 px on 2 CPU cores; on a GPU, nvJPEG's hardware engine
    # decodes whole images anyway, so it should halve the decode work there: not yet timed) | twice (each
    # view decodes its own crop of the JPEG)
    dali_decode: str = "once"
    # dali backend, training: pipelines side by side, each rendering batch/N of every batch from its own
    # sub-shard (N x DALI's executor threads: its per-operator launches were the limit on an H100, the host
    # 84 % idle; the batch mixes N slices of the shard, each shuffled). 1 = one pipeline, as before
    dali_pipelines: int = 1
    # ffcv backend: twice (one JPEG decode per view: faster on the 16-core H100 host, 1.3-1.5x) | once (one
    # decode per sample, both views cut from it: less CPU, faster on core-starved hosts, 1.2-1.4x on 2 cores)
    ffcv_decode: str = "twice"
    # cache backend, device placement: the training step renders the batch's views itself, so on a GPU
    # the augmentation is captured in the step's CUDA graph (same draws, same pixels as rendering them in
    # the loader; false renders in the loader)
    aug_in_step: bool = True
    # cache and ffcv backends: torch.compile the fixed-shape pixel work of the augmentation (GPU; Inductor
    # fuses its elementwise chains; the first batches compile for a while). Training loader only.
    compile_aug: bool = False
    # the fixed-shape views' pixel work on the device (cache, ffcv, and dali with dali_jitter=device):
    # torch (batched torch ops, fused by compile_aug; numba on a CPU) | triton (fastvpd.data.triton_aug:
    # each pixel's whole chain in registers, 3-4 kernels per view; compile_aug then has no effect; needs a
    # CUDA device) | auto (triton on a CUDA device where Triton loads, else torch). H100 run 4, cache
    # backend, two-view batch of 256 at 224 px: 1.50 GPU ms triton, 15.3 compiled torch, 24.0 eager torch
    aug_kernel: str = "auto"


@dataclass
class AugConfig:
    recipe: str = "moco_v2"  # moco_v2 | supervised
    res: int = 224
    min_scale: float = -1.0  # -1: the recipe's default (0.2 for moco_v2, 0.08 for supervised)
    autoaugment: bool = False  # ImageNet AutoAugment policy (supervised recipe)
    eval_res: int = -1  # -1: same as res; eval resizes to eval_res/0.875 then centre-crops
    # Strength knobs, -1 = the recipe's own value (moco_v2: flip 0.5, jitter p 0.8 at (0.4, 0.4, 0.4, 0.1),
    # grayscale 0.2, blur 0.5; supervised: flip 0.5, no jitter/grayscale/blur). For data whose labels are
    # not flip-invariant (digits, text) or that are tiny (8x8 sources), see configs/demo_digits_*.yaml.
    hflip_p: float = -1.0
    jitter_p: float = -1.0
    jitter_scale: float = -1.0  # multiplies the recipe's brightness/contrast/saturation/hue ranges
    grayscale_p: float = -1.0
    blur_p: float = -1.0


@dataclass
class ModelConfig:
    arch: str = "resnet50"  # resnet18 | resnet50 | resnext101_32x8d (torchvision names)
    small_stem: bool = False  # 3x3 stride-1 stem, no max-pool: for 32-px data
    init: str = "moco"  # distill: moco | random ; linear: moco
    channels_last: bool = True
    # the stem convolution's input: the 3-channel image, or zero-padded to 4 or 8 channels (and its weight
    # in the forward); and how it is computed: direct (cuDNN's convolution) | s2d (space-to-depth: a 4x4
    # stride-1 convolution over 2x2 pixel blocks) | im2col (patches as rows, one GEMM). Same parameters and
    # results; on a GPU one may be faster than cuDNN's 7x7 channels-last bf16 stem (benchmarks/
    # throughput.py's "stem" rungs decide; fastvpd.models.StemConv)
    stem_channels: int = 3
    stem_impl: str = "direct"


@dataclass
class MocoConfig:
    dim: int = 128
    mlp_hidden: int = 2048  # 2048-2048-128 head for ResNet-50; 0 = linear head
    queue_size: int = 4096
    momentum: float = 0.999
    temperature: float = 0.2
    margin: float = 0.4  # authors' code; 0 gives plain MoCo v2
    bn_splits: int = 8  # single-device shuffle-BN emulation; 1 disables
    # split-BN's eager kernels: blocks (PyTorch's BN per group, written in place) | fused (all groups'
    # statistics in two reductions, one normalisation kernel); same maths, see fastvpd.models.SplitBatchNorm
    split_bn: str = "blocks"
    # one CUDA device, one process: the key encoder's momentum update and forward on a second CUDA stream,
    # beside the query forward (same results; an H100 run decides whether it is faster). Off elsewhere.
    overlap_key: bool = False


@dataclass
class OptimConfig:
    lr: float = 0.03  # for a batch of `lr_batch`; scaled linearly with the global batch
    lr_batch: int = 256
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    schedule: str = "cosine"  # cosine | step
    step_every: int = 30  # step schedule: x step_gamma every step_every epochs
    step_gamma: float = 0.1
    milestones: list[int] = field(default_factory=list)  # explicit step epochs (overrides step_every)
    warmup_epochs: float = 0.0


@dataclass
class TrainConfig:
    epochs: int = 800
    batch_size: int = 256  # global batch (split across ranks)
    seed: int = 0
    device: str = "auto"  # auto | cuda | cpu
    amp: str = "bf16"  # bf16 | fp16 | none (autocast only on GPU; CPU runs fp32 unless amp=bf16_cpu)
    cuda_graph: bool = True  # capture the whole step on GPU; eager elsewhere
    compile: bool = False
    deterministic: bool = False
    resume: str = "auto"  # auto | never | <path to a checkpoint>
    out_dir: str = "runs/pretrain"
    max_steps: int = -1  # stop after this many steps in total (benchmarks/tests); -1 = whole run
    on_nonfinite: str = "stop"  # stop | skip


@dataclass
class LogConfig:
    every: int = 20  # steps between host reads of the device meters
    tensorboard: bool = True
    progress: bool = True


@dataclass
class CkptConfig:
    every: int = 10  # epochs
    keep: int = 2  # newest periodic checkpoints kept (plus last/best)


@dataclass
class EvalConfig:
    every: int = 1  # distill/linear: validation every N epochs
    knn_every: int = 10  # pretrain: kNN monitor every N epochs (0 = off)
    knn_k: int = 200
    knn_t: float = 0.1


@dataclass
class DistillConfig:
    teacher: str = ""  # pretraining checkpoint (or exported backbone) for teacher and student init
    kind: str = "ofd"  # ofd | l2 | none
    lam: float = 1e-4
    start_epoch: int = 5
    teacher_bn: str = "train"  # train (authors' code) | eval
    stage_weights: list[float] = field(default_factory=lambda: [0.125, 0.25, 0.5, 1.0])
    label_smoothing: float = 0.1


@dataclass
class PretrainRun:
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    moco: MocoConfig = field(default_factory=MocoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _distill_defaults() -> tuple[AugConfig, OptimConfig, TrainConfig]:
    return (
        AugConfig(recipe="supervised"),
        OptimConfig(lr=0.1, nesterov=True, schedule="step", step_every=30),
        TrainConfig(epochs=100, out_dir="runs/distill"),
    )


@dataclass
class DistillRun:
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=lambda: _distill_defaults()[0])
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=lambda: _distill_defaults()[1])
    train: TrainConfig = field(default_factory=lambda: _distill_defaults()[2])
    log: LogConfig = field(default_factory=LogConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


@dataclass
class LinearRun:
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=lambda: AugConfig(recipe="supervised"))
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=30.0, weight_decay=0.0, schedule="step", milestones=[60, 80])
    )
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=100, out_dir="runs/linear"))
    log: LogConfig = field(default_factory=LogConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distill: DistillConfig = field(default_factory=lambda: DistillConfig(kind="none"))


STEM_IMPLS = ("direct", "s2d", "im2col")  # model.stem_impl: see fastvpd.models.StemConv

CHOICES: dict[str, tuple[str, ...]] = {
    "data.backend": ("cache", "ffcv", "dali", "torchvision"),
    "data.verify": ("fast", "full", "off"),
    "data.aug_kernel": ("auto", "torch", "triton"),
    "aug.recipe": ("moco_v2", "supervised"),
    "model.arch": ("resnet18", "resnet34", "resnet50", "resnet101", "resnext50_32x4d", "resnext101_32x8d"),
    "model.init": ("moco", "random"),
    "model.stem_impl": STEM_IMPLS,
    "optim.schedule": ("cosine", "step"),
    "train.device": ("auto", "cuda", "cpu"),
    "train.amp": ("bf16", "fp16", "none"),
    "train.on_nonfinite": ("stop", "skip"),
    "distill.kind": ("ofd", "l2", "none"),
    "distill.teacher_bn": ("train", "eval"),
}


def _valid_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    for k, v in node.items():
        name = f"{prefix}{k}"
        keys.extend(_valid_keys(v, name + ".") if isinstance(v, DictConfig) else [name])
    return keys


def _select(cfg: Any, key: str) -> Any:
    return OmegaConf.select(cfg, key)


def suggest_key(key: str, valid: list[str]) -> str | None:
    """The valid dotted key closest to a mistyped one (whole key first, then the last component alone,
    preferring the same section), or None when nothing is close."""
    hit = difflib.get_close_matches(key, valid, n=1, cutoff=0.75)
    if hit:
        return hit[0]
    section, _, leaf = key.rpartition(".")
    by_leaf: dict[str, list[str]] = {}
    for k in valid:
        by_leaf.setdefault(k.rpartition(".")[2], []).append(k)
    close = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.75)
    if not close:
        return None
    options = by_leaf[close[0]]
    same = [k for k in options if k.rpartition(".")[0] == section]
    return (same or options)[0]


def _unknown_key_message(key: str, schema: type, where: str) -> str:
    """'unknown config key ...' naming the full dotted key and the closest valid key (or the choices)."""
    valid = _valid_keys(OmegaConf.structured(schema))
    sections = sorted({k.split(".")[0] for k in valid})
    head = f"unknown config key {key!r}{where}"
    hint = suggest_key(key, valid)
    if hint:
        return f"{head}: did you mean {hint!r}?"
    section = key.split(".")[0]
    if section in sections:
        keys = [k for k in valid if k.startswith(section + ".")]
        return f"{head}: section {section!r} has keys {', '.join(keys)}"
    return f"{head}: keys are section.name with section one of {', '.join(sections)}"


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: leaf value} of a nested mapping (lists are leaves)."""
    out: dict[str, Any] = {}
    if isinstance(d, dict | DictConfig):
        for k, v in d.items():
            name = f"{prefix}{k}"
            if isinstance(v, dict | DictConfig) and len(v):
                out.update(_flatten(v, name + "."))
            else:
                out[name] = v
    return out


def _check_keys(schema: type, given: dict[str, Any], where: str) -> None:
    """Reject unknown keys and values given to whole sections before OmegaConf sees them, so that the
    message names the full dotted key (OmegaConf names only the first unknown component)."""
    valid = set(_valid_keys(OmegaConf.structured(schema)))
    sections = {k.split(".")[0] for k in valid}
    for key in given:
        if key in valid:
            continue
        if key in sections:
            example = next(k for k in sorted(valid) if k.startswith(key + "."))
            raise ConfigError(f"{key} is a section, not a value{where}: set its keys, e.g. {example}=...")
        parent = next((key[: len(v)] for v in valid if key.startswith(v + ".")), None)
        if parent is not None:
            raise ConfigError(f"{parent} is a single value, not a section{where}: use {parent}=VALUE")
        raise ConfigError(_unknown_key_message(key, schema, where))


def _type_message(key: str, schema: type, given: dict[str, Any]) -> str:
    """'KEY=VALUE is not a valid TYPE: ...' with an example of the right form."""
    names = {bool: "boolean (true/false)", int: "whole number", float: "number", str: "string"}
    base = key.split("[")[0]
    default = OmegaConf.select(OmegaConf.structured(schema), base)
    value = given.get(base, "?")
    if isinstance(default, ListConfig):
        elem = default._metadata.element_type
        kind = names.get(elem, getattr(elem, "__name__", "value"))
        example = OmegaConf.to_container(default) or ([60, 80] if elem is int else [0.5, 1.0])
        shown = "[" + ",".join(str(v) for v in example) + "]"
        return f"{base}={value} is not a valid list of {kind}s: use e.g. {base}={shown}"
    kind = names.get(type(default), type(default).__name__)
    shown = str(default).lower() if isinstance(default, bool) else default
    return f"{key}={value} is not a valid {kind}: use e.g. {base}={shown}"


def validate(cfg: Any) -> None:
    """Cross-field checks OmegaConf cannot express; raise ConfigError naming the key and the fix."""
    for key, choices in CHOICES.items():
        val = _select(cfg, key)
        if val is not None and val not in choices:
            hint = difflib.get_close_matches(str(val), choices, n=1, cutoff=0.6)
            dym = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(f"{key}={val!r} is not one of {', '.join(choices)}{dym}")
    positive = [
        "train.batch_size",
        "train.epochs",
        "log.every",
        "aug.res",
        "moco.dim",
        "moco.queue_size",
        "moco.temperature",
        "optim.lr",
        "optim.lr_batch",
        "eval.knn_k",
        "eval.knn_t",
    ]
    for key in positive:
        val = _select(cfg, key)
        if val is not None and val <= 0:
            raise ConfigError(f"{key} must be > 0 (got {val})")
    non_negative = [
        "ckpt.every",
        "ckpt.keep",
        "eval.every",
        "eval.knn_every",
        "data.workers",
        "moco.mlp_hidden",
        "optim.weight_decay",
        "optim.momentum",
        "optim.warmup_epochs",
        "distill.lam",
        "distill.start_epoch",
    ]
    for key in non_negative:
        val = _select(cfg, key)
        if val is not None and val < 0:
            raise ConfigError(f"{key} must be >= 0 (got {val})")
    if _select(cfg, "train.max_steps") is not None and (cfg.train.max_steps == 0 or cfg.train.max_steps < -1):
        raise ConfigError(f"train.max_steps must be > 0, or -1 for the whole run (got {cfg.train.max_steps})")
    for key in ("aug.min_scale", "aug.eval_res"):
        val = _select(cfg, key)
        if val is not None and val != -1 and val <= 0:
            raise ConfigError(f"{key} must be > 0, or -1 for the default (got {val})")
    if _select(cfg, "aug.min_scale") is not None and cfg.aug.min_scale > 1:
        raise ConfigError(f"aug.min_scale must be <= 1 (got {cfg.aug.min_scale})")
    for key in ("aug.hflip_p", "aug.jitter_p", "aug.grayscale_p", "aug.blur_p"):
        val = _select(cfg, key)
        if val is not None and val != -1 and not 0.0 <= val <= 1.0:
            raise ConfigError(f"{key} must be a probability in [0, 1], or -1 for the recipe's (got {val})")
    js = _select(cfg, "aug.jitter_scale")
    if js is not None and js != -1 and not 0.0 <= js <= 2.5:
        raise ConfigError(f"aug.jitter_scale must be in [0, 2.5] (it multiplies 0.4), or -1 (got {js})")
    ls = _select(cfg, "distill.label_smoothing")
    if ls is not None and not 0.0 <= ls < 1.0:
        raise ConfigError(f"distill.label_smoothing must be in [0, 1) (got {ls})")
    if "moco" in cfg:
        m = cfg.moco
        if not 0.0 <= m.momentum < 1.0:
            raise ConfigError(f"moco.momentum must be in [0, 1) (got {m.momentum})")
        if m.queue_size < cfg.train.batch_size:
            raise ConfigError(
                f"moco.queue_size={m.queue_size} is smaller than train.batch_size={cfg.train.batch_size}: "
                "raise moco.queue_size or lower train.batch_size"
            )
        if m.split_bn not in ("blocks", "fused"):
            raise ConfigError(f"moco.split_bn={m.split_bn!r} is not one of blocks, fused")
        if m.bn_splits < 1 or cfg.train.batch_size % m.bn_splits:
            raise ConfigError(
                f"train.batch_size={cfg.train.batch_size} must be divisible by moco.bn_splits={m.bn_splits}"
            )
    if "distill" in cfg and len(cfg.distill.stage_weights) != 4:
        raise ConfigError("distill.stage_weights needs 4 values (one per ResNet stage)")


def _parse_argv(argv: list[str]) -> tuple[str | None, list[str]]:
    yaml_path = None
    overrides: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("--config", "-c"):
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a YAML file path")
            yaml_path, i = argv[i + 1], i + 2
            continue
        if a.startswith("--config="):
            yaml_path = a.split("=", 1)[1]
        elif "=" in a and not a.startswith("-"):
            overrides.append(a)
        else:
            raise ConfigError(
                f"unexpected argument {a!r}: use --config FILE.yaml and section.key=value overrides"
            )
        i += 1
    return yaml_path, overrides


def _quote_str_overrides(schema: type, overrides: list[str]) -> list[str]:
    """Pass values of string fields through verbatim: YAML would read `data.verify=off` as False and
    `distill.teacher=` as null, and neither is what a user typing a string means."""
    base = OmegaConf.structured(schema)
    out = []
    for o in overrides:
        key, val = o.split("=", 1)
        try:
            is_str = isinstance(OmegaConf.select(base, key, throw_on_missing=False), str)
        except OmegaConfBaseException:
            is_str = False
        quoted = val[:1] in ("'", '"') and val[-1:] == val[:1] and len(val) > 1
        out.append(f"{key}='{val.replace(chr(39), chr(39) * 2)}'" if is_str and not quoted else o)
    return out


def load(schema: type, argv: list[str] | None = None) -> Any:
    """Build a config from the schema, an optional `--config FILE.yaml` and `key=value` overrides.

    Raises ConfigError (one line naming the full dotted key and the fix) on unknown keys, wrong types or
    invalid values.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    yaml_path, overrides = _parse_argv(argv)
    cfg = OmegaConf.structured(schema)
    given: dict[str, Any] = {}
    try:
        if yaml_path is not None:
            if not Path(yaml_path).is_file():
                raise ConfigError(f"config file not found: {yaml_path}")
            loaded = OmegaConf.load(yaml_path)
            if not isinstance(loaded, DictConfig):
                raise ConfigError(f"{yaml_path} must be a mapping of sections (train: ..., data: ...)")
            flat = _flatten(OmegaConf.to_container(loaded))
            _check_keys(schema, flat, f" in {yaml_path}")
            given.update(flat)
            cfg = OmegaConf.merge(cfg, loaded)
        if overrides:
            dot = OmegaConf.from_dotlist(_quote_str_overrides(schema, overrides))
            flat = _flatten(OmegaConf.to_container(dot))
            _check_keys(schema, flat, "")
            given.update({o.split("=", 1)[0]: o.split("=", 1)[1] for o in overrides})
            cfg = OmegaConf.merge(cfg, dot)
    except ConfigError:
        raise
    except ConfigKeyError as e:  # normally caught by _check_keys first
        key = getattr(e, "full_key", None) or str(e).splitlines()[0]
        raise ConfigError(_unknown_key_message(str(key), schema, "")) from None
    except ValidationError as e:
        key = getattr(e, "full_key", None)
        if not key:
            raise ConfigError(f"bad config value: {str(e).splitlines()[0]}") from None
        raise ConfigError(_type_message(str(key), schema, given)) from None
    except OmegaConfBaseException as e:
        raise ConfigError(str(e).splitlines()[0]) from None
    except Exception as e:  # YAML syntax errors and the like
        raise ConfigError(f"could not read the config: {' '.join(str(e).split())}") from None
    validate(cfg)
    return cfg


def save(cfg: Any, path: str | Path) -> None:
    """Write the resolved config beside the run (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    tmp.replace(path)


def to_dict(cfg: Any) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def from_dict(schema: type, d: dict) -> Any:
    return OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.create(d))


def one_line(msg: str) -> str:
    """Collapse a message onto one line (user errors are printed as exactly one line)."""
    return " ".join(msg.split())


def main_guard(fn):  # type: ignore[no-untyped-def]
    """Decorator for entry points: user mistakes (ConfigError, UserError) print one line and exit 2."""

    def wrapped(*a, **kw):  # type: ignore[no-untyped-def]
        try:
            return fn(*a, **kw)
        except (ConfigError, UserError) as e:
            print(f"error: {one_line(str(e))}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    wrapped.__name__ = getattr(fn, "__name__", "main")
    wrapped.__doc__ = fn.__doc__
    return wrapped


class UserError(RuntimeError):
    """A mistake in the user's data or files (missing path, mismatched manifest, wrong checkpoint)."""

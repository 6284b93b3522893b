"""Typed configuration: one schema per run type, YAML recipes (fastvpd/configs/) and dotted overrides.

Every key is declared once, as a dataclass field whose `metadata["help"]` is its one-line doc; choices are
str Enums. Validation and `--help` (fastvpd.cli) read those same declarations. OmegaConf structured
configs give type checks and unknown-key rejection; this module turns their exceptions into one-line
errors (exit code 2) and adds the cross-field checks.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import DictConfig, OmegaConf

RECIPES = Path(__file__).resolve().parent / "configs"  # the recipes shipped with the package
TRAIN_SPLIT = "train"  # the converted dataset's training split (the converter names it)


class ConfigError(ValueError):
    """A user mistake in a config or on the command line: printed as one line, exit code 2."""


class UserError(RuntimeError):
    """A mistake in the user's data or files (missing path, mismatched manifest, wrong checkpoint)."""


class Choice(str, Enum):
    """A key's allowed values; each member's name is its value, so it compares and prints as that string."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


def _choice(name: str, *values: str) -> Any:
    return Choice(name, [(v, v) for v in values], module=__name__, qualname=name)


Backend = _choice("Backend", "cache", "ffcv", "dali", "torchvision")
Verify = _choice("Verify", "fast", "full", "off")
Decode = _choice("Decode", "twice", "once")
Arch = _choice("Arch", "resnet18", "resnet34", "resnet50", "resnet101", "resnext50_32x4d", "resnext101_32x8d")
Init = _choice("Init", "moco", "random")
Schedule = _choice("Schedule", "cosine", "step")
Device = _choice("Device", "auto", "cuda", "cpu")
Amp = _choice("Amp", "bf16", "fp16", "none")
OnNonfinite = _choice("OnNonfinite", "stop", "skip")
DistillKind = _choice("DistillKind", "ofd", "l2", "none")
TeacherBN = _choice("TeacherBN", "train", "eval")


def _key(default: Any, doc: str) -> Any:
    """A config key: its default and its one-line doc (shown by --help)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": doc})
    return field(default=default, metadata={"help": doc})


# ------------------------------------------------------------------------------------------------ sections
@dataclass
class DataConfig:
    """data: the converted dataset and the loader that reads it"""

    root: str = _key("data/digits_converted", "the converter's output folder (holds manifest.json)")
    backend: Backend = _key(
        Backend.cache, "loader: cache (uint8 images on the device or pinned host), ffcv, dali, torchvision"
    )
    val_split: str = _key("val", "split for validation and the kNN monitor")
    workers: int = _key(
        0, "host worker threads/processes of the ffcv, dali and torchvision loaders; 0 = all cores"
    )
    verify: Verify = _key(
        Verify.fast, "manifest check before training: fast (sizes, header hashes), full, off"
    )
    ffcv_decode: Decode = _key(
        Decode.twice, "ffcv: one JPEG decode per view (twice: many host cores) or per sample (once: few)"
    )


@dataclass
class _CropAug:
    res: int = _key(224, "training crop size in pixels")
    min_scale: float = _key(-1.0, "smallest crop area fraction of the random resized crop")
    hflip_p: float = _key(-1.0, "horizontal flip probability (0 for data that is not mirror-invariant)")


@dataclass
class PretrainAug(_CropAug):
    """aug: MoCo v2's two views (random crop, flip, colour jitter, grayscale, blur)"""

    RECIPE: ClassVar[str] = "moco_v2"
    jitter_scale: float = _key(-1.0, "multiplies the colour jitter's ranges (0.4, 0.4, 0.4, 0.1); 0 = none")
    grayscale_p: float = _key(-1.0, "random grayscale probability")
    blur_p: float = _key(-1.0, "Gaussian blur probability")


@dataclass
class ClassifierAug(_CropAug):
    """aug: the supervised view (random crop, flip) and the evaluation transform"""

    RECIPE: ClassVar[str] = "supervised"
    autoaugment: bool = _key(False, "add ImageNet AutoAugment after the crop and flip")
    eval_res: int = _key(-1, "evaluation crop (resize to eval_res/0.875, centre crop); -1 = res")


@dataclass
class AugConfig(PretrainAug, ClassifierAug):
    """Every augmentation setting, as fastvpd.data.spec.from_config reads it (`aug_settings` fills it from
    a run's aug section). -1: the recipe's own value."""

    recipe: str = "moco_v2"


def aug_settings(aug: Any) -> AugConfig:
    """The AugConfig of a run's aug section, its recipe given by the section's type."""
    kind = OmegaConf.get_type(aug) if isinstance(aug, DictConfig) else type(aug)
    if kind is AugConfig:
        return aug
    own = {f.name: getattr(aug, f.name) for f in dataclasses.fields(kind)}  # type: ignore[arg-type]
    return AugConfig(recipe=kind.RECIPE, **own)  # type: ignore[union-attr]


@dataclass
class ModelConfig:
    """model: the backbone (must match the pretraining checkpoint's in distill and linear)"""

    arch: Arch = _key(Arch.resnet50, "torchvision architecture")
    small_stem: bool = _key(False, "3x3 stride-1 stem without max-pool, for 32-px images")


@dataclass
class StudentModel(ModelConfig):
    """model: the student backbone (must match the teacher checkpoint's)"""

    init: Init = _key(Init.moco, "student initialisation: moco (the teacher file's backbone) or random")


@dataclass
class MocoConfig:
    """moco: MoCo v2 with a margin on the positive logit"""

    dim: int = _key(128, "embedding dimension")
    mlp_hidden: int = _key(2048, "projection head's hidden width; 0 = linear head")
    queue_size: int = _key(4096, "negative keys in the queue")
    momentum: float = _key(0.999, "key encoder's momentum")
    temperature: float = _key(0.2, "softmax temperature")
    margin: float = _key(0.4, "margin subtracted from the positive logit; 0 = plain MoCo v2")
    bn_splits: int = _key(8, "one process: BN statistics in this many groups (shuffle-BN emulation); 1 = off")


@dataclass
class OptimConfig:
    """optim: SGD and its learning-rate schedule"""

    lr: float = _key(0.03, "learning rate for a batch of lr_batch, scaled linearly with the global batch")
    lr_batch: int = _key(256, "the batch size lr is given for")
    momentum: float = _key(0.9, "SGD momentum")
    weight_decay: float = _key(1e-4, "weight decay, on every parameter (as MoCo and the authors)")
    nesterov: bool = _key(False, "Nesterov momentum")
    schedule: Schedule = _key(
        Schedule.cosine, "cosine decay to 0, or step (x step_gamma at epoch boundaries)"
    )
    step_every: int = _key(30, "step schedule: drop every step_every epochs (the authors' 1-based epochs)")
    step_gamma: float = _key(0.1, "step schedule: factor of each drop")
    milestones: list[int] = _key([], "step schedule: drop at these 0-based epochs instead of step_every")
    warmup_epochs: float = _key(0.0, "linear warm-up length in epochs")


@dataclass
class TrainConfig:
    """train: length, batch, device and precision, run folder"""

    epochs: int = _key(800, "training epochs")
    batch_size: int = _key(256, "global batch (split across processes)")
    seed: int = _key(0, "seed of weights, data order and augmentation draws")
    device: Device = _key(Device.auto, "auto (CUDA when available), cuda or cpu")
    amp: Amp = _key(
        Amp.bf16, "mixed precision on a GPU: bf16, fp16 (with a loss scaler) or none; CPU runs fp32"
    )
    cuda_graph: bool = _key(True, "capture the whole training step as a CUDA graph (GPU)")
    compile: bool = _key(False, "torch.compile the networks (the first steps compile for a while)")
    deterministic: bool = _key(False, "deterministic kernels (bit-exact resume on CPU; slower on a GPU)")
    resume: str = _key("auto", "auto (newest valid checkpoint in out_dir), never, or a checkpoint path")
    out_dir: str = _key("runs/pretrain", "run folder: config, metrics, TensorBoard events, checkpoints")
    max_steps: int = _key(-1, "stop (with a checkpoint) after this many steps in total; -1 = whole run")
    on_nonfinite: OnNonfinite = _key(OnNonfinite.stop, "NaN/inf loss: stop, or skip that step's update")


@dataclass
class LogConfig:
    """log: metrics cadence and outputs"""

    every: int = _key(20, "steps between reads of the device metrics (the only host syncs)")
    tensorboard: bool = _key(True, "write TensorBoard events beside metrics.jsonl")
    progress: bool = _key(True, "progress bar")


@dataclass
class CkptConfig:
    """ckpt: checkpoints"""

    every: int = _key(10, "epochs between periodic checkpoints")
    keep: int = _key(2, "newest periodic checkpoints kept (plus last and best)")


@dataclass
class KnnEval:
    """eval: the kNN monitor (val images against the train split's features)"""

    knn_every: int = _key(10, "epochs between kNN evaluations; 0 = off")
    knn_k: int = _key(200, "neighbours")


@dataclass
class ValEval:
    """eval: validation top-1/top-5"""

    every: int = _key(1, "epochs between validations; 0 = off")


@dataclass
class DistillConfig:
    """distill: the teacher and the distillation loss"""

    teacher: str = _key("", "pretraining checkpoint (or exported backbone) for teacher and student init")
    kind: DistillKind = _key(DistillKind.ofd, "ofd (feature distillation), l2 (pooled features) or none")
    lam: float = _key(1e-4, "weight of the distillation term")
    start_epoch: int = _key(5, "epoch (counted from 1) the distillation term starts")
    teacher_bn: TeacherBN = _key(
        TeacherBN.train, "teacher's BN: train (batch statistics, the authors') or eval"
    )
    stage_weights: list[float] = _key([0.125, 0.25, 0.5, 1.0], "OFD weight of each of the four stages")
    label_smoothing: float = _key(0.1, "label smoothing of the cross-entropy")


@dataclass
class LinearConfig:
    """linear: the frozen backbone"""

    backbone: str = _key("", "pretraining checkpoint (or exported backbone) whose query backbone is probed")


# ------------------------------------------------------------------------------------------------ run types
@dataclass
class PretrainRun:
    """MoCo v2 (+ margin) pretraining"""

    COMMAND: ClassVar[str] = "pretrain"
    data: DataConfig = field(default_factory=DataConfig)
    aug: PretrainAug = field(
        default_factory=lambda: PretrainAug(
            min_scale=0.2, hflip_p=0.5, jitter_scale=1.0, grayscale_p=0.2, blur_p=0.5
        )
    )
    model: ModelConfig = field(default_factory=ModelConfig)
    moco: MocoConfig = field(default_factory=MocoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    eval: KnnEval = field(default_factory=KnnEval)


@dataclass
class DistillRun:
    """Phase 2: self-distillation of a pretrained backbone (also fine-tuning and from-scratch baselines)"""

    COMMAND: ClassVar[str] = "distill"
    data: DataConfig = field(default_factory=DataConfig)
    aug: ClassifierAug = field(default_factory=lambda: ClassifierAug(min_scale=0.08, hflip_p=0.5))
    model: StudentModel = field(default_factory=StudentModel)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=0.1, nesterov=True, schedule=Schedule.step, step_every=30)
    )
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=100, out_dir="runs/distill"))
    log: LogConfig = field(default_factory=LogConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    eval: ValEval = field(default_factory=ValEval)
    distill: DistillConfig = field(default_factory=DistillConfig)


@dataclass
class LinearRun:
    """Linear probe of a pretrained backbone (MoCo's main_lincls protocol)"""

    COMMAND: ClassVar[str] = "linear"
    data: DataConfig = field(default_factory=DataConfig)
    aug: ClassifierAug = field(default_factory=lambda: ClassifierAug(min_scale=0.08, hflip_p=0.5))
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(
            lr=30.0, weight_decay=0.0, schedule=Schedule.step, milestones=[60, 80]
        )
    )
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=100, out_dir="runs/linear"))
    log: LogConfig = field(default_factory=LogConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    eval: ValEval = field(default_factory=ValEval)
    linear: LinearConfig = field(default_factory=LinearConfig)


RUNS = (PretrainRun, DistillRun, LinearRun)

# a key given to the wrong run type: the one it means there (named in the unknown-key error)
MOVED = {
    "distill.teacher": "linear.backbone",
    "linear.backbone": "distill.teacher",
    "eval.every": "eval.knn_every",
    "eval.knn_every": "eval.every",
}


@dataclass(frozen=True)
class Key:
    """One leaf key of a run schema, as --help and validation read it."""

    name: str  # dotted: section.key
    type: Any  # int, float, bool, str, a Choice enum, list[int], list[float]
    default: Any
    doc: str


def keys(schema: type) -> list[Key]:
    """Every leaf key of `schema`, in declaration order, with its default in this run type."""
    inst = schema()
    out = []
    for sec in dataclasses.fields(schema):
        obj = getattr(inst, sec.name)
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            out.append(
                Key(f"{sec.name}.{f.name}", hints[f.name], getattr(obj, f.name), f.metadata.get("help", ""))
            )
    return out


def choices_of(t: Any) -> list[str] | None:
    """The allowed values of a key of type `t` (a Choice enum), else None."""
    return [m.value for m in t] if isinstance(t, type) and issubclass(t, Enum) else None


# ------------------------------------------------------------------------------------------------ checks
_POSITIVE = ("train.batch_size", "train.epochs", "log.every", "aug.res", "moco.dim", "moco.queue_size",
             "moco.temperature", "optim.lr", "optim.lr_batch", "eval.knn_k")  # fmt: skip
_NON_NEGATIVE = ("ckpt.every", "ckpt.keep", "eval.every", "eval.knn_every", "data.workers", "moco.mlp_hidden",
                 "optim.weight_decay", "optim.momentum", "optim.warmup_epochs", "distill.lam",
                 "distill.start_epoch")  # fmt: skip
_PROBABILITIES = ("aug.hflip_p", "aug.grayscale_p", "aug.blur_p")


def validate(cfg: Any) -> None:
    """Range and cross-field checks OmegaConf cannot express; raise ConfigError naming the key and the fix."""

    def get(key: str) -> Any:
        return OmegaConf.select(cfg, key)

    for key in _POSITIVE:
        if get(key) is not None and get(key) <= 0:
            raise ConfigError(f"{key} must be > 0 (got {get(key)})")
    for key in _NON_NEGATIVE:
        if get(key) is not None and get(key) < 0:
            raise ConfigError(f"{key} must be >= 0 (got {get(key)})")
    if cfg.train.max_steps == 0 or cfg.train.max_steps < -1:
        raise ConfigError(f"train.max_steps must be > 0, or -1 for the whole run (got {cfg.train.max_steps})")
    if not 0 < cfg.aug.min_scale <= 1:
        raise ConfigError(f"aug.min_scale must be in (0, 1] (got {cfg.aug.min_scale})")
    if get("aug.eval_res") is not None and cfg.aug.eval_res != -1 and cfg.aug.eval_res <= 0:
        raise ConfigError(f"aug.eval_res must be > 0, or -1 for aug.res (got {cfg.aug.eval_res})")
    for key in _PROBABILITIES:
        if get(key) is not None and not 0.0 <= get(key) <= 1.0:
            raise ConfigError(f"{key} must be a probability in [0, 1] (got {get(key)})")
    js = get("aug.jitter_scale")
    if js is not None and not 0.0 <= js <= 2.5:
        raise ConfigError(f"aug.jitter_scale must be in [0, 2.5] (it multiplies 0.4) (got {js})")
    ls = get("distill.label_smoothing")
    if ls is not None and not 0.0 <= ls < 1.0:
        raise ConfigError(f"distill.label_smoothing must be in [0, 1) (got {ls})")
    if "moco" in cfg:
        m, batch = cfg.moco, cfg.train.batch_size
        if not 0.0 <= m.momentum < 1.0:
            raise ConfigError(f"moco.momentum must be in [0, 1) (got {m.momentum})")
        if m.queue_size < batch:
            raise ConfigError(
                f"moco.queue_size={m.queue_size} is smaller than train.batch_size={batch}: "
                "raise moco.queue_size or lower train.batch_size"
            )
        if m.bn_splits < 1 or batch % m.bn_splits:
            raise ConfigError(f"train.batch_size={batch} must be divisible by moco.bn_splits={m.bn_splits}")
    if "distill" in cfg and len(cfg.distill.stage_weights) != 4:
        raise ConfigError("distill.stage_weights needs 4 values (one per ResNet stage)")


def recipe_path(name: str) -> Path:
    """`--config NAME`: a YAML file, else a recipe shipped in fastvpd/configs (NAME or NAME.yaml)."""
    path = Path(name)
    if path.is_file():
        return path
    packaged = RECIPES / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    if packaged.is_file() and path.parent == Path("."):
        return packaged
    shipped = ", ".join(sorted(p.stem for p in RECIPES.glob("*.yaml")))
    raise ConfigError(f"config file not found: {name} (recipes shipped: {shipped})")


def load(schema: type, argv: list[str] | None = None) -> Any:
    """A validated config of run type `schema` from command-line arguments (`sys.argv[1:]` when None):
    `--config FILE.yaml|NAME`, `section.key=value` overrides, `--help`, `--print-config` (fastvpd.cli)."""
    from fastvpd import cli

    return cli.load(schema, argv)


def resolve(schema: type, cfg: Any = None, argv: list[str] | None = None) -> Any:
    """A validated config of run type `schema` from what the Python API `run(...)` takes (fastvpd.cli)."""
    from fastvpd import cli

    return cli.resolve(schema, cfg, argv)


def save(cfg: Any, path: str | Path) -> None:
    """Write the resolved config beside the run (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    tmp.replace(path)


def to_dict(cfg: Any) -> dict:
    """Plain containers (choices as strings), as checkpoints store the config."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # type: ignore[return-value]


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

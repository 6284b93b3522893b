"""One augmentation spec, rendered by every loader backend.

The recipes (MoCo v2 two-view, supervised, eval) are defined here once as frozen dataclasses; the cache,
ffcv, dali and torchvision backends only *render* them, so a recipe cannot drift between backends.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
EVAL_CROP_FRACTION = 0.875


@dataclass(frozen=True)
class RandomResizedCrop:
    """torchvision RandomResizedCrop: area fraction in `scale`, log-uniform aspect ratio in `ratio`."""

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)


@dataclass(frozen=True)
class ResizeCenterCrop:
    """Eval: short side to `resize`, centre-crop `size` (ten_crop: 4 corners + centre, and flips)."""

    size: int
    resize: int
    ten_crop: bool = False


@dataclass(frozen=True)
class ColorJitter:
    """torchvision ColorJitter (per-sample factors and op order), applied with probability p."""

    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    p: float = 0.8


@dataclass(frozen=True)
class GaussianBlur:
    """Gaussian blur with sigma ~ U(sigma), odd kernel of ~`kernel_frac` of the side, applied with prob p."""

    sigma: tuple[float, float] = (0.1, 2.0)
    p: float = 0.5
    kernel_frac: float = 0.1

    def kernel_size(self, res: int) -> int:
        """Odd kernel size, as in SimCLR/torchvision recipes: int(frac*res), bumped to odd, at least 3."""
        k = max(3, int(self.kernel_frac * res))
        return k if k % 2 == 1 else k + 1


@dataclass(frozen=True)
class Normalize:
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass(frozen=True)
class ViewSpec:
    """One view. Order (MoCo v2): crop -> [autoaugment] -> jitter -> grayscale -> blur -> flip -> normalise.

    Flip commutes with the point-wise colour ops and with the symmetric blur, so backends may fuse it into
    the crop resampling without changing the distribution (or even the pixels).
    """

    crop: RandomResizedCrop | ResizeCenterCrop
    hflip_p: float = 0.0
    jitter: ColorJitter | None = None
    grayscale_p: float = 0.0
    blur: GaussianBlur | None = None
    autoaugment: bool = False
    normalize: Normalize = field(default_factory=Normalize)

    @property
    def res(self) -> int:
        return self.crop.size

    @property
    def random(self) -> bool:
        return isinstance(self.crop, RandomResizedCrop)


@dataclass(frozen=True)
class AugSpec:
    """A recipe: `views` are drawn independently from the same image (MoCo v2: two identical ViewSpecs)."""

    name: str
    views: tuple[ViewSpec, ...]

    @property
    def res(self) -> int:
        return self.views[0].res

    @property
    def train(self) -> bool:
        return any(v.random for v in self.views)

    @property
    def num_outputs(self) -> int:
        """Tensors per batch: one per view, ten for a ten-crop eval view."""
        return sum(10 if isinstance(v.crop, ResizeCenterCrop) and v.crop.ten_crop else 1 for v in self.views)


def moco_v2(res: int = 224, min_scale: float = 0.2) -> AugSpec:
    """MoCo v2 (Chen et al. 2020): two independent views of the 'aug_plus' pipeline."""
    view = ViewSpec(
        crop=RandomResizedCrop(res, (min_scale, 1.0)),
        hflip_p=0.5,
        jitter=ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8),
        grayscale_p=0.2,
        blur=GaussianBlur((0.1, 2.0), p=0.5),
    )
    return AugSpec("moco_v2", (view, view))


def supervised(res: int = 224, min_scale: float = 0.08, autoaugment: bool = False) -> AugSpec:
    """Standard ImageNet training view: RandomResizedCrop + flip (+ AutoAugment ImageNet policy)."""
    view = ViewSpec(crop=RandomResizedCrop(res, (min_scale, 1.0)), hflip_p=0.5, autoaugment=autoaugment)
    return AugSpec("supervised", (view,))


def eval_spec(res: int = 224, ten_crop: bool = False) -> AugSpec:
    """Deterministic eval: short side to round(res/0.875), centre crop `res` (or ten crops)."""
    view = ViewSpec(crop=ResizeCenterCrop(res, round(res / EVAL_CROP_FRACTION), ten_crop))
    return AugSpec("eval_ten_crop" if ten_crop else "eval", (view,))


def with_strength(
    spec: AugSpec,
    hflip_p: float | None = None,
    jitter_p: float | None = None,
    jitter_scale: float | None = None,
    grayscale_p: float | None = None,
    blur_p: float | None = None,
) -> AugSpec:
    """The same recipe with some strengths changed (None keeps the recipe's value).

    A probability of 0 (or a jitter scale of 0) removes the op, so backends skip it entirely. Turning on
    jitter or blur where the recipe has none uses the MoCo v2 ranges.
    """
    views = []
    for v in spec.views:
        jitter, blur = v.jitter, v.blur
        if jitter_p is not None or jitter_scale is not None:
            base = jitter or ColorJitter()
            s = 1.0 if jitter_scale is None else jitter_scale
            p = base.p if jitter_p is None else jitter_p
            jitter = (
                None
                if p <= 0 or s <= 0
                else ColorJitter(
                    base.brightness * s, base.contrast * s, base.saturation * s, min(0.5, base.hue * s), p
                )
            )
        if blur_p is not None:
            blur = None if blur_p <= 0 else replace(blur or GaussianBlur(), p=blur_p)
        views.append(
            replace(
                v,
                hflip_p=v.hflip_p if hflip_p is None else hflip_p,
                jitter=jitter,
                grayscale_p=v.grayscale_p if grayscale_p is None else grayscale_p,
                blur=blur,
            )
        )
    return replace(spec, views=tuple(views))


def eval_crop(res: int, eval_res: int) -> int:
    """The evaluation crop size: aug.eval_res when set (> 0), else the training aug.res (eval_res = -1)."""
    return eval_res if eval_res > 0 else res


def from_config(aug_cfg: Any, train: bool, ten_crop: bool = False) -> AugSpec:
    """Spec from an `AugConfig` (fastvpd.config): the recipe when training, the eval transform otherwise."""
    if not train:
        return eval_spec(eval_crop(aug_cfg.res, aug_cfg.eval_res), ten_crop)
    if aug_cfg.recipe == "moco_v2":
        spec = moco_v2(aug_cfg.res, aug_cfg.min_scale if aug_cfg.min_scale > 0 else 0.2)
    elif aug_cfg.recipe == "supervised":
        spec = supervised(
            aug_cfg.res, aug_cfg.min_scale if aug_cfg.min_scale > 0 else 0.08, aug_cfg.autoaugment
        )
    else:
        from fastvpd.config import ConfigError

        raise ConfigError(f"aug.recipe={aug_cfg.recipe!r} is not one of moco_v2, supervised")

    def knob(name: str) -> float | None:
        value = float(getattr(aug_cfg, name, -1.0))
        return None if value < 0 else value

    return with_strength(
        spec, knob("hflip_p"), knob("jitter_p"), knob("jitter_scale"), knob("grayscale_p"), knob("blur_p")
    )


def with_res(spec: AugSpec, res: int) -> AugSpec:
    """The same recipe at another resolution (benchmarks, progressive resizing)."""
    views = []
    for v in spec.views:
        crop = (
            replace(v.crop, size=res)
            if isinstance(v.crop, RandomResizedCrop)
            else replace(v.crop, size=res, resize=round(res / EVAL_CROP_FRACTION))
        )
        views.append(replace(v, crop=crop))
    return replace(spec, views=tuple(views))

"""The augmentation spec: recipe contents and config mapping (rendered by every backend)."""

from __future__ import annotations

import pytest

from fastvpd.config import AugConfig, ConfigError
from fastvpd.data.spec import (
    IMAGENET_MEAN,
    ColorJitter,
    GaussianBlur,
    RandomResizedCrop,
    ResizeCenterCrop,
    eval_spec,
    from_config,
    moco_v2,
    supervised,
    with_res,
    with_strength,
)


def test_moco_v2_recipe() -> None:
    s = moco_v2(224)
    assert s.name == "moco_v2" and len(s.views) == 2 and s.views[0] == s.views[1] and s.train
    v = s.views[0]
    assert v.crop == RandomResizedCrop(224, (0.2, 1.0), (3 / 4, 4 / 3))
    assert (v.jitter.brightness, v.jitter.contrast, v.jitter.saturation, v.jitter.hue, v.jitter.p) == (
        0.4,
        0.4,
        0.4,
        0.1,
        0.8,
    )
    assert v.grayscale_p == 0.2 and v.hflip_p == 0.5
    assert v.blur.sigma == (0.1, 2.0) and v.blur.p == 0.5 and v.blur.kernel_size(224) == 23
    assert v.normalize.mean == IMAGENET_MEAN and not v.autoaugment


def test_supervised_and_eval_recipes() -> None:
    s = supervised(160, autoaugment=True)
    (v,) = s.views
    assert v.crop.scale == (0.08, 1.0) and v.hflip_p == 0.5 and v.autoaugment and v.jitter is None
    e = eval_spec(224)
    assert e.views[0].crop == ResizeCenterCrop(224, 256, False) and not e.train and e.num_outputs == 1
    assert eval_spec(224, ten_crop=True).num_outputs == 10
    assert eval_spec(32).views[0].crop.resize == round(32 / 0.875)


@pytest.mark.parametrize("res", [8, 16, 32, 64, 224])
def test_blur_kernel_is_odd_and_about_a_tenth(res: int) -> None:
    k = moco_v2(res).views[0].blur.kernel_size(res)
    assert k % 2 == 1 and (k == 3 or abs(k - 0.1 * res) <= 1)


def test_from_config() -> None:
    assert from_config(AugConfig(), train=True) == moco_v2(224)
    assert from_config(AugConfig(res=32, min_scale=0.5), train=True).views[0].crop.scale == (0.5, 1.0)
    sup = from_config(AugConfig(recipe="supervised", res=64, autoaugment=True), train=True)
    assert sup == supervised(64, 0.08, True)
    assert from_config(AugConfig(res=64), train=False) == eval_spec(64)
    assert from_config(AugConfig(res=64, eval_res=80), train=False) == eval_spec(80)
    with pytest.raises(ConfigError, match="aug.recipe"):
        from_config(AugConfig(recipe="simclr"), train=True)


def test_with_res_keeps_the_recipe() -> None:
    s = with_res(moco_v2(224), 96)
    assert s.res == 96 and s.views[0].jitter == moco_v2(224).views[0].jitter
    assert with_res(eval_spec(224), 64) == eval_spec(64)


def test_strength_knobs_change_only_what_they_name() -> None:
    base = moco_v2(32)
    assert with_strength(base) == base
    s = from_config(AugConfig(res=32, hflip_p=0.0, jitter_scale=0.5, blur_p=0.0), train=True)
    for v, b in zip(s.views, base.views):
        assert v.hflip_p == 0.0 and v.blur is None and v.crop == b.crop and v.grayscale_p == b.grayscale_p
        assert v.jitter == ColorJitter(0.2, 0.2, 0.2, 0.05, 0.8)
    # p = 0 removes the op (backends then skip it); turning ops on in a recipe without them uses MoCo's ranges
    assert with_strength(base, jitter_p=0.0).views[0].jitter is None
    sup = with_strength(supervised(32), jitter_p=0.5, blur_p=0.3, grayscale_p=0.1)
    (v,) = sup.views
    assert v.jitter == ColorJitter(p=0.5) and v.blur == GaussianBlur(p=0.3) and v.grayscale_p == 0.1
    assert with_strength(base, jitter_scale=10.0).views[0].jitter.hue == 0.5  # hue is capped at 0.5


@pytest.mark.parametrize(
    "override", ["aug.hflip_p=1.5", "aug.blur_p=-0.5", "aug.jitter_scale=3", "aug.grayscale_p=2"]
)
def test_strength_knobs_are_validated(override: str) -> None:
    from fastvpd import config

    with pytest.raises(ConfigError, match=override.split("=")[0]):
        config.load(config.PretrainRun, [override])

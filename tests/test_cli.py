"""The config surface a user sees: per-run schemas (key counts, docs, choices), the recipes, `--help`,
`--print-config`, `--config NAME`, and the config forms the Python API accepts (fastvpd.cli.resolve)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from fastvpd import cli, config, distill, linear, pretrain
from fastvpd.config import ConfigError, DistillRun, LinearRun, PretrainRun

ROOT = Path(__file__).resolve().parents[1]
MAINS = {PretrainRun: pretrain.main, DistillRun: distill.main, LinearRun: linear.main}


def _main(schema: type, argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            MAINS[schema](argv)
            rc = 0
        except SystemExit as e:
            rc = int(e.code or 0)
    return rc, out.getvalue(), err.getvalue()


# ---------------------------------------------------------------------------------------------- the schema
@pytest.mark.parametrize("schema", config.RUNS)
def test_each_run_type_has_at_most_50_documented_keys(schema: type) -> None:
    keys = config.keys(schema)
    assert len(keys) <= 50, len(keys)
    assert len({k.name for k in keys}) == len(keys)
    for k in keys:
        assert k.doc and "\n" not in k.doc, k.name
        choices = config.choices_of(k.type)
        if choices:  # a choice prints and compares as its value
            assert all(m.name == m.value for m in k.type) and str(k.default) in choices, k.name
            assert f"{k.default}" == str(k.default) == k.default


def test_keys_live_only_where_they_mean_something() -> None:
    names = {s: {k.name for k in config.keys(s)} for s in config.RUNS}
    assert not any(k.startswith(("distill.", "linear.")) for k in names[PretrainRun])
    assert {"aug.autoaugment", "aug.eval_res", "model.init"}.isdisjoint(names[PretrainRun])
    for s in (DistillRun, LinearRun):
        assert not any(k.startswith("moco.") or "knn" in k for k in names[s])
        assert "aug.jitter_scale" not in names[s]
    assert "linear.backbone" in names[LinearRun] and "distill.teacher" not in names[LinearRun]
    # settled variants are gone from every run type
    gone = {"data.compile_aug", "data.aug_kernel", "data.dali_jitter", "data.dali_decode", "data.aug_in_step",
            "data.dali_pipelines", "data.pin_host_cache", "model.channels_last", "model.stem_channels",
            "model.stem_impl", "moco.split_bn", "moco.overlap_key", "aug.recipe"}  # fmt: skip
    assert all(gone.isdisjoint(n) for n in names.values())


def test_run_defaults_give_each_recipe_its_spec() -> None:
    """The per-run aug defaults spell out the recipes' own values: the same spec as the recipe's."""
    from fastvpd.data.spec import from_config, moco_v2, supervised

    pre, dis = config.load(PretrainRun, []), config.load(DistillRun, [])
    assert from_config(config.aug_settings(pre.aug), train=True) == moco_v2(224)
    assert from_config(config.aug_settings(dis.aug), train=True) == supervised(224)
    assert config.aug_settings(dis.aug).recipe == "supervised"


def test_choices_are_validated_from_the_enum() -> None:
    for argv, words in [
        (["train.amp=bf16_cpu"], ["train.amp='bf16_cpu'", "bf16, fp16, none"]),
        (["model.arch=resnet51"], ["did you mean 'resnet50'"]),
        (["data.verify=of"], ["data.verify", "fast, full, off"]),
    ]:
        with pytest.raises(ConfigError) as e:
            config.load(PretrainRun, argv)
        assert all(w in str(e.value) for w in words), str(e.value)
    cfg = config.load(PretrainRun, ["data.verify=off", "train.amp=none"])
    assert (
        cfg.data.verify == "off" and cfg.train.amp == "none" and config.to_dict(cfg)["train"]["amp"] == "none"
    )


def test_a_key_of_another_run_type_names_the_right_one() -> None:
    with pytest.raises(ConfigError, match="'distill.teacher': did you mean 'linear.backbone'"):
        config.load(LinearRun, ["distill.teacher=x.pt"])
    with pytest.raises(ConfigError, match="'eval.every': did you mean 'eval.knn_every'"):
        config.load(PretrainRun, ["eval.every=2"])
    with pytest.raises(ConfigError, match="unknown config key 'moco.overlap_key'.*moco.bn_splits"):
        config.load(PretrainRun, ["moco.overlap_key=true"])


# ------------------------------------------------------------------------------------------------ recipes
@pytest.mark.parametrize("path", sorted(config.RECIPES.glob("*.yaml")), ids=lambda p: p.stem)
def test_recipes_list_only_what_differs_from_the_defaults(path: Path) -> None:
    schema = DistillRun if "distill" in path.stem else LinearRun if "linear" in path.stem else PretrainRun
    assert [s for s in config.RUNS if path.stem in cli.recipes_for(s)] == [schema]
    defaults = {k.name: k.default for k in config.keys(schema)}
    given = cli._flatten(yaml.safe_load(path.read_text()))
    same = [k for k, v in given.items() if v == defaults[k]]
    assert not same, f"{path.name} restates defaults: {same}"
    assert len(path.read_text().splitlines()) <= 30


def test_config_name_resolves_a_packaged_recipe(tmp_path: Path) -> None:
    by_name = config.load(PretrainRun, ["--config", "demo_digits_pretrain"])
    by_file = config.load(PretrainRun, ["--config", str(config.RECIPES / "demo_digits_pretrain.yaml")])
    assert by_name == by_file and by_name.aug.res == 32
    assert config.recipe_path("demo_digits_pretrain.yaml") == config.RECIPES / "demo_digits_pretrain.yaml"
    with pytest.raises(
        ConfigError, match="config file not found: nope .*recipes shipped: .*vipriors_moco_r50"
    ):
        config.load(PretrainRun, ["--config", "nope"])
    with pytest.raises(ConfigError, match="config file not found"):  # a path is never a recipe name
        config.load(PretrainRun, ["--config", str(tmp_path / "demo_digits_pretrain.yaml")])


# ------------------------------------------------------------------------------------ --help, --print-config
@pytest.mark.parametrize("schema", config.RUNS)
def test_help_lists_every_key_with_type_default_choices_and_doc(schema: type) -> None:
    rc, out, err = _main(schema, ["--help"])
    assert rc == 0 and not err
    assert out.startswith(f"usage: python -m fastvpd.{schema.COMMAND}")
    lines = out.splitlines()
    for k in config.keys(schema):
        head = next(i for i, ln in enumerate(lines) if ln.startswith(f"  {k.name}: "))
        assert lines[head + 1].strip() == k.doc
        assert lines[head].endswith(f" = {cli._shown(k.default)}")
        for c in config.choices_of(k.type) or []:
            assert c in lines[head]
    sections = [m.group(1) for ln in lines if (m := re.match(r"([a-z]+): ", ln)) and m.group(1) != "usage"]
    assert sections == [f.name for f in dataclasses.fields(schema)]
    assert "train.amp: {bf16|fp16|none} = bf16" in out


def test_help_through_the_real_cli_exits_0() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "fastvpd.linear", "-h"], cwd=ROOT, capture_output=True, text=True, timeout=240
    )
    assert r.returncode == 0 and "linear.backbone: str" in r.stdout and "Traceback" not in r.stderr


def test_print_config_prints_the_resolved_recipe_and_overrides() -> None:
    argv = ["--config", "demo_digits_distill", "train.epochs=3", "distill.kind=l2"]
    rc, out, err = _main(DistillRun, [*argv, "--print-config"])
    assert rc == 0 and not err
    printed = OmegaConf.create(yaml.safe_load(out))
    assert printed.train.epochs == 3 and printed.distill.kind == "l2" and printed.aug.res == 32
    assert config.load(DistillRun, argv) == config.resolve(DistillRun, OmegaConf.to_container(printed))
    rc, _, err = _main(DistillRun, ["train.epocs=3", "--print-config"])
    assert rc == 2 and "did you mean 'train.epochs'" in err


# ------------------------------------------------------------------------------------- the API's config forms
def test_resolve_takes_a_config_object_a_mapping_or_argv() -> None:
    recipe, over = ["--config", "demo_digits_pretrain"], {"train.epochs": 2, "optim.milestones": [1]}
    want = config.load(PretrainRun, [*recipe, "train.epochs=2", "optim.milestones=[1]"])
    forms = [
        config.resolve(PretrainRun, [*recipe, "train.epochs=2", "optim.milestones=[1]"]),  # argv
        config.resolve(PretrainRun, over, recipe),  # dotted overrides on a recipe
        config.resolve(PretrainRun, {"train": {"epochs": 2}, "optim.milestones": [1]}, ["-c", recipe[1]]),
        config.resolve(PretrainRun, want),  # OmegaConf of this run type
        config.resolve(PretrainRun, OmegaConf.to_object(want)),  # the dataclass
    ]
    assert all(f == want for f in forms)
    dc = PretrainRun()
    dc.train.epochs, dc.train.amp = 3, "none"  # a plain string for a choice is accepted
    assert config.resolve(PretrainRun, dc).train.epochs == 3
    assert (
        config.resolve(PretrainRun, {"data.verify": "off", "train.deterministic": True}).data.verify == "off"
    )


def test_resolve_mistakes_are_one_line_config_errors() -> None:
    cases = [
        (PretrainRun, {"train.batchsize": 3}, "did you mean 'train.batch_size'"),
        (PretrainRun, {"train.epochs": "many"}, "train.epochs=many is not a valid whole number"),
        (PretrainRun, {"train.amp": "fp8"}, "train.amp='fp8' is not one of bf16, fp16, none"),
        (PretrainRun, DistillRun(), "a DistillRun config was given where a PretrainRun is needed"),
        (LinearRun, 3, "cannot make a LinearRun from a int"),
        (PretrainRun, {"moco.queue_size": 8}, "raise moco.queue_size"),
    ]
    for schema, given, words in cases:
        with pytest.raises(ConfigError) as e:
            config.resolve(schema, given)
        assert words in str(e.value) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(ConfigError, match="once"):
        config.resolve(PretrainRun, ["train.epochs=1"], ["train.epochs=2"])

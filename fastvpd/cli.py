"""From what a user types to a validated config: `--config FILE.yaml|NAME`, `section.key=value` overrides,
`--help`, `--print-config` (`load`), and the Python API's config objects and override mappings (`resolve`).

Every mistake becomes one ConfigError line naming the full dotted key and the fix. The keys, their types,
defaults, choices and docs come from the run schemas in fastvpd.config.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
from collections.abc import Mapping
from enum import Enum
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from fastvpd.config import MOVED, RECIPES, RUNS, ConfigError, choices_of, keys, recipe_path, validate

USAGE = (
    "usage: python -m fastvpd.{cmd} [--config FILE.yaml | RECIPE] [section.key=value ...] [--print-config]"
)


# ------------------------------------------------------------------------------------------------- messages
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
    valid = [k.name for k in keys(schema)]
    sections = sorted({k.split(".")[0] for k in valid})
    head = f"unknown config key {key!r}{where}"
    hint = MOVED.get(key) if MOVED.get(key) in valid else suggest_key(key, valid)
    if hint:
        return f"{head}: did you mean {hint!r}?"
    section = key.split(".")[0]
    if section in sections:
        same = ", ".join(k for k in valid if k.startswith(section + "."))
        return f"{head}: section {section!r} has keys {same}"
    return f"{head}: keys are section.name with section one of {', '.join(sections)} (see --help)"


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
    """Reject unknown keys, values given to whole sections and values outside a key's choices before
    OmegaConf sees them, so that the message names the full dotted key (OmegaConf names only the first
    unknown component)."""
    known = {k.name: k for k in keys(schema)}
    sections = {k.split(".")[0] for k in known}
    for key, val in given.items():
        if key in known:
            choices = choices_of(known[key].type)
            if choices and str(val) not in choices:
                hint = difflib.get_close_matches(str(val), choices, n=1, cutoff=0.6)
                dym = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise ConfigError(f"{key}={str(val)!r}{where} is not one of {', '.join(choices)}{dym}")
            continue
        if key in sections:
            example = next(k for k in known if k.startswith(key + "."))
            raise ConfigError(f"{key} is a section, not a value{where}: set its keys, e.g. {example}=...")
        parent = next((key[: len(v)] for v in known if key.startswith(v + ".")), None)
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


# ---------------------------------------------------------------------------------------- building a config
def _parse_argv(argv: list[str]) -> tuple[str | None, list[str], set[str]]:
    """(--config value, key=value overrides, flags given: --help, --print-config)."""
    yaml_path, overrides, flags = None, [], set()
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("--config", "-c"):
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a YAML file path or a recipe name")
            yaml_path, i = argv[i + 1], i + 2
            continue
        if a.startswith("--config="):
            yaml_path = a.split("=", 1)[1]
        elif a in ("--help", "-h", "--print-config"):
            flags.add("help" if a in ("--help", "-h") else "print")
        elif "=" in a and not a.startswith("-"):
            overrides.append(a)
        else:
            raise ConfigError(
                f"unexpected argument {a!r}: use --config FILE.yaml and section.key=value overrides "
                "(see --help)"
            )
        i += 1
    return yaml_path, overrides, flags


def _quote_str_overrides(schema: type, overrides: list[str]) -> list[str]:
    """Pass values of string (and choice) keys through verbatim: YAML would read `data.verify=off` as False
    and `distill.teacher=` as null, and neither is what a user typing a string means."""
    types = {k.name: k.type for k in keys(schema)}
    out = []
    for o in overrides:
        key, val = o.split("=", 1)
        is_str = types.get(key) is str or choices_of(types.get(key)) is not None
        quoted = val[:1] in ("'", '"') and val[-1:] == val[:1] and len(val) > 1
        out.append(f"{key}='{val.replace(chr(39), chr(39) * 2)}'" if is_str and not quoted else o)
    return out


def _layer(schema: type, nested: Any, where: str) -> tuple[Any, dict[str, Any]]:
    """A checked layer to merge: (the OmegaConf node, {dotted key: value as given})."""
    node = nested if isinstance(nested, DictConfig) else OmegaConf.create(nested)
    flat = _flatten(OmegaConf.to_container(node))
    _check_keys(schema, flat, where)
    return node, flat


def _merge(schema: type, layers: list[tuple[Any, str, dict[str, Any] | None]]) -> Any:
    """The schema's defaults with each (nested values, where, raw values for messages) merged in order,
    then validated. Every OmegaConf error becomes one ConfigError line."""
    cfg = OmegaConf.structured(schema)
    given: dict[str, Any] = {}
    try:
        for nested, where, raw in layers:
            node, flat = _layer(schema, nested, where)
            given.update(raw if raw is not None else flat)
            cfg = OmegaConf.merge(cfg, node)
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


def _argv_layers(schema: type, yaml_path: str | None, overrides: list[str]) -> list[tuple[Any, str, Any]]:
    layers: list[tuple[Any, str, Any]] = []
    if yaml_path is not None:
        path = recipe_path(yaml_path)
        try:
            loaded = OmegaConf.load(path)
        except Exception as e:
            raise ConfigError(f"could not read the config {path}: {' '.join(str(e).split())}") from None
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"{path} must be a mapping of sections (train: ..., data: ...)")
        layers.append((loaded, f" in {path}", None))
    if overrides:
        dot = OmegaConf.from_dotlist(_quote_str_overrides(schema, overrides))
        layers.append((dot, "", {o.split("=", 1)[0]: o.split("=", 1)[1] for o in overrides}))
    return layers


def _dotlist_value(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, list | tuple):
        return "[" + ",".join(_dotlist_value(x) for x in v) + "]"
    return str(v)


def _plain(obj: Any) -> Any:
    """Nested containers of a dataclass config, choices as strings, unchecked (so `_merge` words errors)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return str(obj) if isinstance(obj, Enum) else obj


def resolve(schema: type, cfg: Any = None, argv: list[str] | None = None) -> Any:
    """A validated config of run type `schema` from what the Python API takes: `cfg` is None, a config of
    this run type (OmegaConf or the dataclass), a mapping of overrides ({"train.epochs": 2} or nested), or
    an argv list; `argv` (`--config`, `key=value`) is applied first, a mapping on top of it."""
    if isinstance(cfg, list | tuple):
        if argv is not None:
            raise ConfigError("give the command-line arguments once: as cfg or as argv")
        cfg, argv = None, list(cfg)
    yaml_path, overrides, flags = _parse_argv(list(argv or []))
    if flags:
        return load(schema, list(argv or []))
    layers = _argv_layers(schema, yaml_path, overrides)
    if cfg is None:
        pass
    elif isinstance(cfg, DictConfig) or dataclasses.is_dataclass(cfg):
        kind = OmegaConf.get_type(cfg) if isinstance(cfg, DictConfig) else type(cfg)
        if kind is not schema and kind is not dict:
            raise ConfigError(f"a {kind.__name__} config was given where a {schema.__name__} is needed")
        plain = OmegaConf.to_container(cfg, enum_to_str=True) if isinstance(cfg, DictConfig) else _plain(cfg)
        layers.append((plain, " in the config given", None))
    elif isinstance(cfg, Mapping):
        flat = _flatten(dict(cfg))
        over = [f"{k}={_dotlist_value(v)}" for k, v in flat.items()]
        layers.append((OmegaConf.from_dotlist(_quote_str_overrides(schema, over)), "", flat))
    else:
        raise ConfigError(f"cannot make a {schema.__name__} from a {type(cfg).__name__}")
    return _merge(schema, layers)


# -------------------------------------------------------------------------------------------------- --help
def _type_name(t: Any) -> str:
    choices = choices_of(t)
    if choices:
        return "{" + "|".join(choices) + "}"
    if getattr(t, "__origin__", None) is list:
        return f"list[{t.__args__[0].__name__}]"
    return getattr(t, "__name__", str(t))


def _shown(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, list):
        return "[" + ", ".join(_shown(x) for x in v) + "]"
    return '""' if v == "" else str(v)


def recipes_for(schema: type) -> list[str]:
    """The shipped recipes for this run type: their keys all belong to it, and a name that names a run type
    (demo_digits_linear) names this one."""
    out = []
    for path in sorted(RECIPES.glob("*.yaml")):
        named = [run.COMMAND for run in RUNS if run.COMMAND in path.stem]  # type: ignore[attr-defined]
        if named and schema.COMMAND not in named:  # type: ignore[attr-defined]
            continue
        try:
            flat = _flatten(OmegaConf.to_container(OmegaConf.load(path)))
            _check_keys(schema, flat, "")
        except Exception:
            continue
        out.append(path.stem)
    return out


def help_text(schema: type) -> str:
    """Every key of the run type, grouped by section: type or choices, default, one-line doc."""
    cmd = schema.COMMAND  # type: ignore[attr-defined]
    lines = [USAGE.format(cmd=cmd), "", f"{schema.__doc__}.", ""]
    shipped = recipes_for(schema)
    if shipped:
        lines += [f"Recipes shipped (--config NAME): {', '.join(shipped)}", ""]
    lines += ["Keys (section.key=value on the command line, or in the YAML file):"]
    run, section = schema(), None
    for k in keys(schema):
        sec = k.name.split(".")[0]
        if sec != section:
            section = sec
            lines += ["", (type(getattr(run, sec)).__doc__ or sec).strip().splitlines()[0]]
        lines.append(f"  {k.name}: {_type_name(k.type)} = {_shown(k.default)}")
        lines.append(f"      {k.doc}")
    return "\n".join(lines)


def load(schema: type, argv: list[str] | None = None) -> Any:
    """See fastvpd.config.load: `--help` prints `help_text` and exits 0; `--print-config` prints the
    resolved YAML and exits 0."""
    argv = list(sys.argv[1:] if argv is None else argv)
    yaml_path, overrides, flags = _parse_argv(argv)
    if "help" in flags:
        print(help_text(schema), flush=True)
        raise SystemExit(0)
    cfg = _merge(schema, _argv_layers(schema, yaml_path, overrides))
    if "print" in flags:
        print(OmegaConf.to_yaml(cfg, resolve=True), end="", flush=True)
        raise SystemExit(0)
    return cfg

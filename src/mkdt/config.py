"""Typed configs: dataclasses filled from presets, YAML files and ``key.sub=value`` overrides.

Why: one config object per stage (as in timm's scripts), resolved in a fixed order
(dataclass defaults < preset < YAML file < command-line overrides), checked against the dataclass
fields so a typo is an error rather than a silently ignored setting, and saved beside the outputs.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping, TypeVar

import yaml

from mkdt.errors import MkdtError

T = TypeVar("T")
_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def to_dict(config: Any) -> Any:
    """A dataclass (nested) as plain JSON/YAML-able data."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    if isinstance(config, Path):
        return str(config)
    return config


def _unwrap_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` to the annotated type ``tp`` where it is unambiguous; else complain."""
    if value is None:
        return None
    tp = _unwrap_optional(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise MkdtError(f"config '{where}' must be a mapping, got {value!r}")
        return from_dict(tp, value, prefix=f"{where}.")
    origin = typing.get_origin(tp)
    if origin in (list, tuple, typing.Sequence) or tp in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            value = [value]
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        items = [_coerce(v, inner, where) for v in value]
        return tuple(items) if origin is tuple or tp is tuple else items
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise MkdtError(f"config '{where}' must be true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise MkdtError(f"config '{where}' must be an integer, got {value!r}")
        try:
            as_float = float(value)
        except ValueError:
            raise MkdtError(f"config '{where}' must be an integer, got {value!r}") from None
        if as_float != int(as_float):
            raise MkdtError(f"config '{where}' must be an integer, got {value!r}")
        return int(as_float)
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise MkdtError(f"config '{where}' must be a number, got {value!r}") from None
    if tp is str:
        return str(value)
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping; unknown keys are an error naming the key."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise MkdtError(
            f"unknown config key '{prefix}{unknown[0]}'; valid keys here: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        child = node.get(k)
        if not isinstance(child, dict):
            child = {}
            node[k] = child
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` -> (``a.b``, YAML-parsed value)."""
    if "=" not in text:
        raise MkdtError(f"override '{text}' must look like key=value (e.g. teacher.epochs=10)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise MkdtError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads "1e-3" as a string; on a command line it means a number
    return key, value


def merge(base: dict, update: Mapping) -> dict:
    """Recursive dict merge (``update`` wins)."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise MkdtError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text("utf-8")) or {}
    except yaml.YAMLError as exc:
        line = str(exc).splitlines()[0] if str(exc) else "syntax error"
        raise MkdtError(f"{path}: not valid YAML ({line})") from None
    if not isinstance(data, dict):
        raise MkdtError(f"{path}: a config file must be a mapping of keys to values")
    return data


def _preset_files(name: str, section: str | None) -> list:
    root = resources.files("mkdt") / "presets"
    files = [root / f"{name}.yaml"]
    if section:
        files.append(root / section / f"{name}.yaml")
    return [f for f in files if f.is_file()]


def available_presets() -> list[str]:
    """Preset names: ``presets/<name>.yaml`` (whole pipeline) or ``presets/<stage>/<name>.yaml``."""
    root = resources.files("mkdt") / "presets"
    names: set[str] = set()
    for entry in root.iterdir():
        if entry.name.endswith(".yaml"):
            names.add(entry.name[: -len(".yaml")])
        elif entry.is_dir():
            names.update(p.name[: -len(".yaml")] for p in entry.iterdir() if p.name.endswith(".yaml"))
    return sorted(names)


def read_preset(name: str, section: str | None = None) -> dict:
    """A named preset shipped with the package, merged from ``presets/<name>.yaml`` and, for a stage,
    ``presets/<section>/<name>.yaml`` (whose keys are that stage's own)."""
    files = _preset_files(name, section)
    if not files and name not in available_presets():
        raise MkdtError(f"unknown preset '{name}'; available: {', '.join(available_presets())}")
    tree: dict = {}
    for f in files:
        doc = yaml.safe_load(f.read_text("utf-8")) or {}
        if section and f.parent.name == section:
            doc = {section: doc}
        tree = merge(tree, doc)
    return tree


def resolve(
    cls: type[T],
    *,
    preset: str | None = None,
    section: str | None = None,
    files: Iterable[str | Path] = (),
    overrides: Iterable[str] = (),
    values: Mapping[str, Any] | None = None,
    docs: Iterable[Mapping[str, Any]] = (),
) -> T:
    """Resolve a config: defaults < preset < files < ``docs`` < ``values`` < ``key=value`` overrides.

    ``section``: presets and files may hold several stages' settings; if the top level has a mapping
    under ``section`` it is merged over the top-level keys that belong to ``cls``. Top-level keys that
    belong to other stages are ignored in files and presets, but never in ``overrides``.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    tree: dict = {}

    def takes_mapping(name: str) -> bool:
        tp = _unwrap_optional(hints[name])
        return dataclasses.is_dataclass(tp) or tp is dict or typing.get_origin(tp) is dict

    def absorb(doc: Mapping) -> None:
        nonlocal tree
        # A top-level mapping under a scalar field's name is another stage's section (e.g. ``teacher:``
        # in a run document vs the ``teacher`` path of the targets stage): not this config's value.
        own = {k: v for k, v in doc.items()
               if k in names and (not isinstance(v, Mapping) or takes_mapping(k))}
        tree = merge(tree, own)
        if section and isinstance(doc.get(section), Mapping):
            tree = merge(tree, doc[section])

    if preset:
        absorb(read_preset(preset, section))
    for f in files:
        absorb(read_yaml(f))
    for doc in docs:
        absorb(doc)
    if values:
        tree = merge(tree, {k: v for k, v in values.items() if v is not None})
    for text in overrides:
        key, value = parse_override(text)
        if section and key.startswith(section + "."):
            key = key[len(section) + 1 :]
        _set_dotted(tree, key, value)
    return from_dict(cls, tree)


def dump_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


@dataclasses.dataclass
class StageConfig:
    """Fields every stage config has: the one seed, the device and the run directory."""

    seed: int = 0
    device: str = "auto"
    out: str = "runs/default"

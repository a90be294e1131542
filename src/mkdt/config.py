"""Typed configs: dataclasses filled from presets, YAML files and ``key.sub=value`` overrides.

Why: one config object per stage (as in timm's scripts), resolved in a fixed order (dataclass defaults <
preset < YAML file < command-line overrides), checked against the dataclass fields so a typo is an error
(with a did-you-mean) rather than a silently ignored setting, validated by the config's own ``check()``
before anything runs, and saved beside the outputs.

One validation style: a config class (or a nested one) may define ``check()``, which calls
:func:`require` for every rule; :func:`validate` (called by :func:`resolve`) walks the nested configs and
turns a broken rule into a :class:`~mkdt.errors.ConfigError` naming the full dotted key. Checks never
rewrite a value: a contradiction is refused.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import io
import re
import textwrap
import tokenize
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, TypeVar

import yaml

from mkdt.errors import ConfigError

T = TypeVar("T")
_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


# ----------------------------------------------------------------------------------------------
# rules
# ----------------------------------------------------------------------------------------------
class Invalid(Exception):
    """A broken rule of a config's ``check()``: the key relative to that config, what it must be, the value."""

    def __init__(self, key: str, want: str, value: Any, fix: str | None = None):
        super().__init__(key)
        self.key, self.want, self.value, self.fix = key, want, value, fix


def require(ok: Any, key: str, want: str, value: Any, fix: str | None = None) -> None:
    """Inside ``check()``: refuse ``value`` of ``key`` unless ``ok`` (``want`` says what it must be)."""
    if not ok:
        raise Invalid(key, want, value, fix)


def validate(config: Any, prefix: str = "") -> None:
    """Run ``check()`` of ``config`` and of every nested config; the first broken rule is a ConfigError."""
    for path, node in _walk(config, prefix):
        # every class's own check in the hierarchy (StageConfig's rules hold without a super() call)
        checks = [k.__dict__["check"] for k in reversed(type(node).__mro__) if "check" in k.__dict__]
        try:
            for check in checks:
                check(node)
        except Invalid as bad:
            text = f"{path}{bad.key} must be {bad.want}, got {bad.value!r}"
            raise ConfigError(text + (f"; {bad.fix}" if bad.fix else "")) from None


def _walk(config: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    """Depth first, children before their parent (a parent's rules may assume valid children)."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        for f in dataclasses.fields(config):
            value = getattr(config, f.name)
            if isinstance(value, (list, tuple)):
                for i, item in enumerate(value):
                    yield from _walk(item, f"{prefix}{f.name}[{i}].")
            else:
                yield from _walk(value, f"{prefix}{f.name}.")
        yield prefix, config


# ----------------------------------------------------------------------------------------------
# dataclasses <-> plain data
# ----------------------------------------------------------------------------------------------
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
            raise ConfigError(f"{where} must be a mapping of settings, got {value!r}")
        return from_dict(tp, value, prefix=f"{where}.")
    origin = typing.get_origin(tp)
    if origin in (list, tuple, typing.Sequence) or tp in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            value = [value]
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        inner = args[0] if args else Any
        items = [_coerce(v, inner, where) for v in value]
        return tuple(items) if origin is tuple or tp is tuple else items
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        try:
            as_float = float(value)
        except ValueError:
            raise ConfigError(f"{where} must be an integer, got {value!r}") from None
        if as_float != as_float or as_float in (float("inf"), float("-inf")) or as_float != int(as_float):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return int(as_float)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (Mapping, list, tuple)):
            raise ConfigError(f"{where} must be a text value, got {value!r}")
        return str(value)
    return value


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest choice, or nothing."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping; an unknown key is an error naming the key."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        key = str(unknown[0])
        nested = [f"{n}.{f.name}" for n in names if dataclasses.is_dataclass(_unwrap_optional(hints[n]))
                  for f in dataclasses.fields(_unwrap_optional(hints[n]))]
        moved = [p for p in nested if p.endswith("." + key)]  # e.g. batch_size -> schedule.batch_size
        hint = f" (did you mean '{prefix}{moved[0]}'?)" if moved else did_you_mean(key, names)
        raise ConfigError(f"unknown config key '{prefix}{key}'{hint}; valid keys here: {', '.join(names)}")
    defaults = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {k: _coerce(_onto_default(defaults[k], v), hints[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{prefix or cls.__name__}: {exc}") from None


def _onto_default(f: dataclasses.Field, value: Any) -> Any:
    """A mapping given for a nested config updates that field's default (what ``--help`` shows), e.g.
    ``teacher: {model: {width: 32}}`` keeps the teacher's default ResNet-18 and changes its width only."""
    if not isinstance(value, Mapping):
        return value
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        default = f.default_factory()  # type: ignore[misc]
    elif f.default is not dataclasses.MISSING:
        default = f.default
    else:
        return value
    if not (dataclasses.is_dataclass(default) and not isinstance(default, type)):
        return value
    return merge(to_dict(default), value)


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
        raise ConfigError(f"override '{text}' must look like key=value (e.g. teacher.schedule.epochs=10)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads "1e-3" as a string; on a command line it means a number
    return key, value


def overrides_tree(overrides: Iterable[str]) -> dict:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": 1}, "c": "x"}``."""
    tree: dict = {}
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    return tree


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
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text("utf-8")) or {}
    except yaml.YAMLError as exc:
        line = str(exc).splitlines()[0] if str(exc) else "syntax error"
        raise ConfigError(f"{path}: not valid YAML ({line})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of keys to values")
    return data


# ----------------------------------------------------------------------------------------------
# presets
# ----------------------------------------------------------------------------------------------
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
    if not isinstance(name, str):
        raise ConfigError(f"preset must be a preset name such as cifar10-cpu, got {name!r}")
    files = _preset_files(name, section)
    if not files and name not in available_presets():
        raise ConfigError(f"unknown preset '{name}'{did_you_mean(name, available_presets())}; "
                          f"available: {', '.join(available_presets())}")
    tree: dict = {}
    for f in files:
        doc = _preset_document(f)
        if section and f.parent.name == section:
            doc = {section: doc}
        tree = merge(tree, doc)
    return tree


def _preset_document(path: Any, seen: tuple[str, ...] = ()) -> dict:
    """One preset file; ``extends: <name>`` at its top merges it over the file of that name beside it (so
    ``cifar10-5pct`` states only what differs from ``cifar10-2pct``)."""
    doc = yaml.safe_load(path.read_text("utf-8")) or {}
    base = doc.pop("extends", None)
    if base is None:
        return doc
    parent = path.parent / f"{base}.yaml"
    if base in seen or not parent.is_file():
        raise ConfigError(f"preset {path.name}: extends '{base}', which is "
                          f"{'a loop' if base in seen else 'not a preset beside it'}")
    return merge(_preset_document(parent, (*seen, path.name[:-5])), doc)


# ----------------------------------------------------------------------------------------------
# resolution
# ----------------------------------------------------------------------------------------------
def takes_mapping(cls: type, name: str) -> bool:
    """Whether field ``name`` of ``cls`` holds a mapping (a nested config or a dict)."""
    tp = _unwrap_optional(typing.get_type_hints(cls)[name])
    return dataclasses.is_dataclass(tp) or tp is dict or typing.get_origin(tp) is dict


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
    """Resolve and validate a config: defaults < preset < files < ``docs`` < ``values`` < overrides.

    ``section``: presets and files may hold several stages' settings; if the top level has a mapping
    under ``section`` it is merged over the top-level keys that belong to ``cls``. Top-level keys that
    belong to other stages are ignored in files and presets, but never in ``overrides``.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    tree: dict = {}

    def absorb(doc: Mapping) -> None:
        nonlocal tree
        # A top-level mapping under a scalar field's name is another stage's section (e.g. ``teacher:``
        # in a run document vs the ``teacher`` path of the targets stage): not this config's value.
        own = {k: v for k, v in doc.items()
               if k in names and (not isinstance(v, Mapping) or takes_mapping(cls, k))}
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
            key = key[len(section) + 1:]
        _set_dotted(tree, key, value)
    config = from_dict(cls, tree, prefix=f"{section}." if section else "")
    validate(config, prefix=f"{section}." if section else "")
    return config


def dump_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


# ----------------------------------------------------------------------------------------------
# documentation of the settings (``mkdt <stage> --help``)
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """Each field's comment in the class source: the trailing ``# ...`` of its line, else the comment
    lines right above it. One place for a setting's description: next to the setting."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        comments: dict[int, str] = {}
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = tok.string.lstrip("#").strip()
        lines = source.splitlines()
        for node in ast.parse(source).body[0].body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                line = node.lineno
                text = comments.get(node.end_lineno or line, "")
                if not text:
                    above, k = [], line - 1
                    while k >= 1 and lines[k - 1].strip().startswith("#"):
                        above.insert(0, comments.get(k, ""))
                        k -= 1
                    text = " ".join(above)
                if text:
                    docs[node.target.id] = text
    return docs


def _type_name(tp: Any) -> str:
    tp = _unwrap_optional(tp)
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return f"list[{_type_name(args[0])}]" if args else "list"
    if origin in (typing.Union, types.UnionType):
        return "|".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    return getattr(tp, "__name__", str(tp))


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """``(dotted key, type, default, description)`` of every setting of ``cls``, nested ones expanded."""
    rows = []
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    defaults = to_dict(cls()) if _constructible(cls) else {}
    for f in dataclasses.fields(cls):
        tp = _unwrap_optional(hints[f.name])
        if dataclasses.is_dataclass(tp) and defaults.get(f.name) is not None:
            if docs.get(f.name):
                rows.append((f"{prefix}{f.name}", "section", "", docs[f.name]))
            rows += describe(tp, f"{prefix}{f.name}.")
            continue
        rows.append((f"{prefix}{f.name}", _type_name(hints[f.name]), defaults.get(f.name), docs.get(f.name, "")))
    return rows


def _constructible(cls: type) -> bool:
    try:
        cls()
        return True
    except Exception:  # a config without defaults for every field: describe without them
        return False


@dataclasses.dataclass
class StageConfig:
    """Fields every stage config has: the one seed, the device and the run directory."""

    seed: int = 0  # the one seed that fixes every random choice of the stage
    device: str = "auto"  # auto (CUDA when available, else CPU), cpu, cuda or cuda:N
    out: str = "runs/default"  # the run folder; the stage writes into its own folder inside it

    def check(self) -> None:
        require(isinstance(self.device, str) and (self.device in ("auto", "cpu")
                                                  or re.fullmatch(r"cuda(:\d+)?", self.device)),
                "device", "auto, cpu, cuda or cuda:N", self.device)
        require(str(self.out).strip(), "out", "a folder path", self.out)
        require(not Path(self.out).expanduser().is_file(), "out", "a folder (a file is in the way)", self.out,
                "give a folder for the run")

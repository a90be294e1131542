"""Data sources by name, the data section of a configuration, and :func:`load_dataset`.

Why one entry point: every stage loads its data through ``load_dataset`` with the same
:class:`DataConfig`, so the same config always gives the same pixels, labels and statistics — in
the same order of operations: source split -> cached decode -> resize -> channels -> subset.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, TypeVar

import torch

from mkdt.data.cache import fetch_split
from mkdt.data.imageset import ImageSet
from mkdt.data.sources import BUILTIN_MODULES
from mkdt.data.sources.base import Decoded, Source
from mkdt.errors import MkdtError

T = TypeVar("T")

# The one piece of global state: name -> source instance.
_SOURCES: dict[str, Source] = {}


# ----------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------
def register_source(name: str) -> Callable[[T], T]:
    """Register a :class:`Source` subclass, or a function ``fn(cfg, split) -> Decoded | ImageSet``.

    Functions are not cached and accept any split name; their statistics come from their train split.
    """
    key = _normal_name(name)

    def decorate(obj: T) -> T:
        source = _as_source(obj, key)
        existing = _SOURCES.get(key)
        if existing is not None and _origin(existing) != _origin(source):
            raise ValueError(f"data source '{key}' is already registered by {_origin(existing)}")
        _SOURCES[key] = source
        return obj

    return decorate


def available_sources() -> list[str]:
    _load_builtins()
    return sorted(_SOURCES)


def get_source(name: str) -> Source:
    _load_builtins()
    source = _SOURCES.get(_normal_name(name))
    if source is None:
        raise MkdtError(f"unknown data source '{name}'; available: {', '.join(sorted(_SOURCES))}")
    return source


def _load_builtins() -> None:
    for module in BUILTIN_MODULES:
        importlib.import_module(f"mkdt.data.sources.{module}")


def _normal_name(name: str) -> str:
    return str(name).strip().lower()


def _as_source(obj: Any, key: str) -> Source:
    if isinstance(obj, type) and issubclass(obj, Source):
        source = obj()
    elif callable(obj):
        source = FunctionSource(obj)
    else:
        raise TypeError(f"register_source('{key}') needs a Source subclass or a function, got {type(obj).__name__}")
    source.name = key  # type: ignore[misc]
    return source


def _origin(source: Source) -> str:
    target = source.fn if isinstance(source, FunctionSource) else type(source)
    return f"{target.__module__}.{target.__qualname__}"


class FunctionSource(Source):
    """Adapts a plain ``fn(cfg, split)`` to the :class:`Source` interface (no cache, any split)."""

    splits = ()
    cacheable = False

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn

    def resolve_split(self, split: str) -> str:
        return split

    def locate(self, cfg: "DataConfig") -> None:
        return None

    def decode(self, cfg: "DataConfig", path: Any, split: str) -> Decoded:
        out = self.fn(cfg, split)
        if isinstance(out, ImageSet):
            return Decoded(out.images, out.labels, list(out.class_names))
        if isinstance(out, Decoded):
            return out
        raise TypeError(f"data source '{self.name}' returned {type(out).__name__}; return a Decoded or ImageSet")


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    """Which images to load and how; validated on creation so bad values fail before any decoding."""

    name: str = "digits"
    root: str | None = None
    split: str = "train"
    resolution: int | None = None
    channels: int | None = None  # e.g. 3 turns grayscale into 3 channels
    download: bool = False
    cache_dir: str | None = None
    indices: list[int] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise MkdtError(f"data.name must be a source name, got {self.name!r}; available: "
                            f"{', '.join(available_sources())}")
        self.root = None if self.root is None else str(self.root)
        self.cache_dir = None if self.cache_dir is None else str(self.cache_dir)
        if not isinstance(self.split, str) or not self.split:
            raise MkdtError(f"data.split must be a split name such as 'train', got {self.split!r}")
        self.resolution = _optional_int(self.resolution, "data.resolution", (1, None))
        self.channels = _optional_int(self.channels, "data.channels", (1, 3))
        if self.channels == 2:
            raise MkdtError("data.channels must be 1 or 3, got 2")
        if not isinstance(self.download, bool):
            raise MkdtError(f"data.download must be true or false, got {self.download!r}")
        self.indices = _index_list(self.indices)


def _optional_int(value: Any, field: str, bounds: tuple[int, int | None]) -> int | None:
    if value is None:
        return None
    ok = isinstance(value, int) and not isinstance(value, bool)
    ok = ok or (isinstance(value, float) and math.isfinite(value) and value.is_integer())
    low, high = bounds
    if not ok or int(value) < low or (high is not None and int(value) > high):
        allowed = f"an integer >= {low}" if high is None else f"an integer in {low}..{high}"
        raise MkdtError(f"{field} must be {allowed} or null, got {value!r}")
    return int(value)


def _index_list(value: Any) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise MkdtError(f"data.indices must be a list of integers, got {type(value).__name__}")
    out = []
    for v in value:
        if isinstance(v, bool) or not hasattr(v, "__index__"):
            raise MkdtError(f"data.indices must hold integers, got {v!r}")
        out.append(int(v.__index__()))
    return out


def make_config(config_or_name: DataConfig | str | Mapping[str, Any] | None = None, **overrides: Any) -> DataConfig:
    """A :class:`DataConfig` from a config, a source name or a mapping, with ``overrides`` applied."""
    if config_or_name is None:
        cfg = DataConfig()
    elif isinstance(config_or_name, DataConfig):
        cfg = config_or_name
    elif isinstance(config_or_name, str):
        cfg = DataConfig(name=config_or_name)
    elif isinstance(config_or_name, Mapping):
        _check_fields(config_or_name)
        cfg = DataConfig(**config_or_name)
    else:
        raise MkdtError(f"expected a DataConfig, source name or mapping, got {type(config_or_name).__name__}")
    if overrides:
        _check_fields(overrides)
        cfg = dataclasses.replace(cfg, **overrides)
    return cfg


def _check_fields(values: Mapping[str, Any]) -> None:
    known = [f.name for f in dataclasses.fields(DataConfig)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise MkdtError(f"unknown data setting(s) {', '.join(unknown)}; known: {', '.join(known)}")


# ----------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------
def load_dataset(config_or_name: DataConfig | str | Mapping[str, Any] | None = None, **overrides: Any) -> ImageSet:
    """Load one split as an :class:`ImageSet`: decoded (or cached) -> resized -> channels -> subset."""
    cfg = make_config(config_or_name, **overrides)
    source = get_source(cfg.name)
    split = source.resolve_split(cfg.split)
    if source.needs_resolution and cfg.resolution is None:
        raise MkdtError(f"data source '{source.name}' has images of varying size; set data.resolution "
                        f"(--set data.resolution=32) to resize them on load")
    data = fetch_split(source, cfg, split)
    images = ImageSet(images=data.images, labels=data.labels, class_names=list(data.class_names),
                      mean=data.mean, std=data.std, name=f"{source.name}:{split}")
    if cfg.resolution is not None:
        images = images.resized(cfg.resolution)
    if cfg.channels is not None:
        images = images.with_channels(cfg.channels)
    if cfg.indices is not None:
        images = images.subset(cfg.indices)
    return images

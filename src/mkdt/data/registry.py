"""Data sources by name, the data section of a configuration, and :func:`load_dataset`.

Why one entry point: every stage loads its data through ``load_dataset`` with the same
:class:`DataConfig`, so the same config always gives the same pixels, labels and statistics — in
the same order of operations: source split -> cached decode -> resize -> channels -> subset.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping, TypeVar

import torch

from mkdt.data.cache import fetch_split
from mkdt.data.imageset import ImageSet
from mkdt.data.sources import BUILTIN_MODULES
from mkdt.data.sources.base import Decoded, Source
from mkdt.config import require, validate
from mkdt.errors import ConfigError, MkdtError

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
        # plain types for paths and index lists given as Path objects or tensors (no value is changed)
        self.root = None if self.root is None else str(self.root)
        self.cache_dir = None if self.cache_dir is None else str(self.cache_dir)
        if isinstance(self.indices, torch.Tensor):
            self.indices = self.indices.tolist()
        for name in ("resolution", "channels"):
            value = getattr(self, name)
            if isinstance(value, float) and value.is_integer():
                setattr(self, name, int(value))

    def check(self) -> None:
        require(isinstance(self.name, str) and _normal_name(self.name) in available_sources(), "name",
                "a data source name", self.name, f"available: {', '.join(available_sources())}")
        require(isinstance(self.split, str) and self.split, "split", "a split name such as 'train'", self.split)
        require(_int_or_none(self.resolution, 1), "resolution", "an integer >= 1 or null", self.resolution)
        require(_int_or_none(self.channels, 1, 3) and self.channels != 2, "channels", "1, 3 or null", self.channels)
        require(isinstance(self.download, bool), "download", "true or false", self.download)
        require(self.indices is None or (isinstance(self.indices, list) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in self.indices)), "indices",
            "a list of integers or null", self.indices)


def _int_or_none(value: Any, low: int, high: int | None = None) -> bool:
    if value is None:
        return True
    return (isinstance(value, int) and not isinstance(value, bool) and value >= low
            and (high is None or value <= high))


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
    validate(cfg, "data.")
    return cfg


def _check_fields(values: Mapping[str, Any]) -> None:
    known = [f.name for f in dataclasses.fields(DataConfig)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown data setting(s) {', '.join(unknown)}; known: {', '.join(known)}")


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

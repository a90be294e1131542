"""Decode once: decoded splits are kept as ``.npy`` files and memory-mapped on later loads.

Why: decoding 60,000 JPEGs takes seconds and every stage (teacher, experts, distillation, evaluation)
loads the same data. A cache entry is three files in the cache folder:

* ``<slot>.npy``         uint8 N x C x H x W images (memory-mapped copy-on-write when read, so the
                         file can never be changed through a tensor),
* ``<slot>.labels.npy``  int64 labels (absent for unlabelled sets),
* ``<slot>.json``        the key, shapes, byte sizes, class names and the train split's mean/std;
                         written last, so its presence means the entry is complete.

The slot name comes from source, split, absolute root and (when it matters) resolution; the key stored
in the sidecar adds the source files' sizes and modification times plus a format version. Any mismatch,
a size that is off or an unreadable file makes the entry stale: it is rebuilt, never trusted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mkdt.artifacts import atomic_path, save_json
from mkdt.data.imageset import channel_stats
from mkdt.data.sources.base import Decoded, Source, SplitNotFound, Stats

if TYPE_CHECKING:
    from mkdt.data.registry import DataConfig

FORMAT_VERSION = 1  # bump when any source's decoded pixels change: old entries then count as stale
ENV_CACHE_DIR = "MKDT_CACHE_DIR"
log = logging.getLogger(__name__)


@dataclass
class SplitData:
    """A decoded split with the normalisation statistics of its source's train split."""

    images: torch.Tensor
    labels: torch.Tensor | None
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    from_cache: bool = False


def cache_dir(configured: str | os.PathLike | None = None) -> Path:
    """``configured``, else ``$MKDT_CACHE_DIR``, else ``~/.cache/mkdt/data``."""
    if configured:
        return Path(configured).expanduser()
    env = os.environ.get(ENV_CACHE_DIR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "mkdt" / "data"


# ----------------------------------------------------------------------------------------------
# entries
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CacheKey:
    source: str
    root: str | None
    split: str
    resolution: int | None
    signature: Any

    def slot(self) -> str:
        where = hashlib.sha256(json.dumps([self.root, self.resolution]).encode()).hexdigest()[:12]
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{self.source}-{self.split}")
        return f"{safe}-{where}"

    def as_json(self) -> Any:
        """The key as it reads back from JSON (so stored and current keys compare equal)."""
        return json.loads(json.dumps({"version": FORMAT_VERSION, **self.__dict__}, sort_keys=True))


class CacheEntry:
    """The files of one cached split; :meth:`read` returns None for anything not fully trustworthy."""

    def __init__(self, folder: Path, key: CacheKey):
        self.key = key
        slot = key.slot()
        self.images_path = folder / f"{slot}.npy"
        self.labels_path = folder / f"{slot}.labels.npy"
        self.meta_path = folder / f"{slot}.json"

    def read(self) -> SplitData | None:
        if not self.meta_path.is_file():
            return None
        try:
            return self._read()
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
            log.info("data cache %s is stale or corrupt (%s); rebuilding", self.meta_path, exc)
            return None

    def _read(self) -> SplitData | None:
        meta = json.loads(self.meta_path.read_text("utf-8"))
        if meta.get("key") != self.key.as_json():
            log.info("data cache %s was made from other files; rebuilding", self.meta_path)
            return None
        _check_size(self.images_path, meta["images_bytes"])
        images = np.load(self.images_path, mmap_mode="c", allow_pickle=False)
        if images.dtype != np.uint8 or list(images.shape) != meta["shape"] or images.ndim != 4:
            raise ValueError(f"images are {images.dtype} {images.shape}, sidecar says uint8 {meta['shape']}")
        labels = None
        if meta["labels_bytes"] is not None:
            _check_size(self.labels_path, meta["labels_bytes"])
            arr = np.load(self.labels_path, allow_pickle=False)
            if arr.dtype != np.int64 or arr.shape != (images.shape[0],):
                raise ValueError(f"labels are {arr.dtype} {arr.shape} for {images.shape[0]} images")
            labels = torch.from_numpy(arr)
        mean, std = tuple(meta["mean"]), tuple(meta["std"])
        return SplitData(torch.from_numpy(images), labels, list(meta["class_names"]), mean, std, from_cache=True)

    def write(self, decoded: Decoded, stats: Stats) -> None:
        """Data files first, sidecar last (removed first), each written atomically."""
        with contextlib.suppress(FileNotFoundError):
            self.meta_path.unlink()
        images = decoded.images.contiguous().numpy()
        _save_npy(self.images_path, images)
        labels_bytes = None
        if decoded.labels is not None:
            _save_npy(self.labels_path, decoded.labels.to(torch.int64).contiguous().numpy())
            labels_bytes = self.labels_path.stat().st_size
        save_json(self.meta_path, {
            "key": self.key.as_json(),
            "shape": list(images.shape),
            "images_bytes": self.images_path.stat().st_size,
            "labels_bytes": labels_bytes,
            "class_names": list(decoded.class_names),
            "mean": list(stats[0]),
            "std": list(stats[1]),
        })


def _save_npy(path: Path, array: np.ndarray) -> None:
    # np.save on a file object: given a name it would append ".npy" to the temporary file's name.
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array, allow_pickle=False)


def _check_size(path: Path, expected: int) -> None:
    size = path.stat().st_size
    if size != expected:
        raise ValueError(f"{path} has {size} bytes, sidecar says {expected}")


# ----------------------------------------------------------------------------------------------
# fetching
# ----------------------------------------------------------------------------------------------
def fetch_split(source: Source, cfg: "DataConfig", split: str) -> SplitData:
    """``split`` of ``source`` from the cache, or decoded (and cached with its statistics)."""
    path = source.locate(cfg)
    folder = cache_dir(cfg.cache_dir) if source.cacheable else None
    signature = source.signature(path) if folder is not None else None

    def entry(name: str) -> CacheEntry | None:
        if folder is None:
            return None
        res = cfg.resolution if source.resolution_in_key else None
        return CacheEntry(folder, CacheKey(source.name, None if path is None else str(path), name, res, signature))

    wanted = entry(split)
    hit = wanted.read() if wanted is not None else None
    if hit is not None:
        return hit
    # worth a line only when there is something to decode from (an embedded set takes no time)
    (log.info if path is not None else log.debug)("decoding %s:%s from %s (once; cached afterwards)",
                                                  source.name, split, path)
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its image codecs (for TorchCodec) with one warning per image.
        warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                                category=DeprecationWarning)
        decoded = source.decode_many(cfg, path, split)
    if split not in decoded:
        raise RuntimeError(f"data source '{source.name}' did not return split '{split}' (got {sorted(decoded)})")
    stats = _train_stats(source, cfg, split, decoded)
    for name in sorted(decoded, key=lambda s: s != "train"):
        _write_quietly(entry(name), decoded[name], stats)
    d = decoded[split]
    return SplitData(d.images, d.labels, list(d.class_names), tuple(stats[0]), tuple(stats[1]))


def _train_stats(source: Source, cfg: "DataConfig", split: str, decoded: dict[str, Decoded]) -> Stats:
    """Known constants, else mean/std of the train split (decoded now or fetched through the cache)."""
    if source.stats is not None:
        return source.stats
    if "train" in decoded:
        return channel_stats(decoded["train"].images)
    try:
        train = fetch_split(source, cfg, source.resolve_split("train"))
    except SplitNotFound:
        # A set without a train split (e.g. an image folder of evaluation data only): its own statistics.
        return channel_stats(decoded[split].images)
    return train.mean, train.std


def _write_quietly(entry: CacheEntry | None, decoded: Decoded, stats: Stats) -> None:
    """Write an entry; an unwritable cache costs speed, not the run, so it only warns."""
    if entry is None:
        return
    try:
        entry.write(decoded, stats)
    except OSError as exc:
        warnings.warn(f"cannot write the data cache {entry.images_path} ({exc}); set MKDT_CACHE_DIR or "
                      f"data.cache_dir to a writable folder to avoid decoding again", stacklevel=3)

"""Helpers the baseline stages share: input paths, subset sizes, source data + targets, JSON-lines logs.

Why: the subset, KRR-ST and variance stages all start from the same pair (the source images and the
teacher's targets for exactly those images) and must refuse the same mistakes the same way.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from mkdt.data import DataConfig, load_dataset
from mkdt.data.imageset import ImageSet
from mkdt.errors import MkdtError
from mkdt.formats import Targets, load_targets


def input_path(value: str | None, out: str, *parts: str) -> Path:
    """A configured input path, or the conventional one under the run directory when ``None``."""
    return Path(value) if value else Path(out, *parts)


def resolve_size(size: float, total: int, what: str = "size") -> int:
    """``size`` < 1 is a fraction of ``total`` (rounded, at least 1); otherwise an exact count."""
    if not size > 0 or not math.isfinite(size):
        raise MkdtError(f"{what} must be a positive fraction (<1) or count, got {size}")
    if size < 1:
        return max(1, int(round(size * total)))
    if size != int(size):
        raise MkdtError(f"{what}={size} is neither a fraction below 1 nor a whole number of images")
    if int(size) > total:
        raise MkdtError(f"{what}={int(size)} is larger than the data set ({total} images)")
    return int(size)


def load_source(data: DataConfig, targets_path: Path) -> tuple[ImageSet, Targets]:
    """The source images and the teacher targets computed for exactly these images."""
    images = load_dataset(data)
    if not targets_path.is_file():
        raise MkdtError(f"{targets_path}: teacher targets not found; run `mkdt targets` first or set targets=FILE")
    targets = load_targets(targets_path, fingerprint=images.fingerprint())
    if len(targets.values) != len(images):
        raise MkdtError(f"{targets_path}: {len(targets.values)} targets for {len(images)} images; "
                        f"recompute the targets on this data")
    return images, targets


def random_indices(total: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` distinct indices out of ``total``, sorted (int64)."""
    return torch.sort(torch.randperm(total, generator=generator)[:count]).values


class JsonLog:
    """Append-only JSON-lines log (one object per line, flushed); truncated when a run starts afresh."""

    def __init__(self, path: str | os.PathLike, *, fresh: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fresh and self.path.exists():
            self.path.unlink()

    def write(self, **record: Any) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, default=float) + "\n")
            fh.flush()

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        rows = []
        for line in self.path.read_text("utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill; the rest is still useful
                continue
        return rows

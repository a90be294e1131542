"""Helpers shared by the expert and initialisation stages: source data + targets, logs, threads.

Why here: both stages start from the same pair (the source images and the teacher targets computed
for exactly those pixels) and must refuse the same mistakes with the same one-line messages.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from mkdt.data import DataConfig, load_dataset
from mkdt.data.imageset import ImageSet
from mkdt.errors import MkdtError
from mkdt.formats import Targets, load_targets


def input_path(value: str | None, out: str, *parts: str) -> Path:
    """A configured input path, or the conventional one under the run directory when ``None``."""
    return Path(value) if value else Path(out, *parts)


def load_source(data_cfg: DataConfig, targets_path: Path) -> tuple[ImageSet, Targets, str]:
    """Images, their targets and the data fingerprint; refuses targets computed for other pixels."""
    data = load_dataset(data_cfg)
    if not targets_path.is_file():
        raise MkdtError(f"{targets_path}: teacher targets not found; run `mkdt targets` first or set targets=FILE")
    fingerprint = data.fingerprint()
    targets = load_targets(targets_path, fingerprint=fingerprint)
    if len(targets.values) != len(data):
        raise MkdtError(f"{targets_path}: {len(targets.values)} targets for {len(data)} images; "
                        f"recompute the targets on this data (`mkdt targets`)")
    for key, ours in (("mean", data.mean), ("std", data.std)):
        stored = targets.meta.get(key)
        if stored is not None and not same_numbers(stored, ours):
            raise MkdtError(f"{targets_path}: targets were computed with {key} {list(stored)} but the data uses "
                            f"{list(ours)}; recompute the targets with the same data settings")
    return data, targets, fingerprint


def same_numbers(a: Sequence[float], b: Sequence[float], tol: float = 1e-6) -> bool:
    a, b = list(a), list(b)
    return len(a) == len(b) and all(abs(float(x) - float(y)) <= tol * max(1.0, abs(float(y))) for x, y in zip(a, b))


def tensor_digest(t: torch.Tensor) -> str:
    """A short sha256 of a tensor's bytes (identifies e.g. the exact targets experts were trained on)."""
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def resolve_size(size: float, total: int, what: str = "size") -> int:
    """``size`` < 1 is a fraction of ``total`` (rounded, at least 1); otherwise an exact count."""
    if not isinstance(size, (int, float)) or not math.isfinite(size) or not size > 0:
        raise MkdtError(f"{what} must be a positive fraction (< 1) or a count (>= 1), got {size!r}")
    if size < 1:
        return max(1, int(round(size * total)))
    if size != int(size):
        raise MkdtError(f"{what}={size} is neither a fraction below 1 nor a whole number of images")
    if int(size) > total:
        raise MkdtError(f"{what}={int(size)} is larger than the data set ({total} images); use a smaller size")
    return int(size)


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run with ``threads`` intra-op threads (0 = leave torch's setting), restoring it afterwards."""
    if threads < 0:
        raise MkdtError(f"threads must be >= 0 (0 = torch default), got {threads}")
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class JsonLog:
    """Append-only JSON-lines log in a stage folder (one flushed object per line)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record: Any) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, default=float) + "\n")
            fh.flush()

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        rows = []
        for line in self.path.read_text("utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a line cut by a kill
                rows.append(json.loads(line))
        return rows

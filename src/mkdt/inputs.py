"""Loading what most stages start from: the source images and the teacher targets computed for exactly
those pixels, plus the small helpers every stage that picks images uses.

One loader, so experts, the initial set, subsets, KRR-ST and the variance analysis refuse the same
mistakes (targets of other data, another count, another normalisation) with the same one-line messages.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Sequence

import torch

from mkdt.data import DataConfig, load_dataset
from mkdt.data.imageset import ImageSet
from mkdt.errors import MkdtError
from mkdt.formats import Targets, load_targets


def load_source(data_cfg: DataConfig, targets_path: Path) -> tuple[ImageSet, Targets]:
    """Images and their targets; refuses targets computed for other pixels, count or normalisation."""
    data = load_dataset(data_cfg)
    if not Path(targets_path).is_file():
        raise MkdtError(f"{targets_path}: teacher targets not found; run `mkdt targets` first or set targets=FILE")
    targets = load_targets(targets_path, fingerprint=data.fingerprint())
    if len(targets.values) != len(data):
        raise MkdtError(f"{targets_path}: {len(targets.values)} targets for {len(data)} images; "
                        f"recompute the targets on this data (`mkdt targets`)")
    for key, ours in (("mean", data.mean), ("std", data.std)):
        stored = targets.meta.get(key)
        if stored is not None and not same_numbers(stored, ours):
            raise MkdtError(f"{targets_path}: targets were computed with {key} {list(stored)} but the data uses "
                            f"{list(ours)}; recompute the targets with the same data settings")
    return data, targets


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


def random_indices(total: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` distinct indices out of ``total``, sorted (int64)."""
    return torch.sort(torch.randperm(total, generator=generator)[:count]).values

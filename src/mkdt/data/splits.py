"""Which train images count as labelled in the few-label evaluation (1%, 5%, ... of the labels).

Why a saved file: the labelled subset must be the same for every method compared, so it is drawn
once from a seeded generator and written as JSON together with the fingerprint of the data it indexes.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import torch

from mkdt.artifacts import load_json, save_json
from mkdt.errors import MkdtError

MODES = ("stratified", "uniform")


def labelled_split(
    labels: torch.Tensor | Sequence[int],
    percent: float,
    seed: int = 0,
    mode: str = "stratified",
) -> torch.Tensor:
    """Sorted indices of the labelled subset of a train split.

    ``stratified``: round(percent% of each class), at least one per class (every class is seen).
    ``uniform``: round(percent% of all images) drawn uniformly, at least one (the paper's protocol).
    Rounding is half-up; the same ``seed`` always gives the same indices.
    """
    _check_percent(percent)
    if mode not in MODES:
        raise MkdtError(f"labelled split mode must be one of {', '.join(MODES)}, got {mode!r}")
    y = torch.as_tensor(labels, dtype=torch.int64).flatten()
    if y.numel() == 0:
        raise MkdtError("cannot draw a labelled split from an empty set of labels")
    gen = torch.Generator().manual_seed(int(seed))
    if mode == "uniform":
        chosen = torch.randperm(y.numel(), generator=gen)[: _count(y.numel(), percent)]
    else:
        chosen = torch.cat([_draw_class(y, c, percent, gen) for c in torch.unique(y).tolist()])
    return torch.sort(chosen).values


def _check_percent(percent: Any) -> None:
    ok = isinstance(percent, (int, float)) and not isinstance(percent, bool) and math.isfinite(percent)
    if not ok or not 0 < percent <= 100:
        raise MkdtError(f"labelled percent must be in (0, 100], got {percent!r}")


def holdout_split(labels: torch.Tensor | Sequence[int], fraction: float, seed: int) -> torch.Tensor:
    """Sorted indices of a held-out validation part of a train split (a tuning set that is not the test set).

    Stratified when every class has at least 2 images (half-up ``fraction`` of each class, at least one
    held out and one kept per class), otherwise ``fraction`` of all images drawn uniformly. Depends only on
    the labels, ``fraction`` and ``seed``.
    """
    ok = isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and math.isfinite(fraction)
    if not ok or not 0 < fraction < 1:
        raise MkdtError(f"validation fraction must be in (0, 1), got {fraction!r}")
    y = torch.as_tensor(labels, dtype=torch.int64).flatten()
    if y.numel() < 2:
        raise MkdtError(f"a validation split needs at least 2 labelled images, got {y.numel()}")
    gen = torch.Generator().manual_seed(int(seed))

    def share(n: int) -> int:
        return max(1, min(n - 1, math.floor(n * fraction + 0.5)))

    classes, counts = torch.unique(y, return_counts=True)
    if bool((counts >= 2).all()):
        parts = []
        for cls in classes.tolist():
            members = torch.nonzero(y == cls).flatten()
            parts.append(members[torch.randperm(members.numel(), generator=gen)[: share(members.numel())]])
        chosen = torch.cat(parts)
    else:
        chosen = torch.randperm(y.numel(), generator=gen)[: share(y.numel())]
    return torch.sort(chosen).values


def _count(n: int, percent: float) -> int:
    return max(1, min(n, math.floor(n * percent / 100.0 + 0.5)))


def _draw_class(labels: torch.Tensor, cls: int, percent: float, gen: torch.Generator) -> torch.Tensor:
    members = torch.nonzero(labels == cls).flatten()
    order = torch.randperm(members.numel(), generator=gen)
    return members[order[: _count(members.numel(), percent)]]


def save_split(path: str | os.PathLike, indices: torch.Tensor | Sequence[int], meta: Mapping[str, Any] | None = None
               ) -> None:
    """Write ``{"indices": [...], **meta}`` atomically (meta: percent, seed, mode, fingerprint, ...)."""
    meta = dict(meta or {})
    if "indices" in meta:
        raise ValueError("meta must not contain 'indices'")
    idx = torch.as_tensor(indices, dtype=torch.int64).flatten().tolist()
    save_json(path, {"indices": idx, **meta})


def load_split(path: str | os.PathLike, fingerprint: str | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Indices (LongTensor) and the rest of the record; with ``fingerprint``, refuse other data's split."""
    record = load_json(path)
    idx = record.get("indices") if isinstance(record, dict) else None
    if not isinstance(idx, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in idx):
        raise MkdtError(f"{path}: not a labelled split (needs 'indices': a list of non-negative integers); "
                        f"delete it and draw the split again")
    if len(set(idx)) != len(idx):
        raise MkdtError(f"{path}: indices repeat; delete it and draw the split again")
    meta = {k: v for k, v in record.items() if k != "indices"}
    stored = meta.get("fingerprint")
    if fingerprint is not None and stored is not None and stored != fingerprint:
        raise MkdtError(f"{path}: drawn for data with fingerprint {stored}, but this data has {fingerprint}; "
                        f"draw the split again for this data")
    return torch.tensor(idx, dtype=torch.int64), meta

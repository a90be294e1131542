"""The artifact formats that pass between stages: teacher targets, expert trajectories, synthetic sets.

Why here and not in the stages: a stage reads another stage's output only through these loaders, so
stages never import each other, and every check (fingerprint, shapes, NaN, zero displacement,
architecture) lives in one place with messages that name the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from mkdt.artifacts import TensorSpec, load_tensors, read_metadata, save_tensors
from mkdt.errors import MkdtError
from mkdt.models.functional import ParamLayout

PathLike = str | os.PathLike


# ----------------------------------------------------------------------------------------------
# teacher targets
# ----------------------------------------------------------------------------------------------
@dataclass
class Targets:
    """Teacher representations (N x D) of one exact data set, identified by its fingerprint."""

    values: torch.Tensor
    fingerprint: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.values.shape[1])


def save_targets(path: PathLike, values: torch.Tensor, fingerprint: str, **meta: Any) -> None:
    if values.dim() != 2:
        raise MkdtError(f"{path}: targets must be N x D, got shape {tuple(values.shape)}")
    save_tensors(path, {"targets": values.float()}, {"fingerprint": fingerprint, **meta})


def load_targets(path: PathLike, *, fingerprint: str | None = None, count: int | None = None) -> Targets:
    """Load targets; with ``fingerprint`` given, refuse targets computed for other data."""
    tensors = load_tensors(path, {"targets": TensorSpec(shape=(count, None), dtype=torch.float32)})
    meta = read_metadata(path)
    stored = meta.get("fingerprint")
    if fingerprint is not None and stored != fingerprint:
        raise MkdtError(
            f"{path}: targets were computed for data {meta.get('data_name', '?')} (fingerprint {stored}), "
            f"not for the data given (fingerprint {fingerprint}); run `mkdt targets` on this data"
        )
    return Targets(tensors["targets"], str(stored), meta)


# ----------------------------------------------------------------------------------------------
# expert trajectories
# ----------------------------------------------------------------------------------------------
@dataclass
class Trajectory:
    """Flat student parameters at stored epochs (``params[i]`` is the state after ``epochs[i]`` epochs)."""

    params: torch.Tensor
    epochs: list[int]
    layout: ParamLayout
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def at(self, epoch: int) -> torch.Tensor:
        if epoch not in self.epochs:
            raise MkdtError(f"{self.path}: epoch {epoch} not stored (stored: {self.epochs}); "
                            f"train experts with more keep_epochs")
        return self.params[self.epochs.index(epoch)]


def save_trajectory(path: PathLike, params: torch.Tensor, epochs: Sequence[int], layout: ParamLayout,
                    **meta: Any) -> None:
    if params.dim() != 2 or params.shape[0] != len(epochs) or params.shape[1] != layout.numel:
        raise MkdtError(f"{path}: trajectory must be {len(epochs)} x {layout.numel}, got {tuple(params.shape)}")
    save_tensors(path, {"params": params.float()}, {"epochs": list(epochs), "layout": layout.to_json(), **meta})


def load_trajectory(path: PathLike, *, layout: ParamLayout | None = None) -> Trajectory:
    """Load and check a trajectory: finite, the expected architecture, and moving between epochs.

    The zero-displacement check catches the authors' defect of snapshots saved as views (every epoch
    equal to the final weights), which makes the matching loss divide by zero.
    """
    path = Path(path)
    meta = read_metadata(path)
    if "layout" not in meta or "epochs" not in meta:
        raise MkdtError(f"{path}: not an mkdt trajectory (no layout/epochs metadata); re-run `mkdt experts`")
    stored_layout = ParamLayout.from_json(meta["layout"])
    epochs = [int(e) for e in meta["epochs"]]
    tensors = load_tensors(path, {"params": TensorSpec(shape=(len(epochs), stored_layout.numel),
                                                       dtype=torch.float32)})
    if layout is not None and stored_layout != layout:
        raise MkdtError(f"{path}: expert architecture does not match the configured student "
                        f"({stored_layout.describe_mismatch(layout)}); use the same student model config")
    params = tensors["params"]
    for i in range(1, len(epochs)):
        if torch.equal(params[i], params[i - 1]):
            raise MkdtError(f"{path}: parameters identical at epochs {epochs[i - 1]} and {epochs[i]} "
                            f"(no displacement); the expert is broken, retrain it")
    return Trajectory(params, epochs, stored_layout, meta, path)


# ----------------------------------------------------------------------------------------------
# synthetic sets (distilled sets and real subsets in the same form)
# ----------------------------------------------------------------------------------------------
@dataclass
class SyntheticSet:
    """Normalised float images, their regression targets, an optional learned lr, and provenance."""

    images: torch.Tensor
    targets: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    lr: float | None = None
    indices: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.images.shape[0])


def save_synthetic(path: PathLike, synthetic: SyntheticSet) -> None:
    if synthetic.images.dim() != 4 or synthetic.targets.dim() != 2 or len(synthetic.images) != len(synthetic.targets):
        raise MkdtError(f"{path}: synthetic set needs N x C x H x W images and N x D targets, got "
                        f"{tuple(synthetic.images.shape)} and {tuple(synthetic.targets.shape)}")
    tensors = {"images": synthetic.images.float(), "targets": synthetic.targets.float()}
    if synthetic.lr is not None:
        tensors["lr"] = torch.tensor([float(synthetic.lr)])
    if synthetic.indices is not None:
        tensors["indices"] = torch.as_tensor(synthetic.indices, dtype=torch.int64)
    save_tensors(path, tensors, {"mean": list(synthetic.mean), "std": list(synthetic.std), **synthetic.meta})


def load_synthetic(path: PathLike) -> SyntheticSet:
    tensors = load_tensors(path, {"images": TensorSpec(shape=(None, None, None, None), dtype=torch.float32),
                                  "targets": TensorSpec(shape=(None, None), dtype=torch.float32)})
    if len(tensors["images"]) != len(tensors["targets"]):
        raise MkdtError(f"{path}: {len(tensors['images'])} images but {len(tensors['targets'])} targets")
    meta = read_metadata(path)
    if "mean" not in meta or "std" not in meta:
        raise MkdtError(f"{path}: no normalisation (mean/std) recorded; not an mkdt synthetic set")
    lr = float(tensors["lr"][0]) if "lr" in tensors else None
    if lr is not None and not lr > 0:
        raise MkdtError(f"{path}: learned lr is {lr}, must be positive")
    extra = {k: v for k, v in meta.items() if k not in ("mean", "std")}
    return SyntheticSet(tensors["images"], tensors["targets"], tuple(meta["mean"]), tuple(meta["std"]), lr,
                        tensors.get("indices"), extra)

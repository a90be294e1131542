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
DECODE_KEY = "decode_resolution"


@dataclass
class SyntheticSet:
    """Normalised float images, their regression targets, an optional learned lr, and provenance.

    A set may store its images at a lower resolution than its models see (``meta["decode_resolution"]``,
    e.g. 16 x 16 images of a 32 x 32 source: four images in the pixels of one); loading decodes them
    with :func:`decode_images`, so every reader sees full-size images.
    """

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
    images = tensors["images"]
    if extra.get(DECODE_KEY) is not None:
        size = extra[DECODE_KEY]
        if not isinstance(size, int) or isinstance(size, bool) or size < images.shape[-1]:
            raise MkdtError(f"{path}: {DECODE_KEY} must be an image size >= the stored {images.shape[-1]}, got {size!r}")
        images = decode_images(images, size)
    return SyntheticSet(images, tensors["targets"], tuple(meta["mean"]), tuple(meta["std"]), lr,
                        tensors.get("indices"), extra)


def decode_images(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """Low-resolution images at ``resolution`` x ``resolution``: bilinear, half-pixel centres (a no-op at full size)."""
    if images.shape[-2:] == (resolution, resolution):
        return images
    return torch.nn.functional.interpolate(images, size=(resolution, resolution), mode="bilinear",
                                           align_corners=False)


# ----------------------------------------------------------------------------------------------
# the images.pt / labels.pt / lr.pt layout (DD-Ranking's; what `mkdt export` writes)
# ----------------------------------------------------------------------------------------------
PT_MANIFEST = "manifest.json"


def is_pt_set(path: PathLike) -> bool:
    """A folder or an ``images.pt`` (the .pt layout) rather than an mkdt safetensors set."""
    path = Path(path)
    return path.is_dir() or path.suffix == ".pt"


def load_set(path: PathLike, *, mean: Sequence[float] | None = None,
             std: Sequence[float] | None = None) -> SyntheticSet:
    """A synthetic set from an mkdt ``.safetensors`` file or a ``.pt`` set (see :func:`load_pt_set`)."""
    if is_pt_set(path):
        return load_pt_set(path, mean=mean, std=std)
    if mean is not None or std is not None:
        raise MkdtError(f"{path}: an mkdt set records its own normalisation; unset mean/std (they are for .pt sets)")
    return load_synthetic(path)


def _load_pt_tensor(path: Path) -> torch.Tensor:
    """One tensor saved with ``torch.save``, read with ``weights_only=True`` only (never arbitrary pickles)."""
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError, EOFError, ...: all mean "not a plain tensor file"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise MkdtError(f"{path}: cannot be read with torch.load(weights_only=True) ({first}); save a plain tensor "
                        f"with torch.save(tensor, path)") from None
    if not isinstance(value, torch.Tensor):
        raise MkdtError(f"{path}: holds a {type(value).__name__}, not a tensor; save a plain tensor with "
                        f"torch.save(tensor, path)")
    return value


def load_pt_set(path: PathLike, *, mean: Sequence[float] | None = None,
                std: Sequence[float] | None = None) -> SyntheticSet:
    """A set in the ``images.pt`` / ``labels.pt`` / ``lr.pt`` layout: ``path`` is the folder or its ``images.pt``.

    ``images.pt``: normalised float images N x C x H x W; ``labels.pt``: N x D float regression targets
    (teacher representations, not class labels); ``lr.pt`` (optional): the learned lr, 0-d or one element.
    The normalisation comes from ``manifest.json`` beside them (written by ``mkdt export``) or from
    ``mean``/``std``; with both they must agree. Every mismatch is a one-line error naming the file.
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    images_path, labels_path, lr_path = folder / "images.pt", folder / "labels.pt", folder / "lr.pt"
    for needed in (images_path, labels_path):
        if not needed.is_file():
            raise MkdtError(f"{needed}: not found; a .pt set is a folder holding images.pt (N x C x H x W normalised "
                            f"floats), labels.pt (N x D targets) and optionally lr.pt")
    images = _load_pt_tensor(images_path)
    if images.dtype == torch.uint8:
        raise MkdtError(f"{images_path}: holds uint8 pixels; a .pt set holds normalised float images "
                        f"((pixel / 255 - mean) / std), e.g. as written by `mkdt export`")
    if images.dim() != 4 or not images.is_floating_point():
        raise MkdtError(f"{images_path}: must be float images N x C x H x W, got {images.dtype} of shape "
                        f"{tuple(images.shape)}")
    n, c, h, w = images.shape
    manifest: dict[str, Any] = {}
    manifest_path = folder / PT_MANIFEST
    if manifest_path.is_file():
        from mkdt.artifacts import load_json

        manifest = load_json(manifest_path)
        if not isinstance(manifest, dict) or "normalisation" not in manifest:
            raise MkdtError(f"{manifest_path}: not an mkdt export manifest (no normalisation); remove it and give "
                            f"mean/std instead")
        shape = manifest.get("image_shape")
        if (shape is not None and [int(v) for v in shape] != [c, h, w]) or manifest.get("count", n) != n:
            recorded = " x ".join(str(v) for v in [manifest.get("count"), *(shape or [])])
            raise MkdtError(f"{images_path}: images are {n} x {c} x {h} x {w} but {manifest_path.name} records "
                            f"{recorded}; export the set again")
    labels = _load_pt_tensor(labels_path)
    if labels.dim() == 1 or not labels.is_floating_point():
        raise MkdtError(f"{labels_path}: holds class labels {tuple(labels.shape)} ({labels.dtype}), not N x D float "
                        f"regression targets; mkdt pre-trains an encoder to regress targets such as teacher "
                        f"representations (export mkdt sets with `mkdt export`)")
    if labels.dim() != 2 or labels.shape[0] != n:
        raise MkdtError(f"{labels_path}: must be {n} x D targets for the {n} images of images.pt, got shape "
                        f"{tuple(labels.shape)}")
    for name, tensor in ((images_path, images), (labels_path, labels)):
        if not torch.isfinite(tensor).all():
            raise MkdtError(f"{name}: holds NaN or infinite values; the set is broken, export it again")
    recorded = manifest.get("normalisation", {})
    mean, std = _pt_normalisation(folder, recorded.get("mean"), recorded.get("std"), mean, std, c)
    if float(images.min()) >= 0 and any(m > 0 for m in mean):
        raise MkdtError(f"{images_path}: no negative value, so the images look like pixels in [0, 1] or [0, 255], not "
                        f"normalised with mean {list(mean)}; save (pixel - mean) / std")
    lr = None
    if lr_path.is_file():
        value = _load_pt_tensor(lr_path)
        if value.numel() != 1 or not value.is_floating_point() or not float(value.reshape(())) > 0:
            raise MkdtError(f"{lr_path}: must hold one positive learning rate, got {value.dtype} of shape "
                            f"{tuple(value.shape)}")
        lr = float(value.reshape(()))
    source = manifest.get("source") or {}
    meta = {k: source[k] for k in ("data_name", "fingerprint", "method", "iterations") if source.get(k) is not None}
    meta.setdefault("data_name", folder.name)
    return SyntheticSet(images.float().contiguous(), labels.float().contiguous(), mean, std, lr, None, meta)


def _pt_normalisation(folder: Path, rec_mean: Any, rec_std: Any, mean: Sequence[float] | None,
                      std: Sequence[float] | None, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if (mean is None) != (std is None):
        raise MkdtError(f"{folder}: give both mean and std of the .pt set's normalisation, or neither")
    if mean is None and rec_mean is None:
        raise MkdtError(f"{folder}: no normalisation: no {PT_MANIFEST} beside images.pt; set mean=[...] and std=[...] "
                        f"to the per-channel values its images were normalised with")
    if mean is not None and rec_mean is not None:
        same = len(mean) == len(rec_mean) and all(abs(float(a) - float(b)) <= 1e-6 for a, b in
                                                  zip([*mean, *std], [*rec_mean, *rec_std]))
        if not same:
            raise MkdtError(f"{folder}: normalisation mismatch: {PT_MANIFEST} records mean {list(rec_mean)} std "
                            f"{list(rec_std)}, the config gives mean {list(mean)} std {list(std)}; unset mean/std")
    m = tuple(float(v) for v in (mean if mean is not None else rec_mean))
    s = tuple(float(v) for v in (std if std is not None else rec_std))
    if len(m) != channels or len(s) != channels:
        raise MkdtError(f"{folder}: normalisation has {len(m)} mean / {len(s)} std values for {channels}-channel "
                        f"images; give one per channel")
    if not all(v > 0 for v in s):
        raise MkdtError(f"{folder}: std {list(s)} must be positive")
    return m, s

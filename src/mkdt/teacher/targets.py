"""``mkdt targets``: encode every source image with the teacher into the regression targets Y (N x D).

Stage 2 of REFERENCE.md: eval mode, no augmentation, the source set's normalisation, batched under
``torch.no_grad``. The targets record the data's fingerprint so later stages refuse them for other
data, and the teacher file's sha256 so a retrained teacher makes the stage run again.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mkdt.artifacts import RunDir
from mkdt.config import StageConfig, to_dict
from mkdt.data import DataConfig, ImageSet, load_dataset
from mkdt.errors import MkdtError
from mkdt.formats import save_targets
from mkdt.runtime import Meter, resolve_device
from mkdt.ssl import encode
from mkdt.teacher.io import TEACHER_FILE, file_sha256, load_teacher

TARGETS_FILE = "targets.safetensors"


@dataclass
class TargetsConfig(StageConfig):
    """The source set to encode and the teacher file (default ``<out>/teacher/teacher.safetensors``)."""

    data: DataConfig = field(default_factory=DataConfig)
    teacher: str | None = None
    batch_size: int = 512


def teacher_path(config: TargetsConfig) -> Path:
    return Path(config.teacher) if config.teacher else Path(config.out) / "teacher" / TEACHER_FILE


def check_teacher_fits(meta: dict[str, Any], data: ImageSet, path: Path) -> None:
    """The teacher must see images shaped as it was trained on; say how to make them so."""
    want = (int(meta["in_channels"]), int(meta["resolution"]))
    got = (data.channels, data.resolution)
    if want != got:
        raise MkdtError(f"{path}: the teacher expects {want[0]}-channel {want[1]}px images but data '{data.name}' "
                        f"has {got[0]}-channel {got[1]}px images; set data.channels={want[0]} "
                        f"data.resolution={want[1]}")


def _warn_normalisation(meta: dict[str, Any], data: ImageSet, path: Path) -> None:
    mean, std = meta.get("mean"), meta.get("std")
    if mean is None or std is None:
        return
    if max(abs(a - b) for a, b in zip(list(mean) + list(std), list(data.mean) + list(data.std))) > 1e-3:
        warnings.warn(f"{path}: teacher was trained with mean {mean} / std {std}, the data '{data.name}' has "
                      f"{list(data.mean)} / {list(data.std)}; encoding with the data's statistics", stacklevel=3)


def compute_targets(config: TargetsConfig, *, progress: bool | None = None) -> dict[str, Any]:
    """Write ``<out>/targets/targets.safetensors`` (N x feature_dim) and ``stage.json``."""
    path = teacher_path(config)
    if not path.is_file():
        raise MkdtError(f"{path}: teacher file not found; run `mkdt teacher` first or set teacher=FILE")
    sha = file_sha256(path)
    cfg_dict = {**to_dict(config), "teacher_sha256": sha}
    stage = RunDir(config.out).stage("targets")
    if stage.is_done(cfg_dict):
        return stage.record() or {}
    stage.invalidate()
    stage.save_config(config)
    device = resolve_device(config.device)
    model, meta = load_teacher(path, device=device)
    data = load_dataset(config.data)
    check_teacher_fits(meta, data, path)
    _warn_normalisation(meta, data, path)
    with Meter() as meter:
        values = encode(model, data.images, data.mean, data.std, batch_size=config.batch_size, device=device,
                        progress=progress)
    if not values.isfinite().all():
        raise MkdtError(f"{path}: the teacher produced NaN/inf features on '{data.name}'; the teacher is broken, "
                        f"re-train or re-import it")
    teacher_info = {"path": str(path), "sha256": sha, "model": meta["model"], "feature_dim": meta["feature_dim"],
                    "data_name": meta.get("data_name"), "fingerprint": meta.get("fingerprint")}
    out = stage / TARGETS_FILE
    save_targets(out, values, data.fingerprint(), data_name=data.name, mean=list(data.mean), std=list(data.std),
                 count=len(values), teacher=teacher_info)
    summary = {"targets": str(out), "count": int(values.shape[0]), "dim": int(values.shape[1]),
               "fingerprint": data.fingerprint(), "images_per_second": round(len(values) / max(meter.seconds, 1e-9), 1),
               **meter.as_dict()}
    stage.finish(cfg_dict, summary=summary)
    return {"summary": summary, "stage": str(stage.path)}

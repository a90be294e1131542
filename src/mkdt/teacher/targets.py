"""``mkdt targets``: encode every source image with the teacher into the regression targets Y (N x D).

Step 2 of MKDT (paper, Section 4): eval mode, no augmentation, the source set's normalisation, batched
under ``torch.no_grad``. The targets record the data's fingerprint so later stages refuse them for other
data; the teacher file is an input of the stage, so a retrained teacher makes it run again.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mkdt.config import StageConfig, require
from mkdt.data import DataConfig, ImageSet, load_dataset
from mkdt.engine import Stage, StageResult, StageRun, run_stage
from mkdt.errors import MkdtError
from mkdt.formats import save_targets
from mkdt.layout import TARGETS_FILE, RunLayout
from mkdt.ssl import encode
from mkdt.teacher.io import load_teacher


@dataclass
class TargetsConfig(StageConfig):
    """The source set to encode and the teacher file."""

    data: DataConfig = field(default_factory=DataConfig)  # the source set (as the teacher saw it)
    teacher: str | None = None  # the teacher file (default: the run's teacher/teacher.safetensors)
    batch_size: int = 512  # encoding batch size (no effect on the targets)

    def check(self) -> None:
        require(self.batch_size >= 1, "batch_size", "at least 1", self.batch_size)


def teacher_path(config: TargetsConfig) -> Path:
    return Path(config.teacher) if config.teacher else RunLayout(config.out).teacher


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


def _compute(config: TargetsConfig, run: StageRun) -> dict[str, Any]:
    path = teacher_path(config)
    if not path.is_file():
        raise MkdtError(f"{path}: teacher file not found; run `mkdt teacher` first or set teacher=FILE")
    model, meta = load_teacher(path, device=run.device)
    data = load_dataset(config.data)
    check_teacher_fits(meta, data, path)
    _warn_normalisation(meta, data, path)
    values = encode(model, data.images, data.mean, data.std, batch_size=config.batch_size, device=run.device,
                    progress="targets")
    if not values.isfinite().all():
        raise MkdtError(f"{path}: the teacher produced NaN/inf features on '{data.name}'; the teacher is broken, "
                        f"re-train or re-import it")
    teacher_info = {"path": run.rel(path), "model": meta["model"], "feature_dim": meta["feature_dim"],
                    "data_name": meta.get("data_name"), "fingerprint": meta.get("fingerprint")}
    out = run.output("targets", TARGETS_FILE)
    save_targets(out, values, data.fingerprint(), data_name=data.name, mean=list(data.mean), std=list(data.std),
                 count=len(values), teacher=teacher_info)
    return {"targets": run.rel(out), "count": int(values.shape[0]), "dim": int(values.shape[1]),
            "fingerprint": data.fingerprint()}


STAGE = Stage(
    "targets", TargetsConfig, _compute, "encode the source set with the teacher into targets",
    folder=lambda config, layout: layout.targets_dir,
    inputs=lambda config, layout: {"teacher": teacher_path(config)}, input_fields=("teacher",),
    runtime=("batch_size",), shown=("data.name",),
)


def compute_targets(config: TargetsConfig) -> StageResult:
    """Write ``<out>/targets/targets.safetensors`` (N x feature_dim)."""
    return run_stage(STAGE, config)

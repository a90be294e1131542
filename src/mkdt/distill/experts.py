"""The expert trajectories distillation draws from, checked once and then read two rows at a time.

Why lazy rows: 100 paper-shape experts hold ~1.35 M parameters x 21 epochs each (11 GB); only the
two epochs of the drawn (expert, start) pair are needed per iteration, so they are read from the
safetensors file on demand (page cache makes that cheap) and memory stays O(parameters).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from mkdt.artifacts import read_metadata
from mkdt.engine import recorded_outputs
from mkdt.errors import MkdtError
from mkdt.formats import load_trajectory
from mkdt.models import ModelConfig
from mkdt.models.functional import ParamLayout

EXPERT_GLOB = "expert_*.safetensors"


def _canonical_model(model: dict[str, Any]) -> dict[str, Any]:
    """``convnet_d3`` and ``convnet`` with depth 3 are the same network; compare them as such."""
    out = dict(model)
    name = str(out.get("name", ""))
    if name.startswith("convnet_d") and name[len("convnet_d"):].isdigit():
        out["name"], out["depth"] = "convnet", int(name[len("convnet_d"):])
    if out.get("name") != "convnet":
        out.pop("depth", None)
        out.pop("pool", None)
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(float(a) - float(b)) <= 1e-6 * max(1.0, abs(float(a)))
    return a == b


def _check_metadata(path: Path, meta: dict[str, Any], expect: dict[str, Any]) -> None:
    """Give a readable error before a layout mismatch does: what differs between expert and synthetic set."""
    hints = {
        "in_channels": "the initial set has a different number of channels",
        "resolution": "the initial set has a different resolution",
        "head_dim": "the initial set's targets have a different dimension",
        "mean": "normalisation differs from the initial set's (the experts saw differently normalised data)",
        "std": "normalisation differs from the initial set's (the experts saw differently normalised data)",
        "fingerprint": "the experts were trained on other data than the initial set was drawn from",
    }
    for key, want in expect.items():
        if want is None or key not in meta:
            continue
        if not _same(meta[key], want):
            raise MkdtError(f"{path}: expert {key} is {meta[key]} but the initial set implies {want} "
                            f"({hints.get(key, 'mismatch')}); use experts and an initial set of the same run")


def expert_files(folder: Path) -> list[Path]:
    """The experts a finished experts stage recorded in ``folder`` (every ``expert_*`` file of a folder made
    by hand), in order; none is an error naming the folder and the fix."""
    files = recorded_outputs(folder, "expert_")
    if files is None:
        files = sorted(folder.glob(EXPERT_GLOB)) if folder.is_dir() else []
    if not files:
        raise MkdtError(f"{folder}: no {EXPERT_GLOB} files; run `mkdt experts` first or set experts_dir")
    return files


def expert_objective(meta: dict[str, Any]) -> str:
    """What an expert was trained with: ``ssl`` (MTT-SSL) or ``kd`` (MKDT; files without the key)."""
    return str(meta.get("objective", "kd"))


def check_objective(path: Path, meta: dict[str, Any], objective: str) -> None:
    """Refuse an expert trained with another objective than the distillation's inner one (one line)."""
    trained = expert_objective(meta)
    if trained == objective:
        return
    fix = {"ssl": "point experts_dir at SSL experts (`mkdt experts --set objective=ssl`)",
           "kd": "point experts_dir at KD experts (`mkdt experts`)"}.get(objective, "use matching experts")
    raise MkdtError(f"{path.parent}: expert {path.name} was trained with objective {trained} but distill "
                    f"inner_objective is {objective}; set inner_objective={trained} or {fix}")


@dataclass
class Expert:
    """One checked trajectory file: where it is and which row holds which epoch."""

    path: Path
    rows: dict[int, int]
    meta: dict[str, Any]


class ExpertBank:
    """All expert files of a folder, validated for a student layout and the epochs the run uses."""

    def __init__(self, experts: list[Expert], layout: ParamLayout):
        self.experts = experts
        self.layout = layout

    def __len__(self) -> int:
        return len(self.experts)

    @classmethod
    def open(cls, folder: str | Path, layout: ParamLayout, model: ModelConfig, epochs_needed: int,
             expert_epochs: int, expect: dict[str, Any] | None = None, objective: str = "kd") -> "ExpertBank":
        """Check every ``expert_*.safetensors`` in ``folder`` (one at a time, so memory stays bounded).

        Each must have been trained with ``objective`` (the distillation's inner objective: KD experts
        for MKDT, SSL experts for MTT-SSL; never mixed), match the student's layout and model, agree
        with ``expect`` (metadata the synthetic set implies: channels, resolution, target dim,
        normalisation, data fingerprint), store epochs ``0..epochs_needed-1`` and move between every
        start epoch and its target epoch (zero displacement makes the loss divide by zero).
        """
        folder = Path(folder)
        files = expert_files(folder)
        experts = [cls._check(path, layout, model, epochs_needed, expert_epochs, expect or {}, objective)
                   for path in files]
        return cls(experts, layout)

    @staticmethod
    def _check(path: Path, layout: ParamLayout, model: ModelConfig, epochs_needed: int,
               expert_epochs: int, expect: dict[str, Any], objective: str = "kd") -> Expert:
        meta = read_metadata(path)
        check_objective(path, meta, objective)
        _check_metadata(path, meta, expect)
        traj = load_trajectory(path, layout=layout)
        stored_model = traj.meta.get("model")
        if isinstance(stored_model, dict) and _canonical_model(stored_model) != _canonical_model(model.to_dict()):
            raise MkdtError(f"{path}: expert was trained with model {stored_model}, but distill.model is "
                            f"{model.to_dict()}; set distill.model to the experts' model")
        missing = [e for e in range(epochs_needed) if e not in traj.epochs]
        if missing:
            raise MkdtError(f"{path}: stores epochs {traj.epochs} but distillation needs epochs "
                            f"0..{epochs_needed - 1} (max_start_epoch + expert_epochs); lower max_start_epoch "
                            f"or expert_epochs, or train experts with more epochs")
        for start in range(epochs_needed - expert_epochs):
            gap = (traj.at(start + expert_epochs).double() - traj.at(start).double()).pow(2).sum()
            if not gap > 0:
                raise MkdtError(f"{path}: parameters at epochs {start} and {start + expert_epochs} are identical "
                                f"(no displacement, the matching loss would divide by zero); retrain this expert")
        rows = {e: traj.epochs.index(e) for e in range(epochs_needed)}
        return Expert(path, rows, dict(traj.meta))

    def names(self) -> list[str]:
        return [e.path.name for e in self.experts]

    def meta(self, key: str) -> list[Any]:
        """The values of one metadata key over all experts (missing keys skipped)."""
        return [e.meta[key] for e in self.experts if key in e.meta]

    def pair(self, index: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(theta at ``start``, theta at ``end``) of expert ``index`` as float32 CPU vectors."""
        expert = self.experts[index]
        try:
            with safe_open(str(expert.path), framework="pt") as fh:
                rows = fh.get_slice("params")
                theta0 = rows[expert.rows[start]:expert.rows[start] + 1][0].clone()
                theta_star = rows[expert.rows[end]:expert.rows[end] + 1][0].clone()
        except Exception as exc:  # the file changed under a running job
            raise MkdtError(f"{expert.path}: cannot read the expert any more ({exc}); do not modify experts "
                            f"while distilling, re-run to resume") from None
        if theta0.numel() != self.layout.numel or theta_star.numel() != self.layout.numel:
            raise MkdtError(f"{expert.path}: the file changed while distilling; re-run to resume")
        return theta0.float(), theta_star.float()

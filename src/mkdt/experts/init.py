"""``mkdt init``: the initial synthetic set — high-loss real images (MKDT) or a random subset (ablation).

Paper, Section 4 (initialisation): every real example's MSE to its teacher target under each expert's
epoch-1 parameters, averaged over the experts; the k examples with the highest mean loss (not class
balanced) become the initial set, together with their teacher targets. Hard examples carry the most
trajectory information early on, which is why they start the distillation.

Both sets are written with :func:`mkdt.formats.save_synthetic` (indices + normalised images + targets)
to ``<out>/init/high_loss.safetensors`` and ``<out>/init/random.safetensors``; the per-example losses go
to ``<out>/init/losses.safetensors``. Interrupted, the stage resumes from the experts already scored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mkdt.artifacts import JsonLog, TensorSpec, load_tensors, read_metadata, save_tensors
from mkdt.config import StageConfig, require
from mkdt.data import DataConfig
from mkdt.data.imageset import ImageSet
from mkdt.engine import Stage, StageResult, StageRun, recorded_outputs, run_stage
from mkdt.errors import MkdtError
from mkdt.formats import SyntheticSet, load_trajectory, save_synthetic
from mkdt.inputs import load_source, resolve_size, same_numbers, tensor_digest
from mkdt.layout import RunLayout
from mkdt.models import ModelConfig, build_model
from mkdt.models.functional import ParamLayout, functional_forward
from mkdt.progress import Progress
from mkdt.runtime import derive_seed, generator, seeded

EXPERT_GLOB = "expert_*.safetensors"
PARTIAL_FILE = "losses_partial.safetensors"
KINDS = ("high_loss", "random")


@dataclass
class InitConfig(StageConfig):
    """Initial-set selection: ``size`` < 1 is a fraction of the data, >= 1 a count of images."""

    data: DataConfig = field(default_factory=DataConfig)  # the source set (as the experts saw it)
    model: ModelConfig = field(default_factory=ModelConfig)  # the experts' student architecture
    size: float = 0.02  # the synthetic set's size: a fraction (< 1) of the data or a count (>= 1)
    epoch: int = 1  # the expert epoch whose parameters score the examples (the paper: 1)
    num_experts: int | None = None  # score with the first N experts of the folder (null: all)
    experts_dir: str | None = None  # the experts (default: the run's experts/)
    targets: str | None = None  # the teacher targets (default: the run's targets/targets.safetensors)
    batch_size: int = 1024  # evaluation batch (no effect on the result)
    threads: int = 0  # torch intra-op threads (0 = torch default)

    def check(self) -> None:
        require(self.epoch >= 0, "epoch", ">= 0", self.epoch)
        require(self.num_experts is None or self.num_experts >= 1, "num_experts", "at least 1 or null (all)",
                self.num_experts)
        require(self.batch_size >= 1, "batch_size", "at least 1", self.batch_size)
        require(self.size > 0, "size", "a fraction (< 1) or a count (>= 1)", self.size)
        require(self.size < 1 or float(self.size).is_integer(), "size", "a fraction (< 1) or a whole count",
                self.size)
        require(self.threads >= 0, "threads", ">= 0 (0 = torch default)", self.threads)


def experts_path(config: InitConfig) -> Path:
    return Path(config.experts_dir) if config.experts_dir else RunLayout(config.out).experts_dir()


def targets_path(config: InitConfig) -> Path:
    return Path(config.targets) if config.targets else RunLayout(config.out).targets


# ----------------------------------------------------------------------------------------------
# scoring
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def per_example_loss(module: nn.Module, layout: ParamLayout, flat: torch.Tensor, images: torch.Tensor,
                     targets: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """MSE (mean over target dims) of every example under the parameters ``flat``; N float32 on CPU."""
    device = next(module.parameters()).device
    flat = flat.to(device)
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device)
        y = targets[start:start + batch_size].to(device)
        pred = functional_forward(module, layout, flat, x)
        out.append((pred - y).pow(2).mean(dim=1).float().cpu())
    return torch.cat(out)


def expert_files(folder: Path, count: int | None) -> list[Path]:
    """The expert files of an experts folder (the first ``count`` of them, or all)."""
    files = recorded_outputs(folder, "expert_")
    if files is None:
        files = sorted(folder.glob(EXPERT_GLOB)) if folder.is_dir() else []
    if not files:
        raise MkdtError(f"{folder}: no {EXPERT_GLOB} files; run `mkdt experts` first")
    if count is not None:
        if count > len(files):
            raise MkdtError(f"{folder}: num_experts={count} but only {len(files)} experts exist; lower num_experts")
        files = files[:count]
    return files


def _check_expert_meta(path: Path, meta: dict[str, Any], data: ImageSet, fingerprint: str, head_dim: int) -> None:
    if meta.get("fingerprint") not in (None, fingerprint):
        raise MkdtError(f"{path}: expert was trained on other data (fingerprint {meta.get('fingerprint')}, the data "
                        f"given has {fingerprint}); use the data and experts of the same run")
    for key, ours in (("mean", data.mean), ("std", data.std)):
        if key in meta and not same_numbers(meta[key], ours):
            raise MkdtError(f"{path}: expert saw data normalised with {key} {meta[key]}, the data uses {list(ours)}; "
                            f"use the same data settings as `mkdt experts`")
    if "head_dim" in meta and int(meta["head_dim"]) != head_dim:
        raise MkdtError(f"{path}: expert predicts {meta['head_dim']}-d targets but the targets are {head_dim}-d; "
                        f"use the targets the experts were trained on")


def _identity(files: list[Path]) -> list[list[str]]:
    """What a cached loss row belongs to: file name + the expert's settings digest."""
    return [[p.name, str(read_metadata(p).get("settings_digest", ""))] for p in files]


def _load_partial(folder: Path, key: dict[str, Any], n: int) -> torch.Tensor:
    """Loss rows already computed for a prefix of the same experts (0 x N if none)."""
    path = folder / PARTIAL_FILE
    empty = torch.zeros(0, n)
    if not path.is_file():
        return empty
    try:
        meta = read_metadata(path)
        rows = load_tensors(path, {"losses": TensorSpec(shape=(None, n), dtype=torch.float32)})["losses"]
    except MkdtError:
        return empty
    if any(meta.get(k) != v for k, v in key.items() if k != "experts"):
        return empty
    done = meta.get("experts", [])
    if len(done) != len(rows) or done != key["experts"][:len(done)]:
        return empty
    return rows


def score_experts(files: list[Path], module: nn.Module, layout: ParamLayout, data: ImageSet, fingerprint: str,
                  images: torch.Tensor, targets: torch.Tensor, config: InitConfig, folder: Path,
                  log: JsonLog, enabled: bool = True) -> torch.Tensor:
    """E x N per-example losses under each expert's ``config.epoch`` parameters (resumable per expert)."""
    for path in files:
        _check_expert_meta(path, read_metadata(path), data, fingerprint, int(targets.shape[1]))
    key = {"experts": _identity(files), "epoch": config.epoch, "fingerprint": fingerprint,
           "targets_digest": tensor_digest(targets)}
    rows = list(_load_partial(folder, key, len(images)))
    with Progress(len(files), "init: scoring", initial=len(rows), unit="expert", enabled=enabled) as bar:
        for i in range(len(rows), len(files)):
            t0 = time.perf_counter()
            traj = load_trajectory(files[i], layout=layout)
            losses = per_example_loss(module, layout, traj.at(config.epoch), images, targets, config.batch_size)
            if not torch.isfinite(losses).all():
                raise MkdtError(f"{files[i]}: non-finite losses at epoch {config.epoch}; the expert is broken, "
                                f"retrain it")
            rows.append(losses)
            save_tensors(folder / PARTIAL_FILE, {"losses": torch.stack(rows)},
                         {**key, "experts": key["experts"][:len(rows)]})
            log.write(expert=files[i].name, epoch=config.epoch, mean_loss=float(losses.mean()),
                      seconds=round(time.perf_counter() - t0, 3))
            bar.update(1, mean_loss=float(losses.mean()))
    return torch.stack(rows)


# ----------------------------------------------------------------------------------------------
# selection
# ----------------------------------------------------------------------------------------------
def highest(mean_loss: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest losses, largest first (stable: ties keep data order)."""
    return torch.sort(mean_loss, descending=True, stable=True).indices[:k].clone()


def random_subset(n: int, k: int, seed: int) -> torch.Tensor:
    """k distinct indices out of n from the run seed, sorted."""
    g = generator(derive_seed(seed, "init", "random"))
    return torch.sort(torch.randperm(n, generator=g)[:k]).values


def _class_counts(data: ImageSet, idx: torch.Tensor) -> list[int] | None:
    if data.labels is None or data.num_classes == 0:
        return None
    return torch.bincount(data.labels[idx], minlength=data.num_classes).tolist()


def _save_set(path: Path, data: ImageSet, targets: torch.Tensor, idx: torch.Tensor, mean_loss: torch.Tensor,
              method: str, extra: dict[str, Any]) -> dict[str, Any]:
    info = {"method": method, "count": len(idx), "mean_loss_selected": float(mean_loss[idx].mean()),
            "mean_loss_all": float(mean_loss.mean()), "class_counts": _class_counts(data, idx)}
    save_synthetic(path, SyntheticSet(data.normalize(data.images[idx]), targets[idx].clone(), data.mean, data.std,
                                      indices=idx, meta={**extra, **info}))
    return {**info, "path": str(path)}


def _select(config: InitConfig, run: StageRun) -> dict[str, Any]:
    """Write the high-loss and the random initial sets (with indices and teacher targets)."""
    data, targets = load_source(config.data, targets_path(config))
    fingerprint = data.fingerprint()
    k = resolve_size(config.size, len(data), "init size")
    files = expert_files(experts_path(config), config.num_experts)
    with seeded(0):
        module = build_model(config.model, in_channels=data.channels, resolution=data.resolution,
                             head_dim=targets.dim).to(run.device).eval()
    layout = ParamLayout.of(module)
    losses = score_experts(files, module, layout, data, fingerprint, data.normalize(), targets.values, config,
                           run.folder, JsonLog(run.path("log.jsonl")))
    mean_loss = losses.mean(dim=0)
    extra = {"data_name": data.name, "fingerprint": fingerprint, "size": config.size, "seed": config.seed,
             "experts": len(files), "epoch": config.epoch}
    save_tensors(run.output("losses", "losses.safetensors"), {"losses": losses, "mean_loss": mean_loss},
                 {**extra, "experts": [p.name for p in files]})
    high = highest(mean_loss, k)
    chosen = {"high_loss": high, "random": random_subset(len(data), k, config.seed)}
    sets = {kind: _save_set(run.output(kind, f"{kind}.safetensors"), data, targets.values, idx, mean_loss, kind,
                            extra) for kind, idx in chosen.items()}
    for info in sets.values():
        info["path"] = run.rel(info["path"])
    rest = torch.ones(len(data), dtype=torch.bool)
    rest[high] = False
    run.path(PARTIAL_FILE).unlink(missing_ok=True)
    return {
        "count": k, "fraction": round(k / len(data), 6), "images": len(data), "experts": len(files),
        "epoch": config.epoch, "mean_loss_all": float(mean_loss.mean()),
        "mean_loss_high_loss": sets["high_loss"]["mean_loss_selected"],
        "mean_loss_random": sets["random"]["mean_loss_selected"],
        "lowest_selected_loss": float(mean_loss[high].min()),
        "highest_unselected_loss": float(mean_loss[rest].max()) if rest.any() else None,
        "sets": sets,
    }


STAGE = Stage(
    "init", InitConfig, _select, "choose the initial synthetic set (high-loss or random)",
    folder=lambda config, layout: layout.init_dir,
    inputs=lambda config, layout: {"experts": experts_path(config), "targets": targets_path(config)},
    input_fields=("experts_dir", "targets"), runtime=("batch_size",), shown=("size", "epoch", "num_experts"),
)


def select_initial_set(config: InitConfig) -> StageResult:
    """Stage ``init``: ``<out>/init/high_loss.safetensors`` and ``<out>/init/random.safetensors``."""
    return run_stage(STAGE, config)

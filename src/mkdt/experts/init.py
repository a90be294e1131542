"""``mkdt init``: the initial synthetic set — high-loss real images (MKDT) or a random subset (ablation).

REFERENCE.md section 1.4: every real example's MSE to its teacher target under each expert's epoch-1
parameters, averaged over the experts; the k examples with the highest mean loss (not class
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
from tqdm import tqdm

from mkdt.artifacts import (RunDir, StageDir, TensorSpec, load_tensors, read_metadata, save_tensors)
from mkdt.config import StageConfig, to_dict
from mkdt.data import DataConfig
from mkdt.data.imageset import ImageSet
from mkdt.errors import MkdtError
from mkdt.experts.common import (JsonLog, input_path, load_source, resolve_size, same_numbers, tensor_digest,
                                 torch_threads)
from mkdt.formats import SyntheticSet, load_trajectory, save_synthetic
from mkdt.models import ModelConfig, build_model
from mkdt.models.functional import ParamLayout, functional_forward
from mkdt.runtime import Meter, derive_seed, generator, resolve_device, seeded

STAGE = "init"
EXPERT_GLOB = "expert_*.safetensors"
PARTIAL_FILE = "losses_partial.safetensors"
LOSSES_FILE = "losses.safetensors"


@dataclass
class InitConfig(StageConfig):
    """Initial-set selection: ``size`` < 1 is a fraction of the data, >= 1 a count of images."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)  # the experts' student architecture
    size: float = 0.02
    epoch: int = 1  # the expert epoch whose parameters score the examples (REFERENCE: 1)
    num_experts: int | None = None  # the first N experts of the folder (None = all)
    experts_dir: str | None = None  # default <out>/experts
    targets: str | None = None  # default <out>/targets/targets.safetensors
    batch_size: int = 1024  # evaluation batch (no effect on the result)
    threads: int = 0

    def __post_init__(self) -> None:
        if self.epoch < 0:
            raise MkdtError(f"init config 'epoch' must be >= 0, got {self.epoch}")
        if self.num_experts is not None and self.num_experts < 1:
            raise MkdtError(f"init config 'num_experts' must be at least 1 or null (all), got {self.num_experts}")
        if self.batch_size < 1:
            raise MkdtError(f"init config 'batch_size' must be at least 1, got {self.batch_size}")
        if not isinstance(self.size, (int, float)) or not self.size > 0:
            raise MkdtError(f"init config 'size' must be a fraction (< 1) or a count (>= 1), got {self.size!r}")


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
    """The expert files of a finished experts stage (the first ``count`` of them, or all)."""
    if not (folder / "stage.json").is_file():
        raise MkdtError(f"{folder}: the experts stage has not finished (no stage.json); run `mkdt experts` "
                        f"first or set experts_dir to a finished experts folder")
    files = sorted(folder.glob(EXPERT_GLOB))
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


def _load_partial(stage: StageDir, key: dict[str, Any], n: int) -> torch.Tensor:
    """Loss rows already computed for a prefix of the same experts (0 x N if none)."""
    path = stage / PARTIAL_FILE
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
                  images: torch.Tensor, targets: torch.Tensor, config: InitConfig, stage: StageDir,
                  log: JsonLog) -> torch.Tensor:
    """E x N per-example losses under each expert's ``config.epoch`` parameters (resumable per expert)."""
    for path in files:
        _check_expert_meta(path, read_metadata(path), data, fingerprint, int(targets.shape[1]))
    key = {"experts": _identity(files), "epoch": config.epoch, "fingerprint": fingerprint,
           "targets_digest": tensor_digest(targets)}
    rows = list(_load_partial(stage, key, len(images)))
    with tqdm(total=len(files), initial=len(rows), desc="init: scoring", unit="expert", disable=None) as bar:
        for i in range(len(rows), len(files)):
            t0 = time.perf_counter()
            traj = load_trajectory(files[i], layout=layout)
            losses = per_example_loss(module, layout, traj.at(config.epoch), images, targets, config.batch_size)
            if not torch.isfinite(losses).all():
                raise MkdtError(f"{files[i]}: non-finite losses at epoch {config.epoch}; the expert is broken, "
                                f"retrain it")
            rows.append(losses)
            save_tensors(stage / PARTIAL_FILE, {"losses": torch.stack(rows)},
                         {**key, "experts": key["experts"][:len(rows)]})
            log.write(expert=files[i].name, epoch=config.epoch, mean_loss=float(losses.mean()),
                      seconds=round(time.perf_counter() - t0, 3))
            bar.update(1)
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


def select_initial_set(config: InitConfig) -> dict:
    """Stage ``init``: write the high-loss and the random initial sets (with indices and teacher targets)."""
    cfg_dict = to_dict(config)
    stage = RunDir(config.out).stage(STAGE)
    if stage.is_done(cfg_dict):
        record = stage.record() or {}
        return {"summary": record.get("summary", {}), "stage": str(stage.path), "skipped": True}
    stage.invalidate()
    stage.save_config(config)
    device = resolve_device(config.device)
    with torch_threads(config.threads), Meter() as meter:
        targets_path = input_path(config.targets, config.out, "targets", "targets.safetensors")
        data, targets, fingerprint = load_source(config.data, targets_path)
        k = resolve_size(config.size, len(data), "init size")
        files = expert_files(input_path(config.experts_dir, config.out, "experts"), config.num_experts)
        with seeded(0):
            module = build_model(config.model, in_channels=data.channels, resolution=data.resolution,
                                 head_dim=targets.dim).to(device).eval()
        layout = ParamLayout.of(module)
        losses = score_experts(files, module, layout, data, fingerprint, data.normalize(), targets.values, config,
                               stage, JsonLog(stage / "log.jsonl"))
        mean_loss = losses.mean(dim=0)
        extra = {"data_name": data.name, "fingerprint": fingerprint, "size": config.size, "seed": config.seed,
                 "experts": len(files), "epoch": config.epoch}
        save_tensors(stage / LOSSES_FILE, {"losses": losses, "mean_loss": mean_loss},
                     {**extra, "experts": [p.name for p in files]})
        high = highest(mean_loss, k)
        sets = {
            "high_loss": _save_set(stage / "high_loss.safetensors", data, targets.values, high, mean_loss,
                                   "high_loss", extra),
            "random": _save_set(stage / "random.safetensors", data, targets.values,
                                random_subset(len(data), k, config.seed), mean_loss, "random", extra),
        }
    rest = torch.ones(len(data), dtype=torch.bool)
    rest[high] = False
    summary = {
        "count": k, "fraction": round(k / len(data), 6), "images": len(data), "experts": len(files),
        "epoch": config.epoch, "mean_loss_all": float(mean_loss.mean()),
        "mean_loss_high_loss": sets["high_loss"]["mean_loss_selected"],
        "mean_loss_random": sets["random"]["mean_loss_selected"],
        "lowest_selected_loss": float(mean_loss[high].min()),
        "highest_unselected_loss": float(mean_loss[rest].max()) if rest.any() else None,
        "sets": sets, "device": str(device), **meter.as_dict(),
    }
    (stage / PARTIAL_FILE).unlink(missing_ok=True)
    stage.finish(cfg_dict, summary=summary)
    return {"summary": summary, "stage": str(stage.path)}

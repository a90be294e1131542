"""``mkdt analyze-variance``: how much training trajectories spread, KD vs SSL (the paper's Figure 1a).

From ONE initialisation of the student, ``num_trajectories`` runs per objective that differ only in
their random stream (batch order, and augmentations for SSL): KD = MSE of the student (+ linear head)
to the teacher targets, no augmentation (the experts' objective); SSL = Barlow Twins on two augmented
views through a projector (``mkdt.ssl``). At every requested length we measure, over the encoder's
parameters (shared by both objectives; the head/projector are reported separately as ``all``):

- ``variance``: mean over parameters of the across-trajectory (unbiased) variance;
- ``normalized``: total variance / mean squared displacement from the initialisation, a unit-free
  spread that lets objectives whose parameters move by different amounts be compared.

Why it matters: trajectory matching can only match what is reproducible; the paper argues SSL
trajectories are too noisy to match and KD ones are not.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from mkdt.artifacts import JsonLog, atomic_path, load_tensors, read_metadata, save_json, save_tensors
from mkdt.config import StageConfig, require, to_dict
from mkdt.data import DataConfig
from mkdt.engine import Stage, StageResult, StageRun, run_stage
from mkdt.errors import MkdtError
from mkdt.inputs import load_source, random_indices
from mkdt.layout import RunLayout
from mkdt.models import ModelConfig, build_model
from mkdt.models.functional import flat_parameters
from mkdt.runtime import derive_seed, generator, seeded
from mkdt.ssl.augment import AugmentConfig, BatchAugment
from mkdt.ssl.objectives import ObjectiveConfig, build_loss, build_projector
from mkdt.training import batch_order

OBJECTIVES = ("kd", "ssl")
UNITS = ("epochs", "iterations")


@dataclasses.dataclass
class OptimConfig:
    """One objective's optimiser: ``sgd`` (with momentum) or ``adam``; weight decay is coupled (L2)."""

    optimizer: str = "sgd"  # sgd or adam
    lr: float = 0.01  # learning rate
    momentum: float = 0.0  # SGD momentum
    weight_decay: float = 0.0  # L2 weight decay
    batch_size: int = 256  # minibatch size

    def check(self) -> None:
        require(self.optimizer in ("sgd", "adam"), "optimizer", "sgd or adam", self.optimizer)
        require(self.lr > 0, "lr", "positive", self.lr)
        require(self.batch_size >= 2, "batch_size", "at least 2", self.batch_size)


def _kd_optim() -> OptimConfig:  # the paper's Figure 1 supervised run (appendix A.2)
    return OptimConfig("sgd", lr=0.01, momentum=0.0, weight_decay=0.0, batch_size=256)


def _ssl_optim() -> OptimConfig:  # the paper's Figure 1 SSL run: Adam, batch 1024, lr 1e-3
    return OptimConfig("adam", lr=1e-3, momentum=0.0, weight_decay=1e-6, batch_size=1024)


def _student() -> ModelConfig:
    return ModelConfig(name="convnet", width=128, depth=3)


@dataclasses.dataclass
class VarianceConfig(StageConfig):
    """Trajectory-variance analysis; lengths are in ``unit`` (epochs or iterations)."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)  # the source set
    targets: str | None = None  # the teacher targets (default: the run's targets/targets.safetensors)
    max_images: int | None = None  # a seeded random subset of the source, to bound the cost
    model: ModelConfig = dataclasses.field(default_factory=_student)  # the student
    objectives: list[str] = dataclasses.field(default_factory=lambda: list(OBJECTIVES))  # kd and/or ssl
    num_trajectories: int = 5  # trajectories per objective (from one init, different minibatch orders)
    lengths: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 5])  # where the spread is measured
    unit: str = "epochs"  # unit of lengths: epochs or iterations
    kd: OptimConfig = dataclasses.field(default_factory=_kd_optim)  # the KD run's optimiser
    ssl: OptimConfig = dataclasses.field(default_factory=_ssl_optim)  # the SSL run's optimiser
    objective: ObjectiveConfig = dataclasses.field(default_factory=ObjectiveConfig)  # the SSL loss
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)  # the SSL views

    def check(self) -> None:
        require(self.unit in UNITS, "unit", f"one of {', '.join(UNITS)}", self.unit)
        require(self.objectives and all(o in OBJECTIVES for o in self.objectives), "objectives",
                f"a non-empty list of {', '.join(OBJECTIVES)}", self.objectives)
        require(self.num_trajectories >= 2, "num_trajectories", "at least 2 (to measure a variance)",
                self.num_trajectories)
        require(self.lengths and min(self.lengths) >= 1 and sorted(set(self.lengths)) == list(self.lengths),
                "lengths", "increasing positive integers", self.lengths)
        require(self.max_images is None or self.max_images >= 2, "max_images", "at least 2 or null", self.max_images)


def targets_path(config: VarianceConfig) -> Path:
    return Path(config.targets) if config.targets else RunLayout(config.out).targets


# ----------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------
def spread(final: torch.Tensor, init: torch.Tensor) -> dict[str, float]:
    """Spread of K parameter vectors (K x P) that all started at ``init`` (P).

    ``variance`` = mean over parameters of the unbiased variance across the K runs; ``normalized`` =
    total variance / mean over runs of ||theta_k - theta_0||^2; ``displacement`` = that mean squared
    distance per parameter.
    """
    if final.dim() != 2 or final.shape[0] < 2 or final.shape[1] != init.numel():
        raise MkdtError(f"need at least 2 runs of {init.numel()} parameters, got shape {tuple(final.shape)}")
    x = final.double()
    var = x.var(dim=0, unbiased=True)
    disp = ((x - init.double().reshape(1, -1)) ** 2).sum(1).mean()
    total = var.sum()
    return {"variance": float(var.mean()), "normalized": float(total / disp) if disp > 0 else float("nan"),
            "displacement": float(disp / x.shape[1])}


# ----------------------------------------------------------------------------------------------
# one trajectory
# ----------------------------------------------------------------------------------------------
def batch_stream(n: int, batch_size: int, gen: torch.Generator, *, drop_last: bool) -> Iterator[tuple[int, torch.Tensor]]:
    """(epoch, indices) forever: each epoch a fresh seeded permutation (as ``mkdt.training``)."""
    epoch = 0
    while True:
        epoch += 1
        batches = batch_order(n, batch_size, gen)
        if drop_last and len(batches[-1]) < batch_size:
            batches = batches[:-1]
        for idx in batches:
            yield epoch, idx


def _optimizer(params: list[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise MkdtError(f"optimizer must be sgd or adam, got '{cfg.optimizer}'")


@dataclasses.dataclass
class _Inputs:
    """Everything a trajectory needs, already on the device."""

    images: torch.Tensor  # uint8 (for SSL augmentation)
    normalized: torch.Tensor  # float, normalised (for KD)
    targets: torch.Tensor
    augment: BatchAugment


def run_trajectory(objective: str, model: nn.Module, extra: nn.Module, inputs: _Inputs, optim: OptimConfig,
                   stops: list[int], gen: torch.Generator, loss_fn: Callable | None = None,
                   progress: Callable[[int, float], None] | None = None) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Train in place for ``max(stops)`` iterations; returns encoder and head/projector parameters at each
    stop (len(stops) x P, len(stops) x Q) and the mean loss of the iterations before each stop."""
    n = len(inputs.targets)
    bs = min(optim.batch_size, n)
    opt = _optimizer(encoder_parameters(model) + list(extra.parameters()), optim)
    model.train()
    extra.train()
    encoder_snaps, extra_snaps, losses = [], [], []
    window: list[float] = []
    stream = batch_stream(n, bs, gen, drop_last=objective == "ssl")
    for it in range(1, max(stops) + 1):
        epoch, idx = next(stream)
        dev_idx = idx.to(inputs.targets.device)
        if objective == "kd":
            loss = F.mse_loss(extra(model.features(inputs.normalized[dev_idx])), inputs.targets[dev_idx])
        else:
            batch = inputs.images[dev_idx]
            z_a = extra(model.features(inputs.augment(batch, gen)))
            z_b = extra(model.features(inputs.augment(batch, gen)))
            loss = loss_fn(z_a, z_b)
        if not torch.isfinite(loss):
            raise MkdtError(f"{objective} training diverged at iteration {it} (loss {loss.item()}); lower "
                            f"{objective}.lr (now {optim.lr})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        window.append(loss.item())
        if progress is not None:
            progress(it, window[-1])
        if it in stops:
            encoder_snaps.append(_encoder_flat(model))
            extra_snaps.append(flat_parameters(extra).cpu())
            losses.append(sum(window) / len(window))
            window = []
    return torch.stack(encoder_snaps), torch.stack(extra_snaps), losses


def encoder_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The encoder's parameters: everything but the model's linear head (``model.head``)."""
    head = {id(p) for p in model.head.parameters()} if model.head is not None else set()
    return [p for p in model.parameters() if id(p) not in head]


def _encoder_flat(model: nn.Module) -> torch.Tensor:
    """The encoder's parameters as one CPU vector (a copy, never a view)."""
    return torch.cat([p.detach().reshape(-1) for p in encoder_parameters(model)]).cpu().clone()


# ----------------------------------------------------------------------------------------------
# the stage
# ----------------------------------------------------------------------------------------------
def _analyze(config: VarianceConfig, run: StageRun) -> dict[str, Any]:
    """Train the trajectories (keeping finished ones), write ``variance.json`` and ``variance.png``."""
    device = run.device
    data, targets = load_source(config.data, targets_path(config))
    values = targets.values
    if config.max_images and config.max_images < len(data):
        keep = random_indices(len(data), config.max_images, generator(derive_seed(config.seed, "variance", "images")))
        data, values = data.subset(keep), values[keep]
    inputs = _Inputs(data.images.to(device), data.normalize().to(device), values.to(device),
                     BatchAugment(config.augment, data.mean, data.std))
    with seeded(derive_seed(config.seed, "variance", "student")):
        student = build_model(config.model, in_channels=data.channels, resolution=data.resolution,
                              head_dim=values.shape[1]).to(device)
    init_encoder = _encoder_flat(student)
    log = JsonLog(run.path("log.jsonl"))
    results: dict[str, Any] = {}
    for objective in config.objectives:
        stops = _stops(config, objective, len(data))
        runs = [_trajectory(config, run, objective, k, student, inputs, stops, device, log)
                for k in range(config.num_trajectories)]
        results[objective] = _summarise(config, objective, runs, init_encoder, stops)
    report = {"unit": config.unit, "lengths": list(config.lengths), "images": len(data), "data_name": data.name,
              "model": to_dict(config.model), "num_trajectories": config.num_trajectories,
              "objectives": results, "teacher": {k: v for k, v in targets.meta.items() if k != "fingerprint"}}
    save_json(run.output("report", "variance.json"), report)
    _plot(report, run.output("plot", "variance.png"))
    summary: dict[str, Any] = {o: {"variance": r["encoder"]["variance"], "normalized": r["encoder"]["normalized"]}
                               for o, r in results.items()}
    summary["lengths"] = list(config.lengths)
    summary["unit"] = config.unit
    return summary


STAGE = Stage(
    "variance", VarianceConfig, _analyze, "trajectory variance of KD vs SSL training (the paper's Figure 1)",
    folder=lambda config, layout: layout.variance_dir,
    inputs=lambda config, layout: {"targets": targets_path(config)}, input_fields=("targets",),
)


def analyze_variance(config: VarianceConfig) -> StageResult:
    """``<out>/variance/variance.json`` and ``variance.png``."""
    return run_stage(STAGE, config)


def _stops(config: VarianceConfig, objective: str, n: int) -> list[int]:
    """Lengths converted to iteration counts for this objective."""
    if config.unit == "iterations":
        return list(config.lengths)
    bs = min(getattr(config, objective).batch_size, n)
    per_epoch = n // bs if objective == "ssl" else math.ceil(n / bs)
    return [length * per_epoch for length in config.lengths]


def _trajectory(config: VarianceConfig, run: StageRun, objective: str, k: int, student: nn.Module,
                inputs: _Inputs, stops: list[int], device: torch.device, log: JsonLog) -> dict[str, Any]:
    """Run (or load, if already on disk for these settings) trajectory ``k`` of ``objective``."""
    path = run.path(f"{objective}_{k:03d}.safetensors")
    if path.is_file() and read_metadata(path).get("identity") == run.key:  # finished by an interrupted run
        tensors = load_tensors(path)
        meta = read_metadata(path)
        return {"encoder": tensors["encoder"], "extra": tensors["extra"], "init_extra": tensors["init_extra"],
                "losses": meta["losses"], "seconds": meta["seconds"]}
    model = copy.deepcopy(student)
    if objective == "kd":
        extra = model.head  # trained as ``extra`` on top of ``model.features``
        loss_fn = None
    else:
        model.head.requires_grad_(False)
        with seeded(derive_seed(config.seed, "variance", "projector")):
            extra = build_projector(config.objective, model.feature_dim).to(device)
        loss_fn = build_loss(config.objective)
    init_extra = flat_parameters(extra).cpu()
    gen = generator(derive_seed(config.seed, "variance", objective, k))
    t0 = time.perf_counter()
    with run.progress(max(stops), f"variance {objective} trajectory {k}") as bar:
        encoder, extra_snaps, losses = run_trajectory(objective, model, extra, inputs, getattr(config, objective),
                                                      stops, gen, loss_fn, progress=lambda it, loss: bar.update(1))
    seconds = round(time.perf_counter() - t0, 3)
    save_tensors(path, {"encoder": encoder, "extra": extra_snaps, "init_extra": init_extra},
                 {"identity": run.key, "losses": losses, "stops": stops, "seconds": seconds})
    log.write(objective=objective, trajectory=k, stops=stops, losses=losses, seconds=seconds)
    return {"encoder": encoder, "extra": extra_snaps, "init_extra": init_extra, "losses": losses, "seconds": seconds}


def _summarise(config: VarianceConfig, objective: str, runs: list[dict], init_encoder: torch.Tensor,
               stops: list[int]) -> dict[str, Any]:
    encoder: dict[str, list[float]] = {"variance": [], "normalized": [], "displacement": []}
    everything: dict[str, list[float]] = {"variance": [], "normalized": [], "displacement": []}
    init_all = torch.cat([init_encoder, runs[0]["init_extra"]])
    for j in range(len(stops)):
        enc = torch.stack([r["encoder"][j] for r in runs])
        full = torch.cat([enc, torch.stack([r["extra"][j] for r in runs])], dim=1)
        for target, stats in ((encoder, spread(enc, init_encoder)), (everything, spread(full, init_all))):
            for name, value in stats.items():
                target[name].append(value)
    losses = [sum(r["losses"][j] for r in runs) / len(runs) for j in range(len(stops))]
    return {"iterations": stops, "encoder": encoder, "all": everything, "loss": losses,
            "optimizer": dataclasses.asdict(getattr(config, objective)),
            "seconds_per_trajectory": sum(r["seconds"] for r in runs) / len(runs)}


def _plot(report: dict[str, Any], path: Path) -> None:
    """Two panels, variance and normalised variance against trajectory length, one line per objective."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    labels = {"kd": "KD (MSE to teacher)", "ssl": "SSL (Barlow Twins)"}
    for objective, res in report["objectives"].items():
        for ax, key in zip(axes, ("variance", "normalized")):
            ax.plot(report["lengths"], res["encoder"][key], marker="o", label=labels.get(objective, objective))
    axes[0].set_yscale("log")
    axes[0].set_ylabel("mean per-parameter variance")
    axes[1].set_ylabel("variance / squared displacement")
    for ax in axes:
        ax.set_xlabel(f"trajectory length ({report['unit']})")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Trajectory variance across {report['num_trajectories']} runs from one init ({report['data_name']})")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)

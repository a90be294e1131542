"""Typed configs of ``mkdt distill`` and ``mkdt export`` (paper, Section 4 and Appendix: hyperparameters).

Defaults are the paper's CIFAR-10 2% setting; presets in ``presets/distill/`` hold the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mkdt.config import StageConfig, require
from mkdt.models import ModelConfig

INNER_OBJECTIVES = ("kd", "ssl")
PRECISIONS = ("fp32", "bf16", "auto")  # no fp16: the unrolled second-order steps have no loss scaling
MEMORY_SAVING = {"auto": "auto", "true": "on", "yes": "on", "on": "on", "1": "on",
                 "false": "off", "no": "off", "off": "off", "0": "off"}


@dataclass
class DistillConfig(StageConfig):
    """MKDT distillation: learn images, targets and one inner lr by matching expert trajectories."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="convnet", width=128, depth=3))  # student
    experts_dir: str | None = None  # the expert trajectories (default: the run's experts/)
    init: str = "high_loss"  # the initial set: high_loss or random (the run's init/), or a set file
    iterations: int = 5000  # outer updates; raising it later extends a finished run
    syn_steps: int = 40  # inner SGD steps unrolled per trajectory
    expert_epochs: int = 2  # the expert epochs one trajectory segment spans
    max_start_epoch: int = 2  # segments start at an epoch drawn from [0, max_start_epoch)
    trajectories: int = 1  # trajectories matched per update (gradients averaged); with N processes a multiple of N
    lr_img: float = 1000.0  # SGD lr of the images
    lr_targets: float = 1.0  # SGD lr of the targets
    lr_lr: float = 1e-4  # SGD lr of the inner learning rate
    lr_init: float = 0.1  # the inner learning rate's start value
    momentum: float = 0.5  # momentum of the three outer SGDs
    batch_syn: int = 256  # synthetic images per inner step
    learn_targets: bool | None = None  # learn the targets (null: yes with the KD inner objective, no with SSL)
    learn_lr: bool = True  # learn the inner learning rate
    lr_min: float = 1e-4  # the learned lr never goes below this
    augment: bool = False  # differentiable flip/shift of the inner minibatches (KD objective)
    memory_saving: bool | str = "auto"  # exact reverse pass keeping one step alive: true, false or auto (by budget)
    memory_budget_gb: float | None = None  # the budget auto compares the plain path's estimate with (null: device)
    checkpoint_every: int = 100  # iterations between checkpoints (and held-out validation)
    max_bad_steps: int = 5  # consecutive non-finite updates that stop the run
    grid_images: int = 100  # images shown in the grid pictures
    threads: int = 0  # torch intra-op threads (0 = torch default)
    # kd: MSE of the student to the learned targets (MKDT). ssl: the naive MTT-SSL baseline, the SSL loss
    # of two augmented views of each synthetic minibatch, matched against SSL experts (distill/ssl_inner.py)
    inner_objective: str = "kd"
    # Held-out experts (the last N of the folder): never drawn for updates; their matching loss (fixed
    # minibatch plans, every start epoch) is logged as val_loss at the start and at every checkpoint. It is
    # the part of the progress that carries over to networks the set was not fitted to, as the probe's
    # fresh encoder is: a training loss that falls while val_loss stays flat means too few experts.
    validation_experts: int = 0
    name: str | None = None  # a variant's folder distill-<name> (e.g. random_init); null: distill
    # Opt-in fast inner loop (distill/fast.py, KD objective): the reference path's matching loss and gradients
    # (float rounding aside) from cheaper ops; off until its speed-up is measured (benchmarks/speed_vs_baseline.py)
    fast_inner: bool = False
    # autocast of fast_inner's student: fp32, bf16, or auto (bf16 where the hardware runs it natively, else fp32)
    precision: str = "fp32"

    def check(self) -> None:
        """Refuse values that cannot work, naming the key and a fix."""
        for key in ("iterations", "syn_steps", "expert_epochs", "max_start_epoch", "batch_syn", "checkpoint_every",
                    "max_bad_steps", "trajectories"):
            require(getattr(self, key) >= 1, key, "at least 1", getattr(self, key),
                    "zero iterations would report the initial set as distilled" if key == "iterations" else None)
        for key in ("lr_img", "lr_targets", "lr_lr"):
            require(getattr(self, key) >= 0, key, ">= 0", getattr(self, key))
        require(self.lr_init > 0, "lr_init", "positive", self.lr_init)
        require(0 < self.lr_min <= self.lr_init, "lr_min", f"in (0, lr_init={self.lr_init}]", self.lr_min)
        require(0 <= self.momentum < 1, "momentum", "in [0, 1)", self.momentum)
        require(self.threads >= 0, "threads", ">= 0 (0 = torch default)", self.threads)
        require(self.grid_images >= 0, "grid_images", ">= 0", self.grid_images)
        require(self.validation_experts >= 0, "validation_experts", ">= 0", self.validation_experts)
        require(self.memory_budget_gb is None or self.memory_budget_gb > 0, "memory_budget_gb", "positive or null",
                self.memory_budget_gb)
        require(str(self.memory_saving).strip().lower() in MEMORY_SAVING, "memory_saving", "auto, true or false",
                self.memory_saving)
        require(self.inner_objective in INNER_OBJECTIVES, "inner_objective", "kd or ssl", self.inner_objective)
        require(self.name is None or self.name.replace("_", "").replace("-", "").isalnum(), "name",
                "letters, digits, '-' or '_'", self.name)
        require(self.precision in PRECISIONS, "precision", "fp32, bf16 or auto", self.precision)
        require(self.precision == "fp32" or self.fast_inner, "precision", "fp32 unless fast_inner is true",
                self.precision, "the reference path runs in float32")
        if self.inner_objective == "ssl":
            require(not self.fast_inner, "fast_inner", "false with inner_objective ssl", self.fast_inner,
                    "the fast path implements the KD objective only")
            require(memory_saving_mode(self.memory_saving) != "on", "memory_saving",
                    "false or auto with inner_objective ssl", self.memory_saving,
                    "the memory-saving pass implements the KD objective only")
            require(not self.augment, "augment", "false with inner_objective ssl", self.augment,
                    "the SSL views use the experts' own augmentation")
            require(not self.learn_targets, "learn_targets", "false or null with inner_objective ssl",
                    self.learn_targets, "the SSL inner loss does not use targets")

    @property
    def targets_learned(self) -> bool:
        return self.inner_objective == "kd" if self.learn_targets is None else bool(self.learn_targets)

    @property
    def memory_mode(self) -> str:
        """on, off or auto; the SSL objective has the plain path only, so its auto means off."""
        mode = memory_saving_mode(self.memory_saving)
        return "off" if mode == "auto" and self.inner_objective == "ssl" else mode


def memory_saving_mode(value: Any) -> str:
    """``memory_saving`` as one of "auto", "on", "off" (accepts booleans and yes/no/true/false strings)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return MEMORY_SAVING[str(value).strip().lower()]


@dataclass
class ExportConfig(StageConfig):
    """Export a distilled set: ``png`` (one PNG per image), ``pt`` (images.pt / labels.pt / lr.pt) or ``both``."""

    input: str | None = None  # the set file (default: the run's distill/distilled.safetensors)
    format: str = "both"  # png, pt or both
    dest: str | None = None  # the export folder (default: the run's export/)

    def check(self) -> None:
        require(self.format in ("png", "pt", "both"), "format", "png, pt or both", self.format)

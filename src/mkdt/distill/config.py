"""Typed configs of ``mkdt distill`` and ``mkdt export`` (REFERENCE.md section 1.5).

Defaults are the paper's CIFAR-10 2% setting; presets in ``presets/distill/`` hold the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mkdt.config import StageConfig
from mkdt.errors import MkdtError
from mkdt.models import ModelConfig

# Config fields that do not change the mathematics of the run: a checkpoint written under other
# values of these may be resumed (``iterations`` may be raised to extend a finished run).
RESUMABLE_FIELDS = ("iterations", "checkpoint_every", "device", "memory_saving", "memory_budget_gb",
                    "max_bad_steps", "grid_images", "out", "threads")
INNER_OBJECTIVES = ("kd", "ssl")


@dataclass
class DistillConfig(StageConfig):
    """MKDT distillation: learn images, targets and one inner lr by matching expert trajectories."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="convnet", width=128, depth=3))
    experts_dir: str | None = None
    init: str = "high_loss"
    iterations: int = 5000
    syn_steps: int = 40
    expert_epochs: int = 2
    max_start_epoch: int = 2
    lr_img: float = 1000.0
    lr_targets: float = 1.0
    lr_lr: float = 1e-4
    lr_init: float = 0.1
    momentum: float = 0.5
    batch_syn: int = 256
    learn_targets: bool = True
    learn_lr: bool = True
    lr_min: float = 1e-4
    augment: bool = False
    memory_saving: bool | str = "auto"
    memory_budget_gb: float | None = None
    checkpoint_every: int = 100
    max_bad_steps: int = 5
    grid_images: int = 100
    threads: int | None = None
    # kd: MSE of the student to the learned targets (MKDT). ssl: the naive MTT-SSL baseline, the SSL loss
    # of two augmented views of each synthetic minibatch, matched against SSL experts (distill/ssl_inner.py)
    inner_objective: str = "kd"
    # Held-out experts (the last N of the folder): never drawn for updates; their matching loss (fixed
    # minibatch plans, every start epoch) is logged as val_loss at the start and at every checkpoint. It is
    # the part of the progress that carries over to networks the set was not fitted to, as the probe's
    # fresh encoder is: a training loss that falls while val_loss stays flat means too few experts.
    validation_experts: int = 0

    def __post_init__(self) -> None:
        """With the SSL inner objective, targets are unused (never learned) and ``memory_saving: auto``
        means the plain path (the memory-saving reverse pass implements only the KD objective)."""
        if self.inner_objective == "ssl":
            self.learn_targets = False
            if str(self.memory_saving).strip().lower() == "auto":
                self.memory_saving = False

    def check(self) -> None:
        """Refuse values that cannot work, naming the key and a fix."""
        positive_ints = ("syn_steps", "expert_epochs", "max_start_epoch", "batch_syn", "checkpoint_every",
                         "max_bad_steps")
        for name in positive_ints:
            if int(getattr(self, name)) < 1:
                raise MkdtError(f"distill config '{name}' must be at least 1, got {getattr(self, name)}")
        if self.iterations < 0:
            raise MkdtError(f"distill config 'iterations' must be >= 0, got {self.iterations}")
        for name in ("lr_img", "lr_targets", "lr_lr"):
            if not getattr(self, name) >= 0:
                raise MkdtError(f"distill config '{name}' must be >= 0, got {getattr(self, name)}")
        if not self.lr_init > 0:
            raise MkdtError(f"distill config 'lr_init' must be positive, got {self.lr_init}")
        if not 0 < self.lr_min <= self.lr_init:
            raise MkdtError(f"distill config 'lr_min' must be in (0, lr_init={self.lr_init}], got {self.lr_min}")
        if not 0 <= self.momentum < 1:
            raise MkdtError(f"distill config 'momentum' must be in [0, 1), got {self.momentum}")
        if self.threads is not None and self.threads < 1:
            raise MkdtError(f"distill config 'threads' must be >= 1 (or null for torch's default), got {self.threads}")
        if self.grid_images < 0:
            raise MkdtError(f"distill config 'grid_images' must be >= 0, got {self.grid_images}")
        if self.validation_experts < 0:
            raise MkdtError(f"distill config 'validation_experts' must be >= 0, got {self.validation_experts}")
        if self.memory_budget_gb is not None and not self.memory_budget_gb > 0:
            raise MkdtError(f"distill config 'memory_budget_gb' must be positive, got {self.memory_budget_gb}")
        memory_saving_mode(self.memory_saving)
        self._check_inner_objective()

    def _check_inner_objective(self) -> None:
        if self.inner_objective not in INNER_OBJECTIVES:
            raise MkdtError(f"distill config 'inner_objective' must be kd or ssl, got {self.inner_objective!r}")
        if self.inner_objective != "ssl":
            return
        if memory_saving_mode(self.memory_saving) == "on":
            raise MkdtError("distill config: memory_saving is not supported with inner_objective ssl (the "
                            "memory-saving pass implements the KD objective only); set memory_saving=false")
        if self.augment:
            raise MkdtError("distill config: augment (the KD path's flip/shift) is not used with inner_objective "
                            "ssl, whose two views use the experts' own SSL augmentation; set augment=false")


def memory_saving_mode(value: Any) -> str:
    """``memory_saving`` as one of "auto", "on", "off" (accepts booleans and yes/no/true/false strings)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    text = str(value).strip().lower()
    if text == "auto":
        return "auto"
    if text in ("true", "yes", "on", "1"):
        return "on"
    if text in ("false", "no", "off", "0"):
        return "off"
    raise MkdtError(f"distill config 'memory_saving' must be auto, true or false, got {value!r}")


def resume_key(config_dict: dict) -> dict:
    """The part of a config a checkpoint must agree with to be resumed.

    ``inner_objective: kd`` is left out, so checkpoints written before the option existed still resume.
    """
    key = {k: v for k, v in config_dict.items() if k not in RESUMABLE_FIELDS}
    if key.get("inner_objective") == "kd":
        del key["inner_objective"]
    return key


@dataclass
class ExportConfig(StageConfig):
    """Export a distilled set: ``png`` (one PNG per image), ``pt`` (images.pt / labels.pt / lr.pt) or ``both``."""

    input: str | None = None
    format: str = "both"
    dest: str | None = None

    def check(self) -> None:
        if self.format not in ("png", "pt", "both"):
            raise MkdtError(f"export config 'format' must be png, pt or both, got {self.format!r}")


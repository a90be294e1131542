"""Knowledge-distillation regression training: one loop and one SGD schedule shared by experts,
pre-training and baselines.

MKDT's experts, the evaluation's pre-training on a distilled set or a real subset, and the full-data
upper bound all train an encoder (+ linear head) with MSE to per-image targets using SGD with
momentum and weight decay. Keeping that loop in one place keeps their mathematics identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mkdt.config import require
from mkdt.errors import MkdtError


@dataclass
class RegressionSchedule:
    """SGD settings of the KD objective (the paper's: lr 0.1, momentum 0.9, wd 1e-4, batch 256, 20 epochs)."""

    epochs: int = 20  # passes over the set
    lr: float | None = 0.1  # learning rate (pre-training: null = the set's learned lr, or 0.1)
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 1e-4  # SGD weight decay
    batch_size: int = 256  # minibatch size

    def check(self) -> None:
        require(self.epochs >= 1, "epochs", "at least 1", self.epochs)
        require(self.lr is None or self.lr > 0, "lr", "positive", self.lr)
        require(0 <= self.momentum < 1, "momentum", "in [0, 1)", self.momentum)
        require(self.weight_decay >= 0, "weight_decay", ">= 0", self.weight_decay)
        require(self.batch_size >= 1, "batch_size", "at least 1", self.batch_size)


def check_regression_data(images: torch.Tensor, targets: torch.Tensor, where: str = "training data") -> None:
    if images.dim() != 4 or targets.dim() != 2 or len(images) != len(targets):
        raise MkdtError(f"{where}: need N x C x H x W images and N x D targets, got {tuple(images.shape)} "
                        f"and {tuple(targets.shape)}")
    if len(images) == 0:
        raise MkdtError(f"{where}: no images to train on")


def batch_order(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """One epoch's minibatch indices: a seeded permutation cut into batches (last one may be short)."""
    return list(torch.randperm(n, generator=generator).split(batch_size))


def train_regression(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    schedule: RegressionSchedule,
    generator: torch.Generator,
    *,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    on_epoch_end: Callable[[int, nn.Module, float], None] | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train ``model`` in place with MSE(model(x), y); returns the mean loss of every epoch.

    ``images`` are normalised floats (on any device; batches are moved to the model's device);
    ``transform`` (e.g. a crop/flip augmentation) is applied to each batch; ``on_epoch_end(epoch,
    model, loss)`` lets callers snapshot parameters (epoch counts from 1).
    """
    check_regression_data(images, targets)
    device = next(model.parameters()).device
    opt = torch.optim.SGD(model.parameters(), lr=schedule.lr, momentum=schedule.momentum,
                          weight_decay=schedule.weight_decay)
    losses = []
    model.train()
    for epoch in range(1, schedule.epochs + 1):
        total, count = 0.0, 0
        for idx in batch_order(len(images), schedule.batch_size, generator):
            x = images[idx].to(device, non_blocking=True)
            y = targets[idx].to(device, non_blocking=True)
            if transform is not None:
                x = transform(x)
            loss = F.mse_loss(model(x), y)
            if not torch.isfinite(loss):
                raise MkdtError(f"training diverged at epoch {epoch} (loss {loss.item()}); lower the lr "
                                f"(currently {schedule.lr})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            count += len(idx)
        losses.append(total / count)
        if progress is not None:
            progress(epoch, losses[-1])
        if on_epoch_end is not None:
            on_epoch_end(epoch, model, losses[-1])
    return losses

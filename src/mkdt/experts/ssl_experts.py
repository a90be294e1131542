"""MTT-SSL experts (the paper, Section 4.1: "MTT-SSL (naive)"): student trajectories trained with the SSL loss itself.

The paper's negative result: trajectory matching exactly as MKDT, but each expert is the student backbone
(``experts.model`` without a head) plus an SSL projector trained with Barlow Twins (or SimCLR) on two
augmented views of the same real images; no teacher targets are read. Everything else is the KD experts'
recipe, so that only the objective differs: the same init / minibatch-order seeds, plain SGD with the
experts' lr, momentum and weight decay on every parameter, constant lr, one snapshot per epoch.

Why the projector is stored and matched: the SSL loss is defined on the projections, so a student
unrolled from an expert's epoch-t state needs that expert's projector at epoch t (a fresh one would be a
different objective); and MKDT matches every stored parameter, its linear head included, so MTT-SSL
matches backbone + projector alike (its closest analogue; leaving the projector out of the distance
would let it drift unconstrained). The trajectory therefore holds one flat vector of :class:`SSLStudent`
("backbone.*" then "projector.*"). With the default Barlow Twins projector the projector holds most of
the parameters; ``ssl.objective.projector_hidden`` / ``projector_out`` shrink it.

Augmentation: :class:`mkdt.ssl.BatchAugment` (random resized crop, flip, colour jitter, grayscale) with
explicit parameters, applied to the normalised images mapped back to pixels (:func:`view`). Distillation
uses the same function on the synthetic images, so experts and inner steps see the same kind of views.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from mkdt.data import load_dataset
from mkdt.data.imageset import ImageSet
from mkdt.errors import MkdtError
from mkdt.models.functional import ParamLayout
from mkdt.runtime import derive_seed
from mkdt.ssl.augment import BatchAugment
from mkdt.ssl.objectives import build_loss
from mkdt.ssl.student import SSLStudent, SslExpertSettings, build_student, sample_views, two_view_loss
from mkdt.training import RegressionSchedule, batch_order

OBJECTIVES = ("kd", "ssl")


def augment_seed(seed: int, index: int) -> int:
    """Expert ``index``'s augmentation stream (init and order streams are the KD experts' ones)."""
    return derive_seed(seed, "expert", index, "augment")


def describe(config: Any) -> tuple[ImageSet, ParamLayout, dict[str, Any]]:
    """For ``prepare``: the source data, the SSL student's layout and the settings an expert file records.

    No targets: an SSL expert never reads them. The settings (and so ``settings_digest``) include
    ``objective: ssl`` and the SSL settings, so KD and SSL experts are never mixed on resume.
    """
    data = load_dataset(config.data)
    probe = build_student(config.model, config.ssl, data.channels, data.resolution, seed=0)
    layout = ParamLayout.of(probe)
    settings = {
        "objective": "ssl", "ssl": config.ssl.to_meta(), "model": config.model.to_dict(),
        "in_channels": data.channels, "resolution": data.resolution, "seed": config.seed,
        "fingerprint": data.fingerprint(), "mean": list(data.mean), "std": list(data.std),
        "lr": config.schedule.lr, "momentum": config.schedule.momentum,
        "weight_decay": config.schedule.weight_decay, "batch_size": config.schedule.batch_size,
        "trained_epochs": config.trained_epochs,
        "stored_epochs": list(range(config.trained_epochs + 1)),
    }
    return data, layout, settings


def train_ssl(
    student: SSLStudent,
    images: torch.Tensor,
    settings: SslExpertSettings,
    schedule: RegressionSchedule,
    mean: Sequence[float],
    std: Sequence[float],
    order: torch.Generator,
    augment_generator: torch.Generator,
    *,
    on_epoch_end: Callable[[int, nn.Module, float], None] | None = None,
) -> list[float]:
    """Train ``student`` in place with the SSL loss on normalised ``images``; returns each epoch's mean loss.

    The KD experts' loop (:func:`mkdt.training.train_regression`) with the loss swapped: same SGD, same
    seeded minibatch order. A last minibatch of ONE image is skipped (batch norm and the cross-correlation
    need two); ``on_epoch_end(epoch, student, loss)`` snapshots as in the KD loop.
    """
    if len(images) < 2:
        raise MkdtError(f"SSL experts need at least 2 images, got {len(images)}")
    device = next(student.parameters()).device
    augment = BatchAugment(settings.augment, mean, std)
    loss_fn = build_loss(settings.objective)
    opt = torch.optim.SGD(student.parameters(), lr=schedule.lr, momentum=schedule.momentum,
                          weight_decay=schedule.weight_decay)
    losses = []
    student.train()
    for epoch in range(1, schedule.epochs + 1):
        total, count = 0.0, 0
        for idx in batch_order(len(images), schedule.batch_size, order):
            if len(idx) < 2:
                continue
            x = images[idx].to(device, non_blocking=True)
            loss = two_view_loss(student, loss_fn, augment, x, sample_views(augment, x, augment_generator))
            if not torch.isfinite(loss):
                raise MkdtError(f"SSL expert training diverged at epoch {epoch} (loss {loss.item()}); lower the "
                                f"lr (currently {schedule.lr})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            count += len(idx)
        losses.append(total / count)
        if on_epoch_end is not None:
            on_epoch_end(epoch, student, losses[-1])
    return losses


__all__ = ["OBJECTIVES", "augment_seed", "describe", "train_ssl"]

"""An SSL student as one module (backbone + projector) and its two-view loss, differentiable in the images.

Shared by the naive MTT-SSL baseline's two halves: the SSL experts (:mod:`mkdt.experts.ssl_experts`)
train it, and distillation (:mod:`mkdt.distill.ssl_inner`) unrolls it functionally on synthetic images,
so both see exactly the same objective, projector and kind of views.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from mkdt.config import from_dict, to_dict
from mkdt.models import ModelConfig, build_model
from mkdt.runtime import seeded
from mkdt.ssl.augment import AugmentConfig, BatchAugment
from mkdt.ssl.objectives import ObjectiveConfig, SSLLoss, build_projector


@dataclass
class SslExpertSettings:
    """``experts.ssl``: the SSL objective (projector widths, loss) and the two-view augmentation."""

    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def to_meta(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> "SslExpertSettings":
        return from_dict(cls, meta)


class SSLStudent(nn.Module):
    """Backbone + projector as ONE module, so one flat vector (a :class:`ParamLayout`) holds both."""

    def __init__(self, backbone: nn.Module, projector: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.projector = projector

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone.features(x))


def build_student(model: ModelConfig, settings: SslExpertSettings, in_channels: int, resolution: int,
                  seed: int) -> SSLStudent:
    """An SSL student at a seeded init: the backbone (no head), then the projector, from one seed."""
    with seeded(seed):
        backbone = build_model(model, in_channels=in_channels, resolution=resolution)
        projector = build_projector(settings.objective, backbone.feature_dim)
    return SSLStudent(backbone, projector)


def view(augment: BatchAugment, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """One augmented view of NORMALISED images, differentiable in ``x``: to pixels, augment, normalise.

    No clamping before the augmentation: synthetic images may leave [0, 1] and keep their gradient
    (only the colour operations clamp, as they do for real images).
    """
    mean = torch.tensor(augment.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(augment.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return augment.normalize(augment.apply(x * std + mean, params))


def sample_views(augment: BatchAugment, x: torch.Tensor, generator: torch.Generator) -> tuple[dict, dict]:
    """The random parameters of two independent views of the minibatch ``x`` (drawn on the CPU)."""
    n, _, h, w = x.shape
    return augment.sample(n, h, w, generator), augment.sample(n, h, w, generator)


def two_view_loss(forward: Callable[[torch.Tensor], torch.Tensor], loss_fn: SSLLoss, augment: BatchAugment,
                  x: torch.Tensor, views: tuple[dict, dict]) -> torch.Tensor:
    """The SSL loss of a minibatch: ``loss(forward(view_a), forward(view_b))``, one forward per view (the
    projector's batch norm sees each view alone, as in :class:`mkdt.ssl.SSLTrainer`). Shared by the
    experts (``forward`` = the module) and distillation (the functional student at theta)."""
    params_a, params_b = views
    return loss_fn(forward(view(augment, x, params_a)), forward(view(augment, x, params_b)))


__all__ = ["SSLStudent", "SslExpertSettings", "build_student", "sample_views", "two_view_loss", "view"]

"""SSL objectives (Barlow Twins, SimCLR) and their projection heads, built from lightly's modules.

lightly's ``BarlowTwinsLoss`` computes ``sum_i (1 - C_ii)^2 + lambda_param * sum_{i != j} C_ij^2`` on
the cross-correlation ``C`` of the batch-standardised projections, so ``lambda_param`` is exactly the
off-diagonal weight of REFERENCE (1/128, the mix-bt value). Projectors follow REFERENCE: Barlow
Twins Linear(no bias)-BN-ReLU-Linear to 1024 with a 512 hidden layer (mix-bt's CIFAR head); SimCLR
Linear-BN-ReLU-Linear-BN to 128.

Losses are evaluated in float32 even under autocast: the Barlow Twins cross-correlation and the
NT-Xent softmax lose too much precision in bfloat16/float16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from lightly.loss import BarlowTwinsLoss, NTXentLoss
from lightly.models.modules.heads import ProjectionHead, SimCLRProjectionHead
from torch import nn

from mkdt.errors import MkdtError

OBJECTIVES = ("barlow_twins", "simclr")
# (hidden, output) widths of the projector when the config leaves them unset.
DEFAULT_PROJECTOR = {"barlow_twins": (512, 1024), "simclr": (512, 128)}


@dataclass
class ObjectiveConfig:
    """Which SSL loss, its projector widths and its one hyperparameter."""

    name: str = "barlow_twins"
    projector_hidden: int | None = None
    projector_out: int | None = None
    lambda_offdiag: float = 1 / 128
    temperature: float = 0.5

    def check(self) -> None:
        if self.name not in OBJECTIVES:
            raise MkdtError(f"unknown objective.name '{self.name}'; choose one of {', '.join(OBJECTIVES)}")
        if self.temperature <= 0:
            raise MkdtError(f"objective.temperature must be positive, got {self.temperature}")
        if self.lambda_offdiag < 0:
            raise MkdtError(f"objective.lambda_offdiag must be >= 0, got {self.lambda_offdiag}")

    def projector_dims(self) -> tuple[int, int]:
        hidden, out = DEFAULT_PROJECTOR[self.name]
        return self.projector_hidden or hidden, self.projector_out or out


def build_projector(config: ObjectiveConfig, feature_dim: int) -> nn.Module:
    """The projection head that sits between the representation and the loss (discarded afterwards)."""
    config.check()
    hidden, out = config.projector_dims()
    if config.name == "barlow_twins":
        return ProjectionHead([(feature_dim, hidden, nn.BatchNorm1d(hidden), nn.ReLU()), (hidden, out, None, None)])
    return SimCLRProjectionHead(feature_dim, hidden, out, num_layers=2, batch_norm=True)


class SSLLoss(nn.Module):
    """Two-view loss ``loss(z_a, z_b)`` evaluated in float32."""

    def __init__(self, config: ObjectiveConfig):
        super().__init__()
        config.check()
        self.name = config.name
        if config.name == "barlow_twins":
            self.loss: nn.Module = BarlowTwinsLoss(lambda_param=config.lambda_offdiag)
        else:
            self.loss = NTXentLoss(temperature=config.temperature, memory_bank_size=0)

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=z_a.device.type, enabled=False):
            return self.loss(z_a.float(), z_b.float())


def build_loss(config: ObjectiveConfig) -> SSLLoss:
    return SSLLoss(config)

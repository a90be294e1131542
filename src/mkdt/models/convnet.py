"""The ConvNet student of the dataset-distillation literature.

depth blocks of Conv3x3(width, padding 1) -> norm -> ReLU -> pool; flatten; optional linear head.
"instancenorm" is GroupNorm(width, width, affine=True), as in the reference implementation, so the
model has no running statistics and behaves the same in train and eval mode (needed for functional,
unrolled training of students).
"""

from __future__ import annotations

import torch
from torch import nn

from mkdt.errors import MkdtError

NORMS = ("instancenorm", "batchnorm", "groupnorm", "none")
POOLS = ("avgpool", "maxpool", "none")


def _norm(kind: str, width: int) -> nn.Module:
    if kind == "instancenorm":
        return nn.GroupNorm(width, width, affine=True)
    if kind == "batchnorm":
        return nn.BatchNorm2d(width)
    if kind == "groupnorm":
        return nn.GroupNorm(min(32, width), width, affine=True)
    if kind == "none":
        return nn.Identity()
    raise MkdtError(f"unknown norm '{kind}'; choose one of {', '.join(NORMS)}")


def _pool(kind: str) -> nn.Module:
    if kind == "avgpool":
        return nn.AvgPool2d(2, 2)
    if kind == "maxpool":
        return nn.MaxPool2d(2, 2)
    if kind == "none":
        return nn.Identity()
    raise MkdtError(f"unknown pool '{kind}'; choose one of {', '.join(POOLS)}")


class ConvNet(nn.Module):
    """ConvNet(depth, width, norm, pool) with an optional linear head to ``head_dim``."""

    def __init__(
        self,
        depth: int = 3,
        width: int = 128,
        norm: str = "instancenorm",
        pool: str = "avgpool",
        in_channels: int = 3,
        resolution: int = 32,
        head_dim: int | None = None,
    ):
        super().__init__()
        if depth < 1 or width < 1:
            raise MkdtError(f"ConvNet depth and width must be positive, got depth={depth} width={width}")
        shrink = 2**depth if pool != "none" else 1
        if resolution < shrink or resolution % shrink:
            raise MkdtError(
                f"ConvNet depth {depth} with {pool} needs a resolution divisible by {shrink}, got {resolution}; "
                f"resize the data (--set data.resolution=...) or lower the depth"
            )
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(depth):
            layers += [nn.Conv2d(channels, width, 3, padding=1), _norm(norm, width), nn.ReLU(inplace=False),
                       _pool(pool)]
            channels = width
        self.body = nn.Sequential(*layers)
        side = resolution // shrink
        self.feature_dim = width * side * side
        self.head = nn.Linear(self.feature_dim, head_dim) if head_dim else None
        self.out_dim = head_dim or self.feature_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened penultimate features (what the linear probe reads)."""
        return self.body(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        return self.head(f) if self.head is not None else f

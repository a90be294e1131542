"""ResNet-10/18 with the CIFAR stem (3x3 conv, stride 1, no max-pool), built from torchvision blocks.

``width`` is the channel count of the first stage (64 in the standard model); the representation is
the globally pooled ``8 * width`` feature.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from mkdt.errors import MkdtError

LAYERS = {"resnet10": [1, 1, 1, 1], "resnet18": [2, 2, 2, 2]}


class CifarResNet(ResNet):
    """torchvision ResNet with a CIFAR stem, variable width and an optional linear head."""

    def __init__(
        self,
        arch: str = "resnet18",
        width: int = 64,
        in_channels: int = 3,
        resolution: int = 32,
        head_dim: int | None = None,
        norm: str = "batchnorm",
    ):
        if arch not in LAYERS:
            raise MkdtError(f"unknown ResNet '{arch}'; choose one of {', '.join(LAYERS)}")
        if resolution < 8:
            raise MkdtError(f"{arch} needs a resolution of at least 8 pixels, got {resolution}")
        if norm == "batchnorm":
            norm_layer = nn.BatchNorm2d
        elif norm == "groupnorm":
            def norm_layer(c: int) -> nn.Module:
                return nn.GroupNorm(min(32, c), c)
        else:
            raise MkdtError(f"ResNet norm must be batchnorm or groupnorm, got '{norm}'")
        super().__init__(BasicBlock, LAYERS[arch], num_classes=1, width_per_group=64, norm_layer=norm_layer)
        # torchvision hard-codes 64 channels per stage 1; rebuild the stages at the requested width.
        self.inplanes = width
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = norm_layer(width)
        self.maxpool = nn.Identity()
        self.layer1 = self._make_layer(BasicBlock, width, LAYERS[arch][0])
        self.layer2 = self._make_layer(BasicBlock, width * 2, LAYERS[arch][1], stride=2)
        self.layer3 = self._make_layer(BasicBlock, width * 4, LAYERS[arch][2], stride=2)
        self.layer4 = self._make_layer(BasicBlock, width * 8, LAYERS[arch][3], stride=2)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.feature_dim = width * 8
        self.fc = nn.Linear(self.feature_dim, head_dim) if head_dim else nn.Identity()
        self.out_dim = head_dim or self.feature_dim

    @property
    def head(self) -> nn.Module | None:
        """The linear head (``fc``), or ``None`` for a bare encoder."""
        return self.fc if isinstance(self.fc, nn.Linear) else None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))

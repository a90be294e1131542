"""Backbones by name from torchvision (``torchvision:<name>``) and timm (``timm:<name>``, when installed).

Why a wrapper: the stages need ``features(x)`` (flattened penultimate features), ``feature_dim``,
``out_dim`` and ``head`` (a linear head to ``head_dim``, or ``None``), and a first layer that takes the
data's channels. A torchvision classifier's last ``nn.Linear`` (``fc``, ``classifier[-1]``,
``heads.head``) is replaced by the identity, so the pooled features it received are the representation,
and its first ``nn.Conv2d`` is rebuilt for ``in_channels`` when they differ. timm builds the same with
``num_classes=0`` and ``in_chans``. Weights are always freshly initialised (``weights=None``,
``pretrained=False``): nothing is downloaded; an SSL teacher imported from a file is ``mkdt teacher --import``.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from mkdt.errors import MkdtError

PREFIXES = ("torchvision:", "timm:")


class ExternalEncoder(nn.Module):
    """A backbone returning pooled features, with the interface of mkdt's own models."""

    def __init__(self, backbone: nn.Module, feature_dim: int, head_dim: int | None):
        super().__init__()
        self.backbone = backbone
        self.feature_dim = int(feature_dim)
        self.head = nn.Linear(self.feature_dim, head_dim) if head_dim else None
        self.out_dim = head_dim or self.feature_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.backbone(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        return self.head(f) if self.head is not None else f


def _replace(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _adapt_first_conv(model: nn.Module, in_channels: int, name: str) -> None:
    first = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        raise MkdtError(f"model {name}: no Conv2d layer to take {in_channels}-channel images; "
                        f"choose a convolutional model")
    path, conv = first
    if conv.in_channels == in_channels:
        return
    if conv.groups != 1:
        raise MkdtError(f"model {name}: its first convolution is grouped; use data.channels={conv.in_channels}")
    _replace(model, path, nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                                    conv.dilation, 1, conv.bias is not None, conv.padding_mode))


def torchvision_names() -> list[str]:
    import torchvision.models as tvm

    return sorted(tvm.list_models(module=tvm))


def build_torchvision(name: str, in_channels: int, head_dim: int | None) -> ExternalEncoder:
    """``torchvision.models.<name>`` (classification models) without its classifier, fresh weights."""
    import torchvision.models as tvm

    if name not in torchvision_names():
        from mkdt.config import did_you_mean

        raise MkdtError(f"unknown torchvision model '{name}'{did_you_mean(name, torchvision_names())}; see "
                        f"torchvision.models.list_models(module=torchvision.models)")
    model = tvm.get_model(name, weights=None)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise MkdtError(f"model torchvision:{name} has no linear classifier to take features from; choose another")
    path, last = linears[-1]
    _replace(model, path, nn.Identity())
    _adapt_first_conv(model, in_channels, f"torchvision:{name}")
    return ExternalEncoder(model, last.in_features, head_dim)


def timm_available() -> bool:
    return importlib.util.find_spec("timm") is not None


def build_timm(name: str, in_channels: int, head_dim: int | None) -> ExternalEncoder:
    """``timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_channels)``."""
    if not timm_available():
        raise MkdtError(f"model timm:{name} needs the timm package, which is not installed; `pip install timm`")
    import timm

    if not timm.is_model(name):
        raise MkdtError(f"unknown timm model '{name}'; see timm.list_models()")
    model = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_channels)
    return ExternalEncoder(model, model.num_features, head_dim)


def check_name(name: str) -> str | None:
    """Why ``torchvision:<x>`` / ``timm:<x>`` cannot be built here (``None`` when it can)."""
    prefix, _, model = name.partition(":")
    if prefix == "torchvision":
        return None if model in torchvision_names() else "a torchvision classification model name"
    if prefix == "timm":
        if not timm_available():
            return "a timm model name (timm is not installed: `pip install timm`)"
        import timm

        return None if timm.is_model(model) else "a timm model name (see timm.list_models())"
    return "a registered model name"


def build_external(name: str, in_channels: int, head_dim: int | None) -> ExternalEncoder:
    prefix, _, model = name.partition(":")
    return build_torchvision(model, in_channels, head_dim) if prefix == "torchvision" else \
        build_timm(model, in_channels, head_dim)

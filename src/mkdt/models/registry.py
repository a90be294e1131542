"""``build_model(name, ...)``: one registry for every network the stages use."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

from torch import nn

from mkdt.errors import MkdtError
from mkdt.models.convnet import ConvNet
from mkdt.models.external import PREFIXES, build_external, check_name, timm_available
from mkdt.models.resnet import CifarResNet


@dataclass
class ModelConfig:
    """Architecture choice; fields a model does not use are ignored by it."""

    # a registered name (see `mkdt list`), torchvision:<name> (e.g. torchvision:resnet18) or timm:<name>
    # (when timm is installed): fresh weights, first conv adapted to the data's channels
    name: str = "convnet"
    width: int | None = None  # None = the model's standard width (ConvNet 128, ResNet 64)
    depth: int = 3
    norm: str = "instancenorm"
    pool: str = "avgpool"

    def check(self) -> None:
        from mkdt.config import require

        if isinstance(self.name, str) and self.name.startswith(PREFIXES):
            want = check_name(self.name)
            require(want is None, "name", want or "", self.name)
            return
        require(self.name in MODELS, "name", f"one of {', '.join(available_models())}", self.name,
                "or torchvision:<name>, timm:<name>, or register your own with mkdt.models.register_model")
        require(self.width is None or self.width >= 1, "width", "at least 1 or null", self.width)
        require(self.depth >= 1, "depth", "at least 1", self.depth)

    def to_dict(self) -> dict:
        return asdict(self)


def _convnet(cfg: ModelConfig, in_channels: int, resolution: int, head_dim: int | None) -> nn.Module:
    return ConvNet(cfg.depth, cfg.width or 128, cfg.norm, cfg.pool, in_channels, resolution, head_dim)


def _convnet_depth(depth: int) -> Callable[..., nn.Module]:
    def build(cfg: ModelConfig, in_channels: int, resolution: int, head_dim: int | None) -> nn.Module:
        return ConvNet(depth, cfg.width or 128, cfg.norm, cfg.pool, in_channels, resolution, head_dim)

    return build


def _resnet(arch: str) -> Callable[..., nn.Module]:
    def build(cfg: ModelConfig, in_channels: int, resolution: int, head_dim: int | None) -> nn.Module:
        norm = cfg.norm if cfg.norm in ("batchnorm", "groupnorm") else "batchnorm"
        return CifarResNet(arch, cfg.width or 64, in_channels, resolution, head_dim, norm)

    return build


MODELS: dict[str, Callable[..., nn.Module]] = {
    "convnet": _convnet,
    "convnet_d3": _convnet_depth(3),
    "convnet_d4": _convnet_depth(4),
    "resnet10": _resnet("resnet10"),
    "resnet18": _resnet("resnet18"),
}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: make ``builder(cfg, in_channels, resolution, head_dim) -> nn.Module`` a model name.

    The module must provide ``features(x)`` (flattened penultimate features), ``feature_dim``,
    ``out_dim`` and ``head`` (``None`` without a head), as the built-in models do.
    """
    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        existing = MODELS.get(name)
        if existing is not None and existing is not builder:
            raise ValueError(f"model '{name}' is already registered")
        MODELS[name] = builder
        return builder

    return decorate


def available_models() -> list[str]:
    """Registered names, then the name patterns of torchvision's and (when installed) timm's models."""
    return sorted(MODELS) + ["torchvision:<name>"] + (["timm:<name>"] if timm_available() else [])


def build_model(
    name: str | ModelConfig,
    *,
    in_channels: int = 3,
    resolution: int = 32,
    head_dim: int | None = None,
    **overrides,
) -> nn.Module:
    """Build a registered model. ``name`` is a registry name or a :class:`ModelConfig`.

    Every model exposes ``features(x)`` (flattened penultimate features), ``feature_dim``, ``out_dim``
    and ``head`` (``None`` without a head). Weights are drawn from torch's global generator: seed it
    (``torch.manual_seed``) or use :func:`mkdt.runtime.seeded` around the call for reproducible inits.
    """
    cfg = name if isinstance(name, ModelConfig) else ModelConfig(name=name)
    if overrides:
        cfg = ModelConfig(**{**cfg.to_dict(), **overrides})
    if cfg.name.startswith(PREFIXES):
        return build_external(cfg.name, in_channels, head_dim)
    if cfg.name not in MODELS:
        raise MkdtError(f"unknown model '{cfg.name}'; choose one of {', '.join(available_models())}")
    return MODELS[cfg.name](cfg, in_channels, resolution, head_dim)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

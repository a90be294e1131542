"""Students as flat parameter vectors, run through ``torch.func.functional_call``.

Why: expert trajectories are stored, compared and matched as one vector per epoch, and distillation
differentiates through many SGD steps of a student whose parameters are plain tensors (no module
surgery, no in-place updates). A :class:`ParamLayout` maps a flat vector to the module's named
parameters and back; the same layout batched with ``torch.func.vmap`` trains K students at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from mkdt.errors import MkdtError


@dataclass(frozen=True)
class ParamLayout:
    """Names and shapes of a module's parameters, in ``named_parameters()`` order."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, module: nn.Module) -> "ParamLayout":
        named = list(module.named_parameters())
        return cls(tuple(n for n, _ in named), tuple(tuple(p.shape) for _, p in named))

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of a flat vector (last dim = ``numel``) shaped as the named parameters."""
        if flat.shape[-1] != self.numel:
            raise MkdtError(f"flat parameter vector has {flat.shape[-1]} entries, the model needs {self.numel}")
        lead = flat.shape[:-1]
        parts = torch.split(flat, self.sizes, dim=-1)
        return {n: p.reshape(*lead, *s) for n, p, s in zip(self.names, parts, self.shapes)}

    def flatten(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([params[n].reshape(-1) for n in self.names])

    def to_json(self) -> dict[str, Any]:
        return {"names": list(self.names), "shapes": [list(s) for s in self.shapes]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ParamLayout":
        return cls(tuple(data["names"]), tuple(tuple(s) for s in data["shapes"]))

    def describe_mismatch(self, other: "ParamLayout") -> str:
        """One line on how two layouts differ (empty when equal)."""
        if self == other:
            return ""
        if self.names != other.names:
            missing = [n for n in other.names if n not in self.names]
            extra = [n for n in self.names if n not in other.names]
            return f"parameter names differ (missing {missing[:3]}, unexpected {extra[:3]})"
        for n, a, b in zip(self.names, self.shapes, other.shapes):
            if a != b:
                return f"parameter '{n}' has shape {list(a)}, expected {list(b)}"
        return "layouts differ"


def flat_parameters(module: nn.Module) -> torch.Tensor:
    """A detached copy of the module's parameters as one vector (a copy, never a view)."""
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()]).clone()


@torch.no_grad()
def load_flat_parameters(module: nn.Module, flat: torch.Tensor) -> nn.Module:
    """Copy a flat vector into the module's parameters."""
    layout = ParamLayout.of(module)
    for p, value in zip(module.parameters(), layout.unflatten(flat.to(next(module.parameters()).device)).values()):
        p.copy_(value)
    return module


def functional_forward(module: nn.Module, layout: ParamLayout, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` with the parameters taken from ``flat`` (differentiable w.r.t. ``flat`` and ``x``)."""
    params = layout.unflatten(flat)
    buffers = dict(module.named_buffers())
    return functional_call(module, (params, buffers), (x,))

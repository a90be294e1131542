"""Differentiable augmentation of synthetic batches with explicit, replayable parameters.

Why explicit parameters: the memory-saving path recomputes every inner step in the backward pass
and must see exactly the same flips and shifts; drawing them from the run's generator up front
(instead of kornia's global-RNG samplers) makes both paths and a resumed run identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from kornia.geometry.transform import hflip, translate


@dataclass
class AugmentParams:
    """Per-image horizontal flip and integer (dx, dy) shift of one minibatch."""

    flip: torch.Tensor
    shift: torch.Tensor


def max_shift(resolution: int) -> int:
    """Shift range of a random crop with 1/8 of the side as padding (4 px at 32 px)."""
    return max(1, resolution // 8)


def sample_params(batch: int, resolution: int, generator: torch.Generator) -> AugmentParams:
    flip = torch.rand(batch, generator=generator) < 0.5
    r = max_shift(resolution)
    shift = torch.randint(-r, r + 1, (batch, 2), generator=generator)
    return AugmentParams(flip, shift)


def apply(images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """Flip then translate by whole pixels (zero fill: a random crop of the padded image).

    ``nearest`` sampling makes integer shifts exact (bilinear leaks ~1e-5 across the border) and is
    still differentiable in ``images``.
    """
    flip = params.flip.to(images.device).view(-1, 1, 1, 1)
    x = torch.where(flip, hflip(images), images)
    shift = params.shift.to(device=images.device, dtype=images.dtype)
    return translate(x, shift, mode="nearest", padding_mode="zeros", align_corners=True)

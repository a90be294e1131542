"""Differentiable augmentation of synthetic batches with explicit, replayable parameters.

Why explicit parameters: the memory-saving path recomputes every inner step in the backward pass
and must see exactly the same flips and shifts; drawing them from the run's generator up front
(instead of a library's global-RNG samplers) makes both paths and a resumed run identical.

Why no library: a mirror is ``flip(-1)`` and a whole-pixel shift with zero fill is indexing into a
zero-padded copy; both are exact and differentiable in the images (kornia's ``hflip`` / ``translate``
with nearest sampling gave the same tensors; tests/distill/test_distill_augment.py checks it when kornia
is installed), so the package does not depend on kornia for two lines.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


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


def shift(images: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Move image ``n`` by ``offsets[n] = (dx, dy)`` whole pixels (right / down), filling with zeros:
    ``out[n, :, i, j] = images[n, :, i - dy, j - dx]`` where that lies inside the image, else 0."""
    n, _, height, width = images.shape
    offsets = offsets.to(images.device, torch.long)
    pad = int(offsets.abs().max()) if offsets.numel() else 0
    padded = F.pad(images, (pad, pad, pad, pad))
    rows = torch.arange(height, device=images.device).view(1, height) - offsets[:, 1:2] + pad  # n x H
    cols = torch.arange(width, device=images.device).view(1, width) - offsets[:, 0:1] + pad  # n x W
    batch = torch.arange(n, device=images.device).view(n, 1, 1)
    moved = padded.permute(0, 2, 3, 1)[batch, rows.view(n, height, 1), cols.view(n, 1, width)]  # n x H x W x C
    return moved.permute(0, 3, 1, 2)


def apply(images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """Mirror where ``params.flip``, then shift by ``params.shift`` whole pixels with zero fill (a random crop
    of the zero-padded image); exact, and differentiable in ``images``."""
    flip = params.flip.to(images.device).view(-1, 1, 1, 1)
    x = torch.where(flip, images.flip(-1), images)
    return shift(x, params.shift)

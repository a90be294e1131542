"""The in-memory image set that every stage consumes.

Why one type: teacher, experts, distillation and evaluation must agree on pixels, labels and the
normalisation statistics (the authors' code let them drift apart between stages). An ``ImageSet``
carries all of it; its ``fingerprint`` identifies the exact pixels so later artifacts can refuse data
they were not made from.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Sequence

import torch
import torch.nn.functional as F

from mkdt.errors import MkdtError


@dataclass
class ImageSet:
    """uint8 images N x C x H x W, optional int64 labels, class names and normalisation statistics."""

    images: torch.Tensor
    labels: torch.Tensor | None = None
    class_names: list[str] = field(default_factory=list)
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.25, 0.25, 0.25)
    name: str = "imageset"

    def __post_init__(self) -> None:
        if not isinstance(self.images, torch.Tensor) or self.images.dtype != torch.uint8 or self.images.dim() != 4:
            got = getattr(self.images, "dtype", type(self.images).__name__)
            shape = tuple(getattr(self.images, "shape", ()))
            raise MkdtError(f"{self.name}: images must be a uint8 N x C x H x W tensor, got {got} {shape}")
        if self.labels is not None:
            self.labels = torch.as_tensor(self.labels, dtype=torch.int64)
            if self.labels.shape != (len(self.images),):
                raise MkdtError(
                    f"{self.name}: {len(self.labels)} labels for {len(self.images)} images; they must match"
                )
        c = self.images.shape[1]
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        if len(self.mean) != c or len(self.std) != c:
            raise MkdtError(f"{self.name}: mean/std have {len(self.mean)}/{len(self.std)} entries for {c} channels")

    # -- shape -----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def resolution(self) -> int:
        return int(self.images.shape[-1])

    @property
    def num_classes(self) -> int:
        if self.class_names:
            return len(self.class_names)
        return int(self.labels.max()) + 1 if self.labels is not None and len(self.labels) else 0

    # -- identity --------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """sha256 (first 16 hex) of the pixels and shape: the same data gives the same fingerprint."""
        h = hashlib.sha256()
        h.update(str(tuple(self.images.shape)).encode())
        h.update(self.images.contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    # -- views -----------------------------------------------------------------------------------
    def subset(self, indices: Sequence[int] | torch.Tensor) -> "ImageSet":
        idx = torch.as_tensor(indices, dtype=torch.int64)
        if idx.numel() and (idx.min() < 0 or idx.max() >= len(self)):
            raise MkdtError(f"{self.name}: subset index out of range 0..{len(self) - 1}")
        return replace(
            self,
            images=self.images[idx].clone(),
            labels=None if self.labels is None else self.labels[idx].clone(),
        )

    def resized(self, resolution: int) -> "ImageSet":
        """Square images of ``resolution`` pixels (bilinear with antialiasing, as torchvision does)."""
        if resolution <= 0:
            raise MkdtError(f"{self.name}: resolution must be positive, got {resolution}")
        if self.images.shape[-2:] == (resolution, resolution):
            return self
        out = []
        for chunk in self.images.split(4096):
            x = F.interpolate(chunk.float(), size=(resolution, resolution), mode="bilinear", antialias=True,
                              align_corners=False)
            out.append(x.round_().clamp_(0, 255).to(torch.uint8))
        return replace(self, images=torch.cat(out) if out else self.images.new_zeros((0, self.channels, resolution,
                                                                                      resolution)))

    def with_channels(self, channels: int) -> "ImageSet":
        """Grayscale -> 3 channels by repetition, or RGB -> 1 channel by luminance."""
        if channels == self.channels:
            return self
        if self.channels == 1 and channels == 3:
            return replace(self, images=self.images.repeat(1, 3, 1, 1), mean=self.mean * 3, std=self.std * 3)
        if self.channels == 3 and channels == 1:
            w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            gray = (self.images.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
            mean = (sum(m * wi for m, wi in zip(self.mean, w.flatten().tolist())),)
            std = (sum(s * wi for s, wi in zip(self.std, w.flatten().tolist())),)
            return replace(self, images=gray, mean=mean, std=std)
        raise MkdtError(f"{self.name}: cannot convert {self.channels} channels to {channels}")

    # -- tensors for models ----------------------------------------------------------------------
    def normalize(self, images: torch.Tensor | None = None) -> torch.Tensor:
        """float32 normalised images (all, or a uint8 batch given) with this set's mean/std."""
        x = self.images if images is None else images
        return normalize(x, self.mean, self.std)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255.0 - m) / s


def denormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Inverse of :func:`normalize`, clamped to [0, 1] floats (for image grids)."""
    m = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return (images.float() * s + m).clamp(0, 1)


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units of a uint8 N x C x H x W tensor.

    Computed from a 256-bin histogram per channel, which is exact for uint8 data and avoids float
    copies of the whole set.
    """
    c = images.shape[1]
    if images.numel() == 0:
        return (0.5,) * c, (0.25,) * c
    levels = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for ch in range(c):
        hist = torch.bincount(images[:, ch].reshape(-1).to(torch.int64), minlength=256).to(torch.float64)
        total = hist.sum()
        mean = (hist * levels).sum() / total
        var = (hist * (levels - mean) ** 2).sum() / total
        means.append(float(mean))
        stds.append(max(float(var.sqrt()), 1e-3))
    return tuple(means), tuple(stds)

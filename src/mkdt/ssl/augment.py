"""Batched SimCLR-style augmentations with per-image random parameters, on the training device.

Why not ``kornia.augmentation`` or torchvision's per-image transforms: measured by
``benchmarks/augment_speed.py`` on the project's 2-core CPU (one thread, a 256 x 3 x 32 x 32 batch, the
SimCLR CIFAR recipe, run round-robin on a shared core; docs/RESULTS.md, augment_speed), one view takes
50-84 ms (minimum-median) here, 73-101 ms with kornia 0.9 and 353-467 ms with torchvision v2 image by
image. The operations are a few batched tensor ops (one ``grid_sample`` for crop + flip, blends and an
HSV round trip for the jitter). The parameter ranges are torchvision's.

Every random parameter is drawn on the CPU from an explicit ``torch.Generator`` in a fixed order and
only then moved to the device, so a seed gives the same views on CPU and CUDA and nothing touches
torch's global generator.

The colour jitter is torchvision's ``ColorJitter``, batched: brightness, contrast and saturation blend
with black, the grey mean and the grey image (luma weights 0.2989/0.587/0.114), hue shifts the HSV hue
channel, every result is clamped to [0, 1], and each image applies the four in its own random order
(torchvision draws one permutation per call). tests/ssl/test_augment.py checks it against
``torchvision.transforms.v2.functional`` on the same parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from mkdt.config import require, validate
from mkdt.errors import MkdtError

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
CROP_ATTEMPTS = 10


@dataclass
class AugmentConfig:
    """Two-view SSL augmentation (SimCLR / Barlow Twins CIFAR recipe by default; blur/solarize off)."""

    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5

    def check(self) -> None:
        lo, hi = self.crop_scale
        require(0 < lo <= hi <= 1, "crop_scale", "(low, high) with 0 < low <= high <= 1", self.crop_scale)
        require(0 < self.crop_ratio[0] <= self.crop_ratio[1], "crop_ratio", "(low, high) with 0 < low <= high",
                self.crop_ratio)
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            require(0 <= getattr(self, name) <= 1, name, "a probability in [0, 1]", getattr(self, name))
        require(0 <= self.hue <= 0.5, "hue", "in [0, 0.5]", self.hue)
        for name in ("brightness", "contrast", "saturation"):
            require(0 <= getattr(self, name) <= 1, name, "in [0, 1]", getattr(self, name))


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def _bernoulli(n: int, p: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator) < p


def sample_crop_boxes(n: int, height: int, width: int, scale: Sequence[float], ratio: Sequence[float],
                      generator: torch.Generator) -> torch.Tensor:
    """Random-resized-crop boxes (top, left, h, w) per image, torchvision's rule vectorised.

    Up to 10 attempts per image; the first attempt whose box fits is used, otherwise the whole image.
    """
    area = height * width
    target = area * _uniform(n * CROP_ATTEMPTS, scale[0], scale[1], generator).view(n, CROP_ATTEMPTS)
    log_r = _uniform(n * CROP_ATTEMPTS, math.log(ratio[0]), math.log(ratio[1]), generator)
    aspect = log_r.exp().view(n, CROP_ATTEMPTS)
    w = (target * aspect).sqrt().round()
    h = (target / aspect).sqrt().round()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.float().argmax(dim=1)
    found = ok.any(dim=1)
    rows = torch.arange(n)
    w = torch.where(found, w[rows, first], torch.tensor(float(width)))
    h = torch.where(found, h[rows, first], torch.tensor(float(height)))
    top = (torch.rand(n, generator=generator) * (height - h + 1)).floor().clamp(max=height - h)
    left = (torch.rand(n, generator=generator) * (width - w + 1)).floor().clamp(max=width - w)
    return torch.stack([top, left, h, w], dim=1)


def crop_flip(x: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Crop every image to its box, resize back to the input size (bilinear) and mirror where ``flip``."""
    n, _, height, width = x.shape
    top, left, h, w = boxes.to(x.device, torch.float32).unbind(1)
    sx = w / width
    sy = h / height
    tx = (2 * left + w) / width - 1
    ty = (2 * top + h) / height - 1
    sx = torch.where(flip.to(x.device), -sx, sx)
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0] = sx
    theta[:, 0, 2] = tx
    theta[:, 1, 1] = sy
    theta[:, 1, 2] = ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma (N x 1 x H x W) of RGB images; single-channel images are returned as they are."""
    if x.shape[1] != 3:
        return x.mean(dim=1, keepdim=True)
    w = torch.tensor(GRAY_WEIGHTS, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def _per_image(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with black: ``clamp(f * x)``."""
    return (x * _per_image(factor)).clamp(0, 1)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the image's mean grey level: ``clamp(f * x + (1 - f) * mean(gray(x)))``."""
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    f = _per_image(factor)
    return (f * x + (1 - f) * mean).clamp(0, 1)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the grey image: ``clamp(f * x + (1 - f) * gray(x))``; single-channel images are unchanged."""
    if x.shape[1] != 3:
        return x
    f = _per_image(factor)
    return (f * x + (1 - f) * grayscale(x)).clamp(0, 1)


def _hsv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hue in [0, 1), saturation and value (N x H x W each) of RGB images in [0, 1]; grey has hue and
    saturation 0."""
    r, g, b = x.unbind(1)
    high, low = x.amax(dim=1), x.amin(dim=1)
    span = high - low
    grey = span == 0
    sat = span / torch.where(grey, torch.ones_like(high), high)
    span = torch.where(grey, torch.ones_like(span), span)
    red_max = high == r
    green_max = (high == g) & ~red_max
    # the hue sector relative to the maximal channel: (g - b), 2 + (b - r), 4 + (r - g), in units of the span
    sector = torch.where(red_max, (g - b) / span,
                         torch.where(green_max, 2.0 + (b - r) / span, 4.0 + (r - g) / span))
    hue = torch.where(grey, torch.zeros_like(sector), torch.remainder(sector / 6.0, 1.0))
    return hue, sat, high


def _rgb(hue: torch.Tensor, sat: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
    """RGB (N x 3 x H x W) of HSV planes: channel ``c = v - v s clamp(min(k, 4 - k), 0, 1)`` with
    ``k = (n + 6 h) mod 6``, n = 5, 3, 1 for red, green, blue (the six-sector rule without branches)."""
    six = hue * 6.0
    vs = val * sat
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(six + n, 6.0)
        channels.append(val - vs * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))
    return torch.stack(channels, dim=1)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] (N x 3 x H x W) -> HSV (N x 3 x H x W) with hue in [0, 1)."""
    return torch.stack(_hsv(x), dim=1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hsv`."""
    return _rgb(*x.unbind(1))


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Shift the HSV hue of every image by its ``shift`` (a fraction of the hue circle, in [-0.5, 0.5])."""
    if x.shape[1] != 3:
        return x
    hue, sat, val = _hsv(x)
    hue = torch.remainder(hue + shift.to(x.device, x.dtype).view(-1, 1, 1), 1.0)
    return _rgb(hue, sat, val).clamp(0, 1)


JITTER = (("brightness", adjust_brightness), ("contrast", adjust_contrast), ("saturation", adjust_saturation),
          ("hue", adjust_hue))  # torchvision's ColorJitter numbering of the four operations


def color_jitter(x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """The four jitter operations, each image in its own order ``params["order"][i]`` (a permutation of
    0..3 in :data:`JITTER` numbering); images whose ``params["jitter"]`` is off are left as they are."""
    order, on = params["order"], params["jitter"]
    for slot in range(len(JITTER)):
        for k, (key, op) in enumerate(JITTER):
            rows = ((order[:, slot] == k) & on).nonzero().flatten()
            if len(rows) == 0:
                continue
            where = rows.to(x.device)
            x = x.index_copy(0, where, op(x.index_select(0, where), params[key][rows].to(x.device)))
    return x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a per-image sigma; kernel ~10% of the image side (odd, >= 3)."""
    n, c, height, width = x.shape
    size = max(3, int(round(0.1 * min(height, width))) | 1)
    half = size // 2
    offsets = torch.arange(size, dtype=torch.float32, device=x.device) - half
    sig = sigma.to(x.device, torch.float32).view(n, 1)
    kernel = torch.exp(-(offsets.view(1, -1) ** 2) / (2 * sig**2))
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).to(x.dtype)
    kernel = kernel.repeat_interleave(c, dim=0)  # (n * c, size)
    flat = x.reshape(1, n * c, height, width)
    flat = F.conv2d(F.pad(flat, (half, half, 0, 0), mode="reflect"), kernel.view(n * c, 1, 1, size), groups=n * c)
    flat = F.conv2d(F.pad(flat, (0, 0, half, half), mode="reflect"), kernel.view(n * c, 1, size, 1), groups=n * c)
    return flat.view(n, c, height, width)


def _blend(mask: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    return torch.where(_per_image(mask.to(old.device)), new, old)


class BatchAugment:
    """Callable: uint8 batch -> augmented float batch normalised with the set's mean/std."""

    def __init__(self, config: AugmentConfig, mean: Sequence[float], std: Sequence[float]):
        validate(config, "augment.")
        self.config = config
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def sample(self, n: int, height: int, width: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """All random parameters of one batch, drawn on the CPU in a fixed order."""
        c = self.config
        boxes = sample_crop_boxes(n, height, width, c.crop_scale, c.crop_ratio, generator)
        identity = torch.ones(n)
        params = {
            "boxes": boxes,
            "flip": _bernoulli(n, c.flip_p, generator),
            "jitter": _bernoulli(n, c.jitter_p, generator),
            "brightness": _uniform(n, max(0.0, 1 - c.brightness), 1 + c.brightness, generator),
            "contrast": _uniform(n, max(0.0, 1 - c.contrast), 1 + c.contrast, generator),
            "saturation": _uniform(n, max(0.0, 1 - c.saturation), 1 + c.saturation, generator),
            "hue": _uniform(n, -c.hue, c.hue, generator),
            "gray": _bernoulli(n, c.grayscale_p, generator),
            "blur": _bernoulli(n, c.blur_p, generator),
            "sigma": _uniform(n, c.blur_sigma[0], c.blur_sigma[1], generator),
            "solarize": _bernoulli(n, c.solarize_p, generator),
            "order": torch.rand(n, len(JITTER), generator=generator).argsort(dim=1),  # each image's jitter order
        }
        off = ~params["jitter"]
        for key in ("brightness", "contrast", "saturation"):
            params[key] = torch.where(off, identity, params[key])
        params["hue"] = torch.where(off, torch.zeros(n), params["hue"])
        return params

    def apply(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Augment float images in [0, 1] with given parameters (deterministic)."""
        x = crop_flip(x, params["boxes"], params["flip"])
        if params["jitter"].any():
            x = color_jitter(x, params)
        if x.shape[1] == 3 and params["gray"].any():
            x = _blend(params["gray"], grayscale(x).expand_as(x), x)
        if params["blur"].any():
            x = _blend(params["blur"], gaussian_blur(x, params["sigma"]), x)
        if params["solarize"].any():
            t = self.config.solarize_threshold
            x = _blend(params["solarize"], torch.where(x >= t, 1 - x, x), x)
        return x

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        m = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        s = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        return (x - m) / s

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if images.dim() != 4:
            raise MkdtError(f"augmentation expects an N x C x H x W batch, got shape {tuple(images.shape)}")
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        params = self.sample(len(x), x.shape[-2], x.shape[-1], generator)
        return self.normalize(self.apply(x, params))

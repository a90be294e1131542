"""Encoders saved by ``mkdt pretrain`` and their frozen features on downstream sets.

Why one module: the probe and fine-tuning must read encoders the same way (architecture and
normalisation from the file's metadata, strict state-dict loading) and adapt downstream images the
same way (resize to the encoder's source resolution, convert channels, normalise with the ENCODER's
pre-training statistics). Features are cached as safetensors keyed by the encoder file's hash and the
adapted data's fingerprint, so each (encoder, set) pair is encoded once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from mkdt.artifacts import TensorSpec, file_sha256, load_tensors, read_metadata, save_tensors
from mkdt.data import ImageSet
from mkdt.distributed import is_main_process
from mkdt.errors import MkdtError
from mkdt.models import ModelConfig, build_model
from mkdt.ssl.knn import encode

ENCODER_KEYS = ("model", "in_channels", "resolution", "mean", "std")


@dataclass
class Encoder:
    """A frozen-architecture encoder rebuilt from ``encoder.safetensors`` and its metadata."""

    model: nn.Module
    meta: dict[str, Any]
    path: Path
    digest: str
    config: ModelConfig = field(default_factory=ModelConfig)

    @property
    def in_channels(self) -> int:
        return int(self.meta["in_channels"])

    @property
    def resolution(self) -> int:
        return int(self.meta["resolution"])

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(float(m) for m in self.meta["mean"])

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(float(s) for s in self.meta["std"])


def file_digest(path: str | os.PathLike) -> str:
    """sha256 (first 16 hex) of a file's bytes: identifies the exact encoder weights."""
    return file_sha256(path)[:16]


def model_config_from(meta: dict[str, Any], path: Path) -> ModelConfig:
    raw = meta.get("model")
    if not isinstance(raw, dict):
        raise MkdtError(f"{path}: metadata 'model' must be a ModelConfig mapping, got {raw!r}; re-run `mkdt pretrain`")
    try:
        return ModelConfig(**raw)
    except TypeError as exc:
        raise MkdtError(f"{path}: metadata 'model' is not a ModelConfig ({exc}); re-run `mkdt pretrain`") from None


def load_encoder(path: str | os.PathLike, device: torch.device | str = "cpu") -> Encoder:
    """Rebuild the encoder named by ``path`` (architecture from metadata) and load its weights strictly."""
    path = Path(path)
    if not path.is_file():
        raise MkdtError(f"{path}: encoder file not found; run `mkdt pretrain` first or set encoder=<path>")
    meta = read_metadata(path)
    missing = [k for k in ENCODER_KEYS if k not in meta]
    if missing:
        raise MkdtError(f"{path}: not an mkdt encoder (metadata lacks {', '.join(missing)}); "
                        f"create it with `mkdt pretrain`")
    cfg = model_config_from(meta, path)
    state = load_tensors(path)
    model = build_model(cfg, in_channels=int(meta["in_channels"]), resolution=int(meta["resolution"]))
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise MkdtError(f"{path}: weights do not fit a {cfg.name} (width {cfg.width}, depth {cfg.depth}): "
                        f"missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}; "
                        f"the file is not the encoder its metadata describes")
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Encoder(model, meta, path, file_digest(path), cfg)


def adapt(data: ImageSet, channels: int, resolution: int) -> ImageSet:
    """Resize a downstream set to the encoder's source resolution and convert its channels."""
    if data.channels != channels and {data.channels, channels} != {1, 3}:
        raise MkdtError(f"{data.name}: images have {data.channels} channels but the encoder expects {channels}; "
                        f"only 1 <-> 3 channels can be converted, use a matching encoder or data.channels")
    return data.resized(resolution).with_channels(channels)


@torch.no_grad()
def extract_features(
    model: nn.Module,
    images: torch.Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    *,
    batch_size: int = 512,
    desc: str = "features",
) -> torch.Tensor:
    """``model.features`` of uint8 images, normalised with ``mean``/``std``; eval mode, batched, on CPU."""
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise MkdtError(f"{desc}: expected uint8 N x C x H x W images, got {images.dtype} {tuple(images.shape)}")
    feats = encode(model, images, mean, std, batch_size=batch_size, device=next(model.parameters()).device,
                   progress=desc if is_main_process() else None)
    if not torch.isfinite(feats).all():
        raise MkdtError(f"{desc}: the encoder produced NaN/inf features; the encoder is broken, re-run pretrain")
    return feats


def cached_features(
    cache_dir: Path,
    encoder_digest: str,
    data: ImageSet,
    compute: Callable[[torch.Tensor], torch.Tensor],
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, bool]:
    """Features of ``data``'s images at ``rows`` (sorted indices; ``None`` = every image), cached in
    ``<cache_dir>/<encoder>_<data fingerprint>.safetensors``.

    ``compute(indices)`` encodes the images at ``indices``. Why rows: a 1% / 5% probe reads a few thousand
    training images, so encoding all 50,000 would be most of its cost. The cache keeps every row computed
    so far (its ``rows`` tensor says which); a later request computes only the rows it lacks and merges
    them in. Returns the features in the order of ``rows`` and whether nothing had to be computed.
    """
    fingerprint = data.fingerprint()
    n = len(data)
    want = torch.arange(n) if rows is None else torch.as_tensor(rows, dtype=torch.int64)
    path = Path(cache_dir) / f"{encoder_digest}_{fingerprint}.safetensors"
    have_rows, have = torch.zeros(0, dtype=torch.int64), None
    if path.is_file():
        try:
            cached = load_tensors(path, {"features": TensorSpec(shape=(None, None), dtype=torch.float32),
                                         "rows": TensorSpec(shape=(None,), dtype=torch.int64)})
            have_rows, have = cached["rows"], cached["features"]
            if not _valid_rows(have_rows, len(have), n):
                raise MkdtError(f"{path}: inconsistent feature cache")
        except MkdtError:
            path.unlink()  # stale or corrupt cache entry: recompute rather than trust it
            have_rows, have = torch.zeros(0, dtype=torch.int64), None
    missing = want[~torch.isin(want, have_rows)]
    if len(missing):
        new = compute(missing)
        merged_rows = torch.cat([have_rows, missing]) if have is not None else missing
        merged = torch.cat([have, new]) if have is not None else new
        order = torch.argsort(merged_rows)
        have_rows, have = merged_rows[order], merged[order]
        save_tensors(path, {"features": have, "rows": have_rows},
                     {"encoder": encoder_digest, "fingerprint": fingerprint, "data_name": data.name})
    assert have is not None
    return have[torch.searchsorted(have_rows, want)], not len(missing)


def _valid_rows(rows: torch.Tensor, count: int, n: int) -> bool:
    """Cached rows must be strictly increasing indices into the ``n`` images, one per feature row."""
    if len(rows) != count:
        return False
    if not len(rows):
        return True
    return bool(rows[0] >= 0 and rows[-1] < n and (rows[1:] > rows[:-1]).all())

"""The teacher file: writing, loading (with an optional sha256 check) and importing foreign state dicts.

A teacher is ``teacher.safetensors``: the backbone's state dict with the keys ``build_model`` gives
(no projector, no head) and metadata ``{"model", "in_channels", "resolution", "feature_dim",
"fingerprint", "data_name", "mean", "std", ...}``, enough to rebuild the network without any config.

Importing maps the common checkpoint layouts onto those keys: torchvision ResNet names; wrappers that
prefix keys with ``module.`` / ``backbone.`` / ``encoder.`` / ``model.`` (DataParallel, lightly,
solo-learn, Lightning); and ``nn.Sequential`` backbones whose children are numbered (mix-bt's ``f.0``,
lightly's ``nn.Sequential(*resnet.children())``), matched child by child in order. Projector,
classifier and momentum-encoder keys are dropped. Anything else that does not fit is reported by
name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from mkdt.artifacts import atomic_write_text, file_sha256, load_state_file, load_tensors, read_metadata, save_tensors
from mkdt.errors import MkdtError
from mkdt.models import ModelConfig, build_model

PathLike = str | os.PathLike
REQUIRED_META = ("model", "in_channels", "resolution", "feature_dim")
# Wrapper prefixes stripped from the front of keys (repeatedly).
PREFIXES = ("module.", "_orig_mod.", "backbone.", "encoder.", "model.", "net.", "f.")
# Top-level names that are not part of the backbone (projectors, heads, momentum copies).
DROPPED = frozenset({
    "fc", "head", "heads", "classifier", "linear", "projector", "projection", "projection_head", "g",
    "predictor", "prediction_head", "momentum_backbone", "momentum_encoder", "momentum_projector",
    "momentum_projection_head", "target_encoder", "queue", "queue_ptr", "prototypes", "bn_proj",
})
LIST_LIMIT = 6


# ----------------------------------------------------------------------------------------------
# sha256 side files
# ----------------------------------------------------------------------------------------------
def write_sha256(path: PathLike) -> str:
    """Write ``<path>.sha256`` in ``sha256sum`` format; returns the digest."""
    path = Path(path)
    digest = file_sha256(path)
    atomic_write_text(path.with_name(path.name + ".sha256"), f"{digest}  {path.name}\n")
    return digest


def check_sha256(path: PathLike) -> str | None:
    """Verify ``path`` against ``<path>.sha256`` when that file exists; returns the checked digest."""
    path = Path(path)
    side = path.with_name(path.name + ".sha256")
    if not side.is_file():
        return None
    text = side.read_text("utf-8").split()
    expected = text[0].lower() if text else ""
    actual = file_sha256(path)
    if actual != expected:
        raise MkdtError(f"{path}: sha256 {actual[:16]}... does not match {side.name} ({expected[:16]}...); "
                        f"the file is corrupt or was replaced, re-download or re-train it")
    return actual


# ----------------------------------------------------------------------------------------------
# save / load
# ----------------------------------------------------------------------------------------------
def save_teacher(path: PathLike, model: nn.Module, meta: Mapping[str, Any]) -> str:
    """Write the backbone state dict with metadata, atomically, plus its ``.sha256``; returns the digest."""
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"teacher metadata lacks {missing}")
    save_tensors(path, model.state_dict(), dict(meta))
    return write_sha256(path)


def _short(names: list[str]) -> str:
    shown = ", ".join(names[:LIST_LIMIT])
    return f"{shown}, ... ({len(names)} in all)" if len(names) > LIST_LIMIT else shown


def load_teacher(path: PathLike, *, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a teacher from its file: (model in eval mode, metadata). Checks ``<file>.sha256`` if present."""
    path = Path(path)
    if not path.is_file():
        raise MkdtError(f"{path}: teacher file not found; run `mkdt teacher` (or `mkdt teacher --import FILE`)")
    check_sha256(path)
    meta = read_metadata(path)
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise MkdtError(f"{path}: not an mkdt teacher (metadata lacks {', '.join(missing)}); "
                        f"import it with `mkdt teacher --import {path}`")
    cfg = ModelConfig(**meta["model"])
    model = build_model(cfg, in_channels=int(meta["in_channels"]), resolution=int(meta["resolution"]))
    state = load_tensors(path)
    problems = describe_mismatch(state, model.state_dict())
    if problems:
        raise MkdtError(f"{path}: weights do not fit the recorded model {cfg.name} width {cfg.width} ({problems}); "
                        f"the file is inconsistent, re-create it")
    model.load_state_dict(state)
    return model.to(device).eval(), meta


# ----------------------------------------------------------------------------------------------
# importing
# ----------------------------------------------------------------------------------------------
def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in PREFIXES:
            if key.startswith(prefix) and len(key) > len(prefix):
                key, changed = key[len(prefix):], True
    return key


def _stateful_children(model: nn.Module) -> list[str]:
    """Top-level child names that own parameters or buffers, in definition order."""
    return [name for name, child in model.named_children()
            if any(True for _ in child.parameters()) or any(True for _ in child.buffers())]


def map_state_dict(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename a foreign backbone state dict onto ``model``'s keys (see module docstring); no checking."""
    renamed: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = _strip_prefixes(key)
        if key.split(".", 1)[0] in DROPPED:
            continue
        renamed[key] = value
    numbered = sorted({k.split(".", 1)[0] for k in renamed if k.split(".", 1)[0].isdigit()}, key=int)
    if numbered:
        targets = [n for n in _stateful_children(model) if n not in DROPPED]
        if len(numbered) == len(targets):
            names = dict(zip(numbered, targets))
            renamed = {(names[k.split(".", 1)[0]] + "." + k.split(".", 1)[1]
                        if k.split(".", 1)[0] in names else k): v for k, v in renamed.items()}
    return renamed


def describe_mismatch(given: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> str:
    """Missing / unexpected keys and shape mismatches, named (empty when the state dict fits)."""
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    missing = [k for k in expected if k not in given and k not in optional]
    unexpected = [k for k in given if k not in expected]
    shapes = [f"{k} {list(given[k].shape)} vs expected {list(v.shape)}" for k, v in expected.items()
              if k in given and tuple(given[k].shape) != tuple(v.shape)]
    parts = []
    if missing:
        parts.append(f"missing keys: {_short(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {_short(unexpected)}")
    if shapes:
        parts.append(f"shape mismatch: {_short(shapes)}")
    return "; ".join(parts)


def import_teacher(
    path: PathLike,
    model_cfg: ModelConfig | str,
    *,
    dest: PathLike | None = None,
    in_channels: int = 3,
    resolution: int = 32,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    fingerprint: str | None = None,
    data_name: str | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a foreign state dict (safetensors or weights-only torch file) into ``build_model(model_cfg)``.

    Returns (model in eval mode, teacher metadata); with ``dest`` also writes the teacher file (the
    same format as a trained teacher). Keys that do not fit are named in a one-line MkdtError.
    """
    path = Path(path)
    cfg = model_cfg if isinstance(model_cfg, ModelConfig) else ModelConfig(name=model_cfg)
    check_sha256(path)  # a committed or downloaded teacher with a .sha256 beside it must match it
    state = load_state_file(path)
    model = build_model(cfg, in_channels=in_channels, resolution=resolution)
    expected = model.state_dict()
    mapped = map_state_dict(state, model)
    problems = describe_mismatch(mapped, expected)
    if problems:
        raise MkdtError(f"{path}: cannot import as {cfg.name} width {cfg.width} with {in_channels} input channels "
                        f"({problems}); set model.name/model.width (and data.channels) to match the checkpoint")
    full = {k: (mapped[k] if k in mapped else v).to(v.dtype) for k, v in expected.items()}
    model.load_state_dict(full)
    model.eval()
    meta = {
        "model": cfg.to_dict(), "in_channels": in_channels, "resolution": resolution,
        "feature_dim": int(model.feature_dim), "fingerprint": fingerprint, "data_name": data_name,
        "mean": list(mean) if mean is not None else None, "std": list(std) if std is not None else None,
        "source": "imported", "imported_from": str(path),
    }
    if dest is not None:
        meta["sha256"] = save_teacher(dest, model, meta)
    return model, meta

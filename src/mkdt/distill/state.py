"""The mutable state of a distillation run and its checkpoint (safetensors + JSON metadata, atomic).

Why everything: resuming must continue exactly as if never interrupted, so the checkpoint holds the
learned tensors, the three optimisers' momentum buffers, the generators' states (as uint8 tensors),
the iteration counter, the guard counters and the loss log.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mkdt.artifacts import load_tensors, read_metadata, save_tensors
from mkdt.errors import MkdtError

LEARNED = ("images", "targets", "lr")
CHECKPOINT = "checkpoint.safetensors"


@dataclass
class DistillState:
    """Learned leaves, their optimisers (``None`` when that leaf is frozen), RNGs, counters and log."""

    images: torch.Tensor
    targets: torch.Tensor
    lr: torch.Tensor
    optimizers: dict[str, torch.optim.SGD | None]
    rng: torch.Generator
    rng_augment: torch.Generator
    iteration: int = 0
    consecutive_bad: int = 0
    skipped: int = 0
    log: list[dict[str, Any]] = field(default_factory=list)
    validation: list[dict[str, Any]] = field(default_factory=list)  # {"iteration", "val_loss"} rows

    @classmethod
    def fresh(cls, images: torch.Tensor, targets: torch.Tensor, lr_init: float, *, learn: dict[str, bool],
              rates: dict[str, float], momentum: float, rng: torch.Generator,
              rng_augment: torch.Generator) -> "DistillState":
        """Leaves copied from the initial set, one SGD (momentum) per learned leaf."""
        leaves = {
            "images": images.detach().clone().float().requires_grad_(True),
            "targets": targets.detach().clone().float().requires_grad_(learn["targets"]),
            "lr": torch.tensor(float(lr_init), device=images.device).requires_grad_(learn["lr"]),
        }
        optimizers = {
            name: torch.optim.SGD([leaf], lr=rates[name], momentum=momentum) if leaf.requires_grad else None
            for name, leaf in leaves.items()
        }
        return cls(leaves["images"], leaves["targets"], leaves["lr"], optimizers, rng, rng_augment)

    def leaf(self, name: str) -> torch.Tensor:
        return getattr(self, name)

    # -- checkpoint ------------------------------------------------------------------------------
    def save(self, path: Path, meta: dict[str, Any]) -> None:
        """Write the whole state atomically (refuses NaN, like every artifact)."""
        tensors = {name: self.leaf(name).detach().reshape(self.leaf(name).shape or (1,)) for name in LEARNED}
        for name, opt in self.optimizers.items():
            buf = _momentum_buffer(opt)
            if buf is not None:
                tensors[f"momentum.{name}"] = buf.reshape(buf.shape or (1,))
        tensors["rng.main"] = self.rng.get_state()
        tensors["rng.augment"] = self.rng_augment.get_state()
        record = {"iteration": self.iteration, "consecutive_bad": self.consecutive_bad, "skipped": self.skipped,
                  "log": self.log, "validation": self.validation, **meta}
        save_tensors(path, tensors, record)

    def restore(self, path: Path) -> dict[str, Any]:
        """Load a checkpoint written by :meth:`save` into this (freshly built) state; returns its metadata."""
        tensors, meta = read_checkpoint(path)
        return self.load(tensors, meta, path)

    def load(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], source: Path) -> dict[str, Any]:
        """Apply a checkpoint's tensors and metadata (read by :func:`read_checkpoint`, maybe on another rank)."""
        device = self.images.device
        for name in (*LEARNED, "rng.main", "rng.augment"):
            if name not in tensors:
                raise MkdtError(f"{source}: checkpoint lacks '{name}'; delete it to start over")
        with torch.no_grad():
            for name in LEARNED:
                leaf, saved = self.leaf(name), tensors[name]
                if saved.numel() != leaf.numel() or (leaf.dim() and tuple(saved.shape) != tuple(leaf.shape)):
                    raise MkdtError(f"{source}: checkpoint '{name}' has shape {tuple(saved.shape)}, the run needs "
                                    f"{tuple(leaf.shape)}; delete the checkpoint to start over")
                leaf.copy_(saved.reshape(leaf.shape).to(device))
        for name, opt in self.optimizers.items():
            key = f"momentum.{name}"
            if opt is not None and key in tensors:
                _set_momentum_buffer(opt, tensors[key].reshape(self.leaf(name).shape).to(device))
        self.rng.set_state(tensors["rng.main"])
        self.rng_augment.set_state(tensors["rng.augment"])
        self.iteration = int(meta["iteration"])
        self.consecutive_bad = int(meta.get("consecutive_bad", 0))
        self.skipped = int(meta.get("skipped", 0))
        self.log = list(meta.get("log", []))
        self.validation = list(meta.get("validation", []))
        return meta


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A checkpoint's tensors (on CPU) and metadata: under torchrun rank 0 reads it and sends it to the others."""
    return load_tensors(path, device="cpu"), read_metadata(path)


def _momentum_buffer(opt: torch.optim.SGD | None) -> torch.Tensor | None:
    if opt is None:
        return None
    param = opt.param_groups[0]["params"][0]
    return opt.state.get(param, {}).get("momentum_buffer")


def _set_momentum_buffer(opt: torch.optim.SGD, buffer: torch.Tensor) -> None:
    """Through ``load_state_dict`` (the optimiser's own format), so torch places and casts it."""
    state = opt.state_dict()
    state["state"] = {0: {"momentum_buffer": buffer.clone()}}
    opt.load_state_dict(state)


def tensor_digest(*tensors: torch.Tensor) -> str:
    """sha256 (16 hex) of tensors' bytes: identifies the initial set a checkpoint started from."""
    h = hashlib.sha256()
    for t in tensors:
        c = t.detach().to("cpu").contiguous()
        h.update(str((tuple(c.shape), str(c.dtype))).encode())
        h.update(c.numpy().tobytes())
    return h.hexdigest()[:16]

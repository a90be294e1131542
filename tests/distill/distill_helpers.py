"""Helpers of the distill tests: a tiny problem (digits at 8 px, ConvNet depth 1 width 8, 3 experts of
4 epochs) trained with the shared KD loop (``mkdt.training``) and saved with ``save_trajectory``, so these
tests do not depend on the experts stage. (A uniquely named module: several test folders have a conftest.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mkdt.data import DataConfig, load_dataset
from mkdt.formats import SyntheticSet, save_synthetic, save_trajectory
from mkdt.models import ModelConfig, build_model
from mkdt.models.functional import ParamLayout, flat_parameters
from mkdt.runtime import derive_seed, generator, seeded
from mkdt.training import RegressionSchedule, train_regression

MODEL = ModelConfig(name="convnet", width=8, depth=1)
TARGET_DIM = 16
EPOCHS = 4


@dataclass
class TinyRun:
    """Where the tiny problem's experts and initial set are, and the data they came from."""

    experts: Path
    init: Path
    images: torch.Tensor
    targets: torch.Tensor
    mean: tuple
    std: tuple
    fingerprint: str


def make_targets(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A learnable stand-in for teacher targets: a fixed random projection of the pixels, squashed."""
    w = torch.randn(x[0].numel(), TARGET_DIM, generator=generator(seed)) / x[0].numel() ** 0.5
    return torch.tanh(x.flatten(1) @ w * 2)


def train_expert(images: torch.Tensor, targets: torch.Tensor, index: int, model: ModelConfig = MODEL,
                 epochs: int = EPOCHS) -> tuple[torch.Tensor, ParamLayout]:
    """Flat parameters at init and after every epoch of one KD expert."""
    with seeded(derive_seed(0, "test-expert", index)):
        net = build_model(model, in_channels=images.shape[1], resolution=images.shape[-1], head_dim=targets.shape[1])
    snapshots = [flat_parameters(net)]
    train_regression(net, images, targets, RegressionSchedule(epochs=epochs, lr=0.1, batch_size=64),
                     generator(derive_seed(0, "test-order", index)),
                     on_epoch_end=lambda epoch, m, loss: snapshots.append(flat_parameters(m)))
    return torch.stack(snapshots), ParamLayout.of(net)


def write_expert(path: Path, params: torch.Tensor, layout: ParamLayout, run: TinyRun | None = None, **meta) -> None:
    info = {"model": MODEL.to_dict(), "in_channels": 1, "resolution": 8, "head_dim": TARGET_DIM}
    if run is not None:
        info.update(fingerprint=run.fingerprint, mean=list(run.mean), std=list(run.std))
    save_trajectory(path, params, list(range(len(params))), layout, **{**info, **meta})


def build_tiny(root: Path) -> TinyRun:
    data = load_dataset(DataConfig(name="digits", resolution=8)).subset(range(256))
    x = data.normalize()
    y = make_targets(x)
    run = TinyRun(root / "experts", root / "init" / "random.safetensors", x, y, data.mean, data.std,
                  data.fingerprint())
    for i in range(3):
        params, layout = train_expert(x, y, i)
        write_expert(run.experts / f"expert_{i:04d}.safetensors", params, layout, run, expert=i, seed=i)
    idx = torch.randperm(len(x), generator=generator(1))[:32]
    save_synthetic(run.init, SyntheticSet(x[idx], y[idx], data.mean, data.std, indices=idx,
                                          meta={"fingerprint": run.fingerprint, "data_name": "digits"}))
    return run

"""``mkdt smoke``: load a data set, build a model, run one forward pass, record it.

The installation check of the README: exercises the data layer, the model registry and the run engine
end to end on the embedded digits set, without any download. It always runs afresh.
"""

from __future__ import annotations

import dataclasses

import torch

from mkdt.config import StageConfig, require
from mkdt.data import DataConfig, load_dataset
from mkdt.engine import Stage, StageResult, StageRun, run_stage
from mkdt.models import ModelConfig, build_model, count_parameters
from mkdt.runtime import seeded


@dataclasses.dataclass
class SmokeConfig(StageConfig):
    """The data set and model of the installation check."""

    data: DataConfig = dataclasses.field(default_factory=lambda: DataConfig(name="digits", resolution=32,
                                                                             channels=3))  # what to load
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)  # what to build
    batch_size: int = 64  # images in the forward pass

    def check(self) -> None:
        require(self.batch_size >= 1, "batch_size", "at least 1", self.batch_size)


def _smoke(config: SmokeConfig, run: StageRun) -> dict:
    data = load_dataset(config.data)
    with seeded(config.seed):
        model = build_model(config.model, in_channels=data.channels, resolution=data.resolution).to(run.device)
    batch = data.normalize(data.images[: config.batch_size]).to(run.device)
    with torch.no_grad():
        features = model(batch)
    return {
        "data": data.name,
        "images": list(data.images.shape),
        "classes": data.num_classes,
        "fingerprint": data.fingerprint(),
        "mean": data.mean,
        "std": data.std,
        "model": config.model.name,
        "parameters": count_parameters(model),
        "features": list(features.shape),
    }


STAGE = Stage("smoke", SmokeConfig, _smoke,
              "load a data set, build a model and run one forward pass (installation check)",
              folder=lambda config, layout: layout.smoke_dir, cached=False)


def run_smoke(config: SmokeConfig) -> StageResult:
    return run_stage(STAGE, config)

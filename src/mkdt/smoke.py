"""``mkdt smoke``: load a data set, build a model, run one forward pass, record it.

The installation check of the README: exercises the data layer, the model registry and the artifact
store end to end on the embedded digits set, without any download.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from mkdt.artifacts import RunDir
from mkdt.config import StageConfig, to_dict
from mkdt.data import DataConfig, load_dataset
from mkdt.models import ModelConfig, build_model, count_parameters
from mkdt.runtime import resolve_device, seeded


@dataclasses.dataclass
class SmokeConfig(StageConfig):
    data: DataConfig = dataclasses.field(default_factory=lambda: DataConfig(name="digits", resolution=32,
                                                                             channels=3))
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    batch_size: int = 64


def run_smoke(config: SmokeConfig) -> dict:
    t0 = time.perf_counter()
    device = resolve_device(config.device)
    data = load_dataset(config.data)
    with seeded(config.seed):
        model = build_model(config.model, in_channels=data.channels, resolution=data.resolution).to(device)
    batch = data.normalize(data.images[: config.batch_size]).to(device)
    with torch.no_grad():
        features = model(batch)
    stage = RunDir(config.out).stage("smoke")
    stage.save_config(config)
    summary = {
        "data": data.name,
        "images": list(data.images.shape),
        "classes": data.num_classes,
        "fingerprint": data.fingerprint(),
        "mean": data.mean,
        "std": data.std,
        "model": config.model.name,
        "parameters": count_parameters(model),
        "features": list(features.shape),
        "device": str(device),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    stage.finish(to_dict(config), summary=summary)
    return {"summary": summary, "stage": str(stage.path)}

"""``mkdt subset``: real-image subset baselines (random, SAS) in the synthetic-set format.

Why the synthetic-set format: the evaluation pre-trains on a subset exactly as on a distilled set
(MSE to the teacher targets of the chosen images, lr 0.1), so a subset is stored as normalised images
+ their teacher targets + the chosen indices, and nothing downstream needs to know where it came from.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from mkdt.artifacts import load_state_file, read_metadata
from mkdt.baselines.sas import sas_select
from mkdt.config import StageConfig, require
from mkdt.data import DataConfig
from mkdt.data.imageset import ImageSet
from mkdt.engine import Stage, StageResult, StageRun, run_stage
from mkdt.errors import MkdtError
from mkdt.formats import SyntheticSet, save_synthetic
from mkdt.inputs import load_source, random_indices, resolve_size
from mkdt.layout import SET_FILE, RunLayout
from mkdt.models import ModelConfig, build_model
from mkdt.runtime import derive_seed, generator

METHODS = ("random", "sas")


@dataclasses.dataclass
class SubsetConfig(StageConfig):
    """A real subset: ``method`` random or sas, ``size`` a fraction (<1) or a count of images."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)  # the source set
    method: str = "random"  # random or sas
    size: float = 0.02  # a fraction (< 1) of the data or a count (>= 1)
    name: str | None = None  # output folder <out>/subsets/<name> (default: the method)
    targets: str | None = None  # the teacher targets (default: the run's targets/targets.safetensors)
    # SAS
    clusters: int | None = None  # k-means clusters (default: the data's number of classes, 10 when unknown)
    encoder: str | None = None  # proxy encoder state file; default: the teacher targets as embeddings
    encoder_model: ModelConfig | None = None  # its architecture when the file has no mkdt metadata
    kmeans_init: int = 3  # k-means restarts
    minibatch_kmeans: bool = False  # mini-batch k-means (large sets)
    batch_size: int = 512  # for encoding images with ``encoder`` (no effect on the result)

    def check(self) -> None:
        require(self.method in METHODS, "method", f"one of {', '.join(METHODS)}", self.method)
        name = self.name or self.method
        require(name.replace("-", "").replace("_", "").replace(".", "").isalnum(), "name",
                "letters, digits, '-', '_' or '.'", name)
        require(self.size > 0, "size", "a fraction (< 1) or a count (>= 1)", self.size)
        require(self.size < 1 or float(self.size).is_integer(), "size", "a fraction (< 1) or a whole count",
                self.size)
        require(self.clusters is None or self.clusters >= 1, "clusters", "at least 1 or null", self.clusters)
        require(self.kmeans_init >= 1, "kmeans_init", "at least 1", self.kmeans_init)


def targets_path(config: SubsetConfig) -> Path:
    return Path(config.targets) if config.targets else RunLayout(config.out).targets


def _select(config: SubsetConfig, run: StageRun) -> dict[str, Any]:
    """Choose the subset and write ``<out>/subsets/<name>/subset.safetensors``."""
    data, targets = load_source(config.data, targets_path(config))
    count = resolve_size(config.size, len(data), "subset size")
    if config.method == "random":
        indices = random_indices(len(data), count, generator(derive_seed(config.seed, "subset", "random")))
        info: dict[str, Any] = {}
    else:
        indices, info = _sas(config, data, targets.values, count, run)
    subset = SyntheticSet(
        images=data.normalize(data.images[indices]),
        targets=targets.values[indices].clone(),
        mean=data.mean,
        std=data.std,
        indices=indices,
        meta={"kind": "subset", "method": config.method, "size": count, "data_name": data.name,
              "fingerprint": data.fingerprint(), "seed": config.seed, "selection": info,
              "teacher": {k: v for k, v in targets.meta.items() if k not in ("fingerprint",)}},
    )
    path = run.output("set", SET_FILE["subset"])
    save_synthetic(path, subset)
    summary = {"method": config.method, "images": count, "of": len(data), "path": run.rel(path)}
    if info:
        summary["clusters"] = len(info["cluster_sizes"])
    return summary


def _inputs(config: SubsetConfig, layout: RunLayout) -> dict[str, Path | None]:
    found = {"targets": targets_path(config)}
    if config.encoder:
        found["encoder"] = Path(config.encoder)
    return found


STAGE = Stage(
    "subset", SubsetConfig, _select, "select a real subset baseline (random or SAS)",
    folder=lambda config, layout: layout.subset_dir(config.name or config.method), inputs=_inputs,
    input_fields=("targets", "encoder"), runtime=("batch_size",), shown=("method", "size"),
)


def select_subset(config: SubsetConfig) -> StageResult:
    """``<out>/subsets/<name>/subset.safetensors``."""
    return run_stage(STAGE, config)


def _sas(config: SubsetConfig, data: ImageSet, targets: torch.Tensor, count: int,
         run: StageRun) -> tuple[torch.Tensor, dict]:
    clusters = config.clusters or (data.num_classes or 10)
    embeddings = targets if config.encoder is None else encoder_features(config, data, run.device)
    indices, info = sas_select(embeddings, count, clusters, derive_seed(config.seed, "subset", "sas"),
                               n_init=config.kmeans_init, minibatch=config.minibatch_kmeans)
    info["proxy"] = "teacher targets" if config.encoder is None else run.rel(config.encoder)
    return indices, info


@torch.no_grad()
def encoder_features(config: SubsetConfig, data: ImageSet, device: torch.device) -> torch.Tensor:
    """Penultimate features of every image under the proxy encoder in ``config.encoder`` (eval mode)."""
    path = Path(config.encoder)
    state = load_state_file(path)
    meta = read_metadata(path) if path.suffix == ".safetensors" else {}
    if "model" in meta:
        model_cfg = ModelConfig(**meta["model"])
    elif config.encoder_model is not None:
        model_cfg = config.encoder_model
    else:
        raise MkdtError(f"{path}: no architecture recorded in the file; set encoder_model.name=... (and width/depth)")
    model = build_model(model_cfg, in_channels=int(meta.get("in_channels", data.channels)),
                        resolution=int(meta.get("resolution", data.resolution)))
    missing, _unexpected = model.load_state_dict(state, strict=False)  # extra keys (e.g. a head) are fine
    if missing:
        raise MkdtError(f"{path}: state dict does not fit {model_cfg.name} (missing {missing[:3]}); "
                        f"set encoder_model to the encoder's architecture")
    model.to(device).eval()
    mean, std = tuple(meta.get("mean", data.mean)), tuple(meta.get("std", data.std))
    if len(mean) != data.channels:
        raise MkdtError(f"{path}: encoder expects {len(mean)} channels, the data has {data.channels}; "
                        f"set data.channels={len(mean)}")
    from mkdt.data.imageset import normalize

    feats = [model.features(normalize(chunk.to(device), mean, std)).cpu()
             for chunk in data.images.split(config.batch_size)]
    return torch.cat(feats)

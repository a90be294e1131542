"""``mkdt subset``: real-image subsets (random, SAS, cluster-balanced hard examples) in the synthetic-set format.

Why the synthetic-set format: the evaluation pre-trains on a subset exactly as on a distilled set
(MSE to the teacher targets of the chosen images, lr 0.1), so a subset is stored as normalised images
+ their teacher targets + the chosen indices, and nothing downstream needs to know where it came from.

``image_scale`` s > 1 stores every chosen image at 1/s of the resolution (area downsampling) and s^2 times
as many of them in the same pixel budget: ``size`` counts full-resolution images' worth of pixels, and
loading decodes the images to full size (:func:`mkdt.formats.decode_images`). ``balanced`` with
``image_scale: 2`` is the ``balanced_lowres`` method of ``mkdt run`` (docs/RESULTS.md, beyond MKDT).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mkdt.artifacts import TensorSpec, load_state_file, load_tensors, read_metadata
from mkdt.baselines.balanced import WITHIN, balanced_select
from mkdt.baselines.sas import sas_select
from mkdt.config import StageConfig, require
from mkdt.data import DataConfig
from mkdt.data.imageset import ImageSet
from mkdt.engine import Stage, StageResult, StageRun, run_stage
from mkdt.errors import MkdtError
from mkdt.formats import DECODE_KEY, SyntheticSet, save_synthetic
from mkdt.inputs import load_source, random_indices, resolve_size
from mkdt.layout import SET_FILE, RunLayout
from mkdt.models import ModelConfig, build_model
from mkdt.runtime import derive_seed, generator

METHODS = ("random", "sas", "balanced")


@dataclasses.dataclass
class SubsetConfig(StageConfig):
    """A real subset: ``method`` random, sas or balanced; ``size`` a fraction (<1) or a count of images."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)  # the source set
    method: str = "random"  # random, sas or balanced (equal share per k-means cluster, its hardest images)
    size: float = 0.02  # a fraction (< 1) of the data or a count (>= 1), in full-resolution images
    # > 1: keep size * image_scale^2 images, each stored at 1/image_scale of the resolution (same pixels)
    image_scale: int = 1
    name: str | None = None  # output folder <out>/subsets/<name> (default: the method)
    targets: str | None = None  # the teacher targets (default: the run's targets/targets.safetensors)
    # SAS
    clusters: int | None = None  # k-means clusters (default: the data's number of classes, 10 when unknown)
    encoder: str | None = None  # proxy encoder state file; default: the teacher targets as embeddings
    encoder_model: ModelConfig | None = None  # its architecture when the file has no mkdt metadata
    kmeans_init: int = 3  # k-means restarts
    minibatch_kmeans: bool = False  # mini-batch k-means (large sets)
    batch_size: int = 512  # for encoding images with ``encoder`` (no effect on the result)
    # balanced
    within: str = "high_loss"  # which members of a cluster: high_loss (highest mean expert loss) or random
    losses: str | None = None  # per-example expert losses (default: the run's init/losses.safetensors)

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
        require(self.image_scale >= 1, "image_scale", "an integer >= 1", self.image_scale)
        require(self.within in WITHIN, "within", " or ".join(WITHIN), self.within)


def targets_path(config: SubsetConfig) -> Path:
    return Path(config.targets) if config.targets else RunLayout(config.out).targets


def losses_path(config: SubsetConfig) -> Path:
    return Path(config.losses) if config.losses else RunLayout(config.out).init_losses


def _select(config: SubsetConfig, run: StageRun) -> dict[str, Any]:
    """Choose the subset and write ``<out>/subsets/<name>/subset.safetensors``."""
    data, targets = load_source(config.data, targets_path(config))
    count = resolve_size(config.size, len(data), "subset size") * config.image_scale ** 2
    if count > len(data):
        raise MkdtError(f"subset size {config.size} at image_scale {config.image_scale} keeps {count} images, "
                        f"more than the data's {len(data)}; lower size or image_scale")
    if data.resolution % config.image_scale:
        raise MkdtError(f"subset image_scale {config.image_scale} does not divide the image size {data.resolution}; "
                        f"choose a divisor")
    if config.method == "random":
        indices = random_indices(len(data), count, generator(derive_seed(config.seed, "subset", "random")))
        info: dict[str, Any] = {}
    elif config.method == "sas":
        indices, info = _sas(config, data, targets.values, count, run)
    else:
        clusters = config.clusters or (data.num_classes or 10)
        indices, info = balanced_select(expert_losses(config, len(data), data.fingerprint()), targets.values,
                                        count, clusters, derive_seed(config.seed, "subset", "balanced"),
                                        within=config.within, n_init=config.kmeans_init)
    images = data.normalize(data.images[indices])
    stored = {}
    if config.image_scale > 1:
        images = F.avg_pool2d(images, config.image_scale)
        stored = {DECODE_KEY: data.resolution}
    subset = SyntheticSet(
        images=images,
        targets=targets.values[indices].clone(),
        mean=data.mean,
        std=data.std,
        indices=indices,
        meta={"kind": "subset", "method": config.method, "size": count, "data_name": data.name,
              "fingerprint": data.fingerprint(), "seed": config.seed, "selection": info, **stored,
              "teacher": {k: v for k, v in targets.meta.items() if k not in ("fingerprint",)}},
    )
    path = run.output("set", SET_FILE["subset"])
    save_synthetic(path, subset)
    summary = {"method": config.method, "images": count, "of": len(data), "path": run.rel(path),
               "stored_resolution": int(images.shape[-1])}
    if info:
        summary["clusters"] = len(info["cluster_sizes"])
    if data.labels is not None and data.num_classes:  # a diagnostic only: no method reads labels
        summary["class_counts"] = torch.bincount(data.labels[indices], minlength=data.num_classes).tolist()
    return summary


def expert_losses(config: SubsetConfig, count: int, fingerprint: str) -> torch.Tensor:
    """The mean per-example expert loss that ``mkdt init`` recorded, checked against the data."""
    path = losses_path(config)
    meta = read_metadata(path)
    if meta.get("fingerprint") not in (None, fingerprint):
        raise MkdtError(f"{path}: losses were computed on other data (fingerprint {meta.get('fingerprint')}, this "
                        f"data has {fingerprint}); run `mkdt init` on this data or set losses=FILE")
    return load_tensors(path, {"mean_loss": TensorSpec(shape=(count,), dtype=torch.float32)})["mean_loss"]


def _inputs(config: SubsetConfig, layout: RunLayout) -> dict[str, Path | None]:
    found = {"targets": targets_path(config)}
    if config.encoder:
        found["encoder"] = Path(config.encoder)
    if config.method == "balanced":
        found["losses"] = losses_path(config)
    return found


STAGE = Stage(
    "subset", SubsetConfig, _select,
    "select a real subset: random, SAS or balanced (cluster-balanced hard images; with image_scale 2 the "
    "balanced_lowres method)",
    folder=lambda config, layout: layout.subset_dir(config.name or config.method), inputs=_inputs,
    input_fields=("targets", "encoder", "losses"), runtime=("batch_size",),
    shown=("method", "size", "image_scale", "clusters"),
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

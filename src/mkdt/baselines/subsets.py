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

from mkdt.artifacts import StageDir, load_state_file, read_metadata
from mkdt.baselines.common import input_path, load_source, random_indices, resolve_size
from mkdt.baselines.sas import sas_select
from mkdt.config import StageConfig, to_dict
from mkdt.data import DataConfig
from mkdt.data.imageset import ImageSet
from mkdt.errors import MkdtError
from mkdt.formats import SyntheticSet, save_synthetic
from mkdt.models import ModelConfig, build_model
from mkdt.runtime import Meter, derive_seed, generator, resolve_device

METHODS = ("random", "sas")


@dataclasses.dataclass
class SubsetConfig(StageConfig):
    """A real subset: ``method`` random or sas, ``size`` a fraction (<1) or a count of images."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    method: str = "random"
    size: float = 0.02
    name: str | None = None  # output file stem under <out>/subsets/ (default: the method)
    targets: str | None = None  # default <out>/targets/targets.safetensors
    # SAS
    clusters: int | None = None  # default: the number of classes of the data (10 when unknown)
    encoder: str | None = None  # proxy encoder state file; default: the teacher targets as embeddings
    encoder_model: ModelConfig | None = None  # its architecture when the file has no mkdt metadata
    kmeans_init: int = 3
    minibatch_kmeans: bool = False
    batch_size: int = 512  # for encoding images with ``encoder``


def select_subset(config: SubsetConfig) -> dict[str, Any]:
    """Choose the subset, write ``<out>/subsets/<name>.safetensors``; a finished run is a no-op."""
    if config.method not in METHODS:
        raise MkdtError(f"unknown subset method '{config.method}'; choose one of {', '.join(METHODS)}")
    name = config.name or config.method
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise MkdtError(f"subset name '{name}' must be letters, digits, '-', '_' or '.'")
    cfg = to_dict(config)
    stage = StageDir(Path(config.out, "subsets", name))
    out_path = Path(config.out, "subsets", f"{name}.safetensors")
    if stage.is_done(cfg) and out_path.is_file():
        return stage.record()["result"]
    with Meter() as meter:
        data, targets = load_source(config.data, input_path(config.targets, config.out, "targets",
                                                            "targets.safetensors"))
        count = resolve_size(config.size, len(data), "subset size")
        stage.ensure().invalidate()
        stage.save_config(config)
        if config.method == "random":
            indices = random_indices(len(data), count, generator(derive_seed(config.seed, "subset", "random")))
            info: dict[str, Any] = {}
        else:
            indices, info = _sas(config, data, targets.values, count)
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
        save_synthetic(out_path, subset)
    summary = {"method": config.method, "images": count, "of": len(data), "path": str(out_path), **meter.as_dict()}
    if info:
        summary["clusters"] = len(info["cluster_sizes"])
    result = {"summary": summary, "path": str(out_path), "stage": str(stage.path)}
    stage.finish(cfg, result=result, selection=info)
    return result


def _sas(config: SubsetConfig, data: ImageSet, targets: torch.Tensor, count: int) -> tuple[torch.Tensor, dict]:
    clusters = config.clusters or (data.num_classes or 10)
    embeddings = targets if config.encoder is None else encoder_features(config, data)
    indices, info = sas_select(embeddings, count, clusters, derive_seed(config.seed, "subset", "sas"),
                               n_init=config.kmeans_init, minibatch=config.minibatch_kmeans)
    info["proxy"] = "teacher targets" if config.encoder is None else str(config.encoder)
    return indices, info


@torch.no_grad()
def encoder_features(config: SubsetConfig, data: ImageSet) -> torch.Tensor:
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
    device = resolve_device(config.device)
    model.to(device).eval()
    mean, std = tuple(meta.get("mean", data.mean)), tuple(meta.get("std", data.std))
    if len(mean) != data.channels:
        raise MkdtError(f"{path}: encoder expects {len(mean)} channels, the data has {data.channels}; "
                        f"set data.channels={len(mean)}")
    from mkdt.data.imageset import normalize

    feats = [model.features(normalize(chunk.to(device), mean, std)).cpu()
             for chunk in data.images.split(config.batch_size)]
    return torch.cat(feats)

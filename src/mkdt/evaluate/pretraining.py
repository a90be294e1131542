"""``mkdt pretrain``: pre-train a fresh encoder on a distilled set, a real subset or the full source set.

The paper's evaluation (Section 5): encoder + linear head to the target dimension, MSE to the set's
targets for 20 epochs with SGD (momentum 0.9, weight decay 1e-4, batch 256) through
:func:`mkdt.training.train_regression` (the same loop the experts use); the lr is the learned one for a
distilled set and 0.1 otherwise. The head is discarded and the encoder's state dict saved with everything
the probe needs to use it correctly (architecture, input shape, the pre-training normalisation).

Kinds: ``distilled`` / ``subset`` (an mkdt ``.safetensors`` set, or a ``.pt`` set: ``images.pt`` / ``labels.pt`` /
``lr.pt`` as ``mkdt export`` and DD-Ranking write them), ``full`` (source data + teacher targets,
the upper bound), ``ssl`` (Barlow Twins on a real subset, through ``mkdt.ssl`` when installed) and
``none`` (random init, the no-pre-training baseline).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mkdt.artifacts import atomic_write_text, read_metadata, save_tensors
from mkdt.config import StageConfig, require
from mkdt.data import DataConfig, load_dataset
from mkdt.engine import Stage, StageResult, StageRun, run_stage
from mkdt.errors import MkdtError
from mkdt.formats import SyntheticSet, is_pt_set, load_set, load_targets
from mkdt.layout import ENCODER_FILE, RunLayout
from mkdt.models import ModelConfig, build_model
from mkdt.progress import Progress
from mkdt.runtime import derive_seed, generator, seeded
from mkdt.training import RegressionSchedule, train_regression

KINDS = ("distilled", "subset", "full", "ssl", "none")
DEFAULT_LR = 0.1


@dataclasses.dataclass
class SslSettings:
    """Barlow Twins (or SimCLR) on a real subset, through ``mkdt.ssl`` (the paper's teacher recipe by default)."""

    objective: str = "barlow_twins"
    epochs: int = 200
    batch_size: int = 256
    optimizer: str = "adam"
    lr: float = 0.01
    weight_decay: float = 1e-6
    lr_schedule: str = "cosine"
    warmup_epochs: float = 10.0
    lambda_offdiag: float = 1 / 128
    projector_hidden: int | None = None
    projector_out: int | None = None


@dataclasses.dataclass
class PretrainSchedule(RegressionSchedule):
    """The KD schedule of pre-training; its lr defaults to the set's own (learned) lr."""

    lr: float | None = None  # null: the distilled set's learned lr, or 0.1 for real subsets and full data


@dataclasses.dataclass
class PretrainConfig(StageConfig):
    """What to pre-train on (``kind`` + ``source``/``data``/``targets``), the encoder and the schedule."""

    kind: str = "distilled"  # distilled, subset, full, ssl or none (random init, no pre-training)
    name: str | None = None  # output folder <out>/pretrain/<name>; defaults to kind
    # the set (distilled/subset/ssl): an mkdt .safetensors set, or a .pt set (a folder, or its images.pt,
    # holding images.pt / labels.pt / lr.pt as `mkdt export` and DD-Ranking write); default: the run's
    # distilled set or random subset
    source: str | None = None
    mean: list[float] | None = None  # a .pt set without manifest.json: the per-channel mean of its normalisation
    std: list[float] | None = None  # a .pt set without manifest.json: the per-channel std of its normalisation
    data: DataConfig = dataclasses.field(default_factory=DataConfig)  # the source data (kinds full and none)
    targets: str | None = None  # full: the teacher targets (default: the run's targets/targets.safetensors)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)  # the encoder
    schedule: PretrainSchedule = dataclasses.field(default_factory=PretrainSchedule)  # SGD schedule
    ssl: SslSettings = dataclasses.field(default_factory=SslSettings)  # kind=ssl only
    # A pre-training recipe recorded in the set file's metadata (e.g. krr_st: KRR-ST's own 1000-epoch
    # schedule); its epochs / lr / momentum / weight_decay / batch_size replace the schedule's.
    recipe: str | None = None

    def check(self) -> None:
        require(self.kind in KINDS, "kind", f"one of {', '.join(KINDS)}", self.kind)
        name = self.name or self.kind
        require(re.fullmatch(r"[A-Za-z0-9_.-]+", name) and name not in (".", ".."), "name",
                "a plain folder name (letters, digits, _ . -)", name)
        require((self.mean is None) == (self.std is None), "mean", "given together with std (or both null)",
                self.mean)
        require(self.std is None or all(v > 0 for v in self.std), "std", "positive values", self.std)
        require(self.recipe is None or self.kind in ("distilled", "subset"), "recipe",
                "null unless kind is distilled or subset (a set file records recipes)", self.recipe)


class Regressor(nn.Module):
    """Encoder + linear head to the target dimension; only the encoder is kept afterwards."""

    def __init__(self, encoder: nn.Module, target_dim: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.feature_dim, target_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.features(x))


@dataclasses.dataclass
class TrainingSet:
    """Normalised images + targets to regress, their normalisation and where they came from."""

    images: torch.Tensor | None
    targets: torch.Tensor | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    lr: float
    source: str
    data_name: str
    channels: int
    resolution: int
    fingerprint: str | None = None


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------
def source_path(cfg: PretrainConfig) -> Path:
    if cfg.source:
        return Path(cfg.source)
    layout = RunLayout(cfg.out)
    return layout.distilled() if cfg.kind == "distilled" else layout.init_set("random")


def targets_path(cfg: PretrainConfig) -> Path:
    return Path(cfg.targets) if cfg.targets else RunLayout(cfg.out).targets


def input_files(cfg: PretrainConfig) -> dict[str, Path | None]:
    """The file the encoder is trained from (synthetic set or teacher targets); none for ``none``."""
    if cfg.kind in ("distilled", "subset", "ssl"):
        return {"source": source_path(cfg)}
    if cfg.kind == "full":
        return {"targets": targets_path(cfg)}
    return {"source": Path(cfg.source)} if cfg.source else {}


def from_synthetic(cfg: PretrainConfig) -> TrainingSet:
    path = source_path(cfg)
    if not path.exists():
        raise MkdtError(f"{path}: set file not found; create it (`mkdt init`, `mkdt distill`) or point "
                        f"source=<file> at one, e.g. <out>/subsets/random/subset.safetensors from `mkdt subset`")
    syn: SyntheticSet = load_set(path, mean=cfg.mean, std=cfg.std)
    if cfg.kind == "distilled":
        if cfg.schedule.lr is not None:
            lr = cfg.schedule.lr
        elif syn.lr is None:
            raise MkdtError(f"{path}: no learned lr stored; a distilled set must carry its lr "
                            f"(set lr=<value>, or use kind=subset for real subsets and sets without one, e.g. KRR-ST)")
        else:
            lr = syn.lr
    else:
        lr = cfg.schedule.lr or DEFAULT_LR
    _, c, h, w = syn.images.shape
    if h != w:
        raise MkdtError(f"{path}: images are {h}x{w}; only square images are supported")
    return TrainingSet(syn.images, syn.targets, syn.mean, syn.std, lr, str(path),
                       str(syn.meta.get("data_name", path.stem)), c, h, syn.meta.get("fingerprint"))


def from_full(cfg: PretrainConfig) -> TrainingSet:
    path = targets_path(cfg)
    if not path.is_file():
        raise MkdtError(f"{path}: teacher targets not found; run `mkdt targets` or set targets=<file>")
    data = load_dataset(cfg.data)
    targets = load_targets(path, fingerprint=data.fingerprint(), count=len(data))
    return TrainingSet(data.normalize(), targets.values, data.mean, data.std, cfg.schedule.lr or DEFAULT_LR, str(path),
                       data.name, data.channels, data.resolution, data.fingerprint())


def from_data_only(cfg: PretrainConfig) -> TrainingSet:
    """``none``: only the input shape and normalisation of the source data matter."""
    if cfg.source:
        syn = load_set(cfg.source, mean=cfg.mean, std=cfg.std)
        _, c, h, _ = syn.images.shape
        return TrainingSet(None, None, syn.mean, syn.std, 0.0, str(cfg.source),
                           str(syn.meta.get("data_name", Path(cfg.source).stem)), c, h, syn.meta.get("fingerprint"))
    data = load_dataset(cfg.data)
    return TrainingSet(None, None, data.mean, data.std, 0.0, f"data:{cfg.data.name}", data.name, data.channels,
                       data.resolution, data.fingerprint())


RECIPE_FIELDS = ("epochs", "lr", "momentum", "weight_decay", "batch_size")


def with_recipe(cfg: PretrainConfig) -> PretrainConfig:
    """``cfg`` with the schedule of the recipe ``cfg.recipe`` stored in the source set's metadata."""
    if not cfg.recipe:
        return cfg
    path = source_path(cfg)
    if not path.is_file() or is_pt_set(path):
        raise MkdtError(f"{path}: mkdt set file not found; it must exist to read its recipe '{cfg.recipe}'")
    recipes = read_metadata(path).get("recipes") or {}
    if cfg.recipe not in recipes:
        names = ", ".join(sorted(recipes)) or "none"
        raise MkdtError(f"{path}: records no pre-training recipe '{cfg.recipe}' (recorded: {names}); "
                        f"unset recipe or choose a recorded one")
    chosen = recipes[cfg.recipe]
    cast = {"epochs": int, "batch_size": int}
    schedule = dataclasses.replace(cfg.schedule, **{k: cast.get(k, float)(chosen[k]) for k in RECIPE_FIELDS
                                                    if k in chosen})
    return dataclasses.replace(cfg, schedule=schedule)


def training_set(cfg: PretrainConfig) -> TrainingSet:
    if cfg.kind in ("distilled", "subset", "ssl"):
        return from_synthetic(cfg)
    if cfg.kind == "full":
        return from_full(cfg)
    return from_data_only(cfg)


def build_encoder(cfg: PretrainConfig, channels: int, resolution: int, device: torch.device) -> nn.Module:
    """A fresh encoder for the set's images; an architecture the images cannot feed is an error."""
    with seeded(derive_seed(cfg.seed, "pretrain", "encoder")):
        encoder = build_model(cfg.model, in_channels=channels, resolution=resolution)
    encoder.to(device)
    probe = torch.zeros(2, channels, resolution, resolution, device=device)
    try:
        was = encoder.training
        encoder.eval()
        with torch.no_grad():
            encoder.features(probe)
        encoder.train(was)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise MkdtError(f"model {cfg.model.name} (depth {cfg.model.depth}) cannot take {channels}x{resolution}x"
                        f"{resolution} images ({first}); choose a smaller model or resize the data") from None
    return encoder


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------
def regress(cfg: PretrainConfig, encoder: nn.Module, ts: TrainingSet, run: StageRun) -> list[float]:
    """MSE pre-training of encoder + head (the head is dropped by the caller)."""
    assert ts.images is not None and ts.targets is not None
    with seeded(derive_seed(cfg.seed, "pretrain", "head")):
        model = Regressor(encoder, ts.targets.shape[1])
    model.to(next(encoder.parameters()).device)
    schedule = dataclasses.replace(cfg.schedule, lr=ts.lr)
    log_path = run.path("log.jsonl")
    lines: list[str] = []
    with Progress(schedule.epochs, f"pretrain {run.folder.name}", unit="epoch") as bar:
        def progress(epoch: int, loss: float) -> None:
            lines.append(json.dumps({"epoch": epoch, "loss": loss, "lr": ts.lr}))
            atomic_write_text(log_path, "\n".join(lines) + "\n")
            bar.update(1, loss=loss)

        return train_regression(model, ts.images, ts.targets, schedule,
                                generator(derive_seed(cfg.seed, "pretrain", "order")), progress=progress)


def ssl_pretrain(cfg: PretrainConfig, encoder: nn.Module, ts: TrainingSet, device: torch.device,
                 run: StageRun) -> list[float]:
    """Barlow Twins on the subset's pixels with ``mkdt.ssl``'s trainer (resumable per epoch)."""
    try:
        from mkdt.ssl import AugmentConfig, BatchAugment, ObjectiveConfig, SSLSchedule, SSLTrainer
    except ImportError:
        raise MkdtError("pretrain kind 'ssl' needs mkdt.ssl (the SSL training loop), which is not available in "
                        "this installation; use kind=subset (KD on the same subset) instead") from None
    s = cfg.ssl
    objective = ObjectiveConfig(name=s.objective, projector_hidden=s.projector_hidden,
                                projector_out=s.projector_out, lambda_offdiag=s.lambda_offdiag)
    schedule = SSLSchedule(epochs=s.epochs, batch_size=s.batch_size, optimizer=s.optimizer, lr=s.lr,
                           weight_decay=s.weight_decay, lr_schedule=s.lr_schedule, warmup_epochs=s.warmup_epochs)
    trainer = SSLTrainer(encoder, objective, schedule, BatchAugment(AugmentConfig(), ts.mean, ts.std),
                         seed=derive_seed(cfg.seed, "pretrain", "ssl"), device=device)
    history = trainer.fit(denormalised_uint8(ts), checkpoint=run.path("ssl_checkpoint.safetensors"),
                          identity=run.key, log_path=run.path("log.jsonl"), desc=f"pretrain {run.folder.name}")
    return [float(r["loss"]) for r in history if "loss" in r]


def denormalised_uint8(ts: TrainingSet) -> torch.Tensor:
    """The subset's images back as uint8 pixels (SSL augmentations work on pixels)."""
    assert ts.images is not None
    m = torch.tensor(ts.mean).view(1, -1, 1, 1)
    s = torch.tensor(ts.std).view(1, -1, 1, 1)
    return ((ts.images * s + m).clamp(0, 1) * 255).round().to(torch.uint8)


def encoder_metadata(cfg: PretrainConfig, encoder: nn.Module, ts: TrainingSet, losses: list[float]) -> dict:
    return {
        "model": cfg.model.to_dict(), "in_channels": ts.channels, "resolution": ts.resolution,
        "feature_dim": int(encoder.feature_dim), "mean": list(ts.mean), "std": list(ts.std),
        "kind": cfg.kind, "source": ts.source, "name": cfg.name or cfg.kind, "data_name": ts.data_name,
        "fingerprint": ts.fingerprint, "lr": ts.lr if cfg.kind not in ("none", "ssl") else None,
        "epochs": len(losses), "final_loss": losses[-1] if losses else None, "seed": cfg.seed,
    }


def _pretrain(config: PretrainConfig, run: StageRun) -> dict[str, Any]:
    """Pre-train (or, for ``none``, just initialise) an encoder and save ``encoder.safetensors``."""
    config = with_recipe(config)
    ts = training_set(config)
    encoder = build_encoder(config, ts.channels, ts.resolution, run.device)
    losses: list[float] = []
    if config.kind == "ssl":
        losses = ssl_pretrain(config, encoder, ts, run.device, run)
    elif config.kind != "none":
        losses = regress(config, encoder, ts, run)
    meta = encoder_metadata(config, encoder, ts, losses)
    meta["source"] = run.rel(ts.source) if not ts.source.startswith("data:") else ts.source
    path = run.output("encoder", ENCODER_FILE)
    save_tensors(path, encoder.state_dict(), meta)
    run.path("ssl_checkpoint.safetensors").unlink(missing_ok=True)
    return {"name": run.folder.name, "kind": config.kind, "source": meta["source"], "lr": meta["lr"],
            "epochs": len(losses), "final_loss": meta["final_loss"], "encoder": run.rel(path), "losses": losses}


STAGE = Stage(
    "pretrain", PretrainConfig, _pretrain, "pre-train a fresh encoder on a distilled set or subset",
    folder=lambda config, layout: layout.pretrain_dir(config.name or config.kind),
    inputs=lambda config, layout: input_files(config), input_fields=("source", "targets"),
    shown=("kind", "recipe", "model.name", "model.width", "schedule.epochs", "schedule.lr"),
)


def pretrain(config: PretrainConfig) -> StageResult:
    """``<out>/pretrain/<name>/encoder.safetensors``."""
    return run_stage(STAGE, config)

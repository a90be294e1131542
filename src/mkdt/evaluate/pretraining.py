"""``mkdt pretrain``: pre-train a fresh encoder on a distilled set, a real subset or the full source set.

REFERENCE 6: encoder + linear head to the target dimension, MSE to the set's targets for 20 epochs with
SGD (momentum 0.9, weight decay 1e-4, batch 256) through :func:`mkdt.training.train_regression` (the
same loop the experts use); the lr is the learned one for a distilled set and 0.1 otherwise. The head
is discarded and the encoder's state dict saved with everything the probe needs to use it correctly
(architecture, input shape, the pre-training normalisation).

Kinds: ``distilled`` / ``subset`` (a ``save_synthetic`` file), ``full`` (source data + teacher targets,
the upper bound), ``ssl`` (Barlow Twins on a real subset, through ``mkdt.ssl`` when installed) and
``none`` (random init, the no-pre-training baseline).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from mkdt.artifacts import StageDir, atomic_write_text, config_digest, read_metadata, save_tensors, to_json
from mkdt.config import StageConfig, to_dict
from mkdt.data import DataConfig, load_dataset
from mkdt.errors import MkdtError
from mkdt.evaluate.features import file_digest
from mkdt.formats import SyntheticSet, load_synthetic, load_targets
from mkdt.models import ModelConfig, build_model
from mkdt.runtime import Meter, derive_seed, generator, resolve_device, seeded
from mkdt.training import RegressionSchedule, train_regression

KINDS = ("distilled", "subset", "full", "ssl", "none")
DEFAULT_LR = 0.1


@dataclasses.dataclass
class SslSettings:
    """Barlow Twins (or SimCLR) on a real subset, through ``mkdt.ssl`` (REFERENCE 1 recipe by default)."""

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
class PretrainConfig(StageConfig):
    """What to pre-train on (``kind`` + ``source``/``data``/``targets``), the encoder and the schedule."""

    kind: str = "distilled"
    name: str | None = None  # output folder <out>/pretrain/<name>; defaults to kind
    source: str | None = None  # synthetic-set file (distilled/subset/ssl); None = conventional path
    data: DataConfig = dataclasses.field(default_factory=DataConfig)  # full and none
    targets: str | None = None  # full: teacher targets; None = <out>/targets/targets.safetensors
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    epochs: int = 20
    lr: float | None = None  # None: the set's learned lr (distilled) or 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 256
    ssl: SslSettings = dataclasses.field(default_factory=SslSettings)  # kind=ssl only
    # A pre-training recipe recorded in the set file's metadata (e.g. krr_st: KRR-ST's own 1000-epoch
    # schedule); its epochs / lr / momentum / weight_decay / batch_size replace the ones above.
    recipe: str | None = None


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
def check_config(cfg: PretrainConfig) -> None:
    if cfg.kind not in KINDS:
        raise MkdtError(f"pretrain kind '{cfg.kind}' is unknown; choose one of {', '.join(KINDS)}")
    if cfg.epochs < 0 or cfg.batch_size < 1:
        raise MkdtError(f"pretrain epochs must be >= 0 and batch_size >= 1, got {cfg.epochs} and {cfg.batch_size}")
    if cfg.lr is not None and not cfg.lr > 0:
        raise MkdtError(f"pretrain lr must be positive (or null for the default), got {cfg.lr}")
    name = cfg.name or cfg.kind
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in (".", ".."):
        raise MkdtError(f"pretrain name '{name}' must be a plain folder name (letters, digits, _ . -)")


def latest_distilled(out: Path) -> Path:
    """``<out>/distill/distilled_<updates>.safetensors`` with the most updates."""
    folder = out / "distill"
    found = []
    for p in folder.glob("distilled_*.safetensors"):
        m = re.fullmatch(r"distilled_(\d+)\.safetensors", p.name)
        if m:
            found.append((int(m.group(1)), p))
    if not found:
        raise MkdtError(f"{folder}: no distilled_<updates>.safetensors found; run `mkdt distill` or set source=<file>")
    return max(found)[1]


def source_path(cfg: PretrainConfig) -> Path:
    if cfg.source:
        return Path(cfg.source)
    out = Path(cfg.out)
    if cfg.kind == "distilled":
        return latest_distilled(out)
    return out / "init" / "random.safetensors"


def input_file(cfg: PretrainConfig) -> Path | None:
    """The file the encoder is trained from (synthetic set or teacher targets); None for ``none``."""
    if cfg.kind in ("distilled", "subset", "ssl"):
        return source_path(cfg)
    if cfg.kind == "full":
        return Path(cfg.targets) if cfg.targets else Path(cfg.out) / "targets" / "targets.safetensors"
    return Path(cfg.source) if cfg.source else None


def input_digest(cfg: PretrainConfig) -> str | None:
    try:
        path = input_file(cfg)
    except MkdtError:
        return None
    return file_digest(path) if path is not None and path.is_file() else None


def from_synthetic(cfg: PretrainConfig) -> TrainingSet:
    path = source_path(cfg)
    if not path.is_file():
        raise MkdtError(f"{path}: set file not found; create it (`mkdt init`, `mkdt distill`) or point "
                        f"source=<file> at one, e.g. <out>/subsets/random.safetensors from `mkdt subset`")
    syn: SyntheticSet = load_synthetic(path)
    if cfg.kind == "distilled":
        if cfg.lr is not None:
            lr = cfg.lr
        elif syn.lr is None:
            raise MkdtError(f"{path}: no learned lr stored; a distilled set must carry its lr "
                            f"(set lr=<value>, or use kind=subset for real subsets and sets without one, e.g. KRR-ST)")
        else:
            lr = syn.lr
    else:
        lr = cfg.lr or DEFAULT_LR
    _, c, h, w = syn.images.shape
    if h != w:
        raise MkdtError(f"{path}: images are {h}x{w}; only square images are supported")
    return TrainingSet(syn.images, syn.targets, syn.mean, syn.std, lr, str(path),
                       str(syn.meta.get("data_name", path.stem)), c, h, syn.meta.get("fingerprint"))


def from_full(cfg: PretrainConfig) -> TrainingSet:
    path = Path(cfg.targets) if cfg.targets else Path(cfg.out) / "targets" / "targets.safetensors"
    if not path.is_file():
        raise MkdtError(f"{path}: teacher targets not found; run `mkdt targets` or set targets=<file>")
    data = load_dataset(cfg.data)
    targets = load_targets(path, fingerprint=data.fingerprint(), count=len(data))
    return TrainingSet(data.normalize(), targets.values, data.mean, data.std, cfg.lr or DEFAULT_LR, str(path),
                       data.name, data.channels, data.resolution, data.fingerprint())


def from_data_only(cfg: PretrainConfig) -> TrainingSet:
    """``none``: only the input shape and normalisation of the source data matter."""
    if cfg.source:
        syn = load_synthetic(cfg.source)
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
    if cfg.kind not in ("distilled", "subset"):
        raise MkdtError(f"pretrain recipe '{cfg.recipe}' needs kind distilled or subset (a set file that records "
                        f"recipes), not kind {cfg.kind}")
    path = source_path(cfg)
    if not path.is_file():
        raise MkdtError(f"{path}: set file not found; it must exist to read its recipe '{cfg.recipe}'")
    recipes = read_metadata(path).get("recipes") or {}
    if cfg.recipe not in recipes:
        names = ", ".join(sorted(recipes)) or "none"
        raise MkdtError(f"{path}: records no pre-training recipe '{cfg.recipe}' (recorded: {names}); "
                        f"unset recipe or choose a recorded one")
    chosen = recipes[cfg.recipe]
    cast = {"epochs": int, "batch_size": int}
    return dataclasses.replace(cfg, **{k: cast.get(k, float)(chosen[k]) for k in RECIPE_FIELDS if k in chosen})


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
def regress(cfg: PretrainConfig, encoder: nn.Module, ts: TrainingSet, stage: StageDir) -> list[float]:
    """MSE pre-training of encoder + head (the head is dropped by the caller)."""
    assert ts.images is not None and ts.targets is not None
    with seeded(derive_seed(cfg.seed, "pretrain", "head")):
        model = Regressor(encoder, ts.targets.shape[1])
    model.to(next(encoder.parameters()).device)
    schedule = RegressionSchedule(cfg.epochs, ts.lr, cfg.momentum, cfg.weight_decay, cfg.batch_size)
    log_path = stage / "log.jsonl"
    lines: list[str] = []
    bar = tqdm(total=cfg.epochs, desc=f"pretrain {cfg.name or cfg.kind}", disable=None, leave=False)

    def progress(epoch: int, loss: float) -> None:
        lines.append(to_json({"epoch": epoch, "loss": loss, "lr": ts.lr}).replace("\n", " ").strip())
        atomic_write_text(log_path, "\n".join(lines) + "\n")
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")

    try:
        return train_regression(model, ts.images, ts.targets, schedule,
                                generator(derive_seed(cfg.seed, "pretrain", "order")), progress=progress)
    finally:
        bar.close()


def ssl_pretrain(cfg: PretrainConfig, encoder: nn.Module, ts: TrainingSet, device: torch.device,
                 stage: StageDir) -> list[float]:
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
    history = trainer.fit(denormalised_uint8(ts), checkpoint=stage / "ssl_checkpoint.safetensors",
                          identity=config_digest(to_dict(cfg)), log_path=stage / "log.jsonl")
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


def pretrain(config: PretrainConfig) -> dict:
    """Pre-train (or, for ``none``, just initialise) an encoder and save ``encoder.safetensors``."""
    check_config(config)
    name = config.name or config.kind
    stage = StageDir(Path(config.out) / "pretrain" / name)
    cfg_dict = to_dict(config)
    digest = input_digest(config)
    record = stage.record() if stage.is_done(cfg_dict) else None
    if record and record.get("input_digest") == digest and (stage / "encoder.safetensors").is_file():
        return record["result"]  # same config and same input file: nothing to do
    device = resolve_device(config.device)
    recorded = config
    config = with_recipe(config)
    with Meter() as meter:
        # Inputs and architecture are checked before anything is written.
        ts = training_set(config)
        encoder = build_encoder(config, ts.channels, ts.resolution, device)
        stage.ensure().invalidate()
        stage.save_config(recorded)
        losses: list[float] = []
        if config.kind == "ssl":
            losses = ssl_pretrain(config, encoder, ts, device, stage)
        elif config.kind != "none" and config.epochs > 0:
            losses = regress(config, encoder, ts, stage)
        meta = encoder_metadata(config, encoder, ts, losses)
        path = stage / "encoder.safetensors"
        save_tensors(path, encoder.state_dict(), meta)
    result = {"encoder": str(path), "summary": {"name": name, "kind": config.kind, "source": ts.source,
                                                 "lr": meta["lr"], "epochs": len(losses),
                                                 "final_loss": meta["final_loss"], "encoder": str(path),
                                                 **meter.as_dict()}, "losses": losses}
    stage.finish(cfg_dict, result=result, input_digest=digest)
    (stage / "ssl_checkpoint.safetensors").unlink(missing_ok=True)
    return result

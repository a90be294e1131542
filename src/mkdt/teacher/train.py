"""``mkdt teacher``: self-supervised training (Barlow Twins / SimCLR) of the teacher encoder, or import.

Step 1 of MKDT (paper, Section 4). The source set's labels are never used for training; when a labelled
monitor split is configured, a kNN classifier (k=200, T=0.1) on the representation is evaluated after
epochs to show progress. Training checkpoints after every epoch in the stage folder and resumes exactly
after an interruption.

Launched by torchrun, training is data-parallel (DDP, see ``mkdt.ssl.train``): the loss and batch norms
see the global batch, so the teacher equals a one-process run's up to float32 summation order. Rank 0
alone runs the kNN monitor and writes every file.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from mkdt.config import StageConfig, require
from mkdt.data import DataConfig, ImageSet, load_dataset
from mkdt.distributed import DistContext, barrier
from mkdt.engine import Stage, StageResult, StageRun, run_stage
from mkdt.errors import MkdtError
from mkdt.layout import RunLayout, TEACHER_FILE
from mkdt.models import ModelConfig, build_model
from mkdt.runtime import derive_seed, seeded
from mkdt.ssl import AugmentConfig, BatchAugment, ObjectiveConfig, SSLSchedule, SSLTrainer, encode, knn_accuracy
from mkdt.teacher.io import import_teacher, save_teacher

CHECKPOINT_FILE = "checkpoint.safetensors"
LOG_FILE = "log.jsonl"


@dataclass
class TeacherConfig(StageConfig):
    """Source data, backbone, SSL objective/augmentation/schedule, kNN monitor, or a file to import."""

    data: DataConfig = field(default_factory=DataConfig)  # the unlabelled source set
    monitor: DataConfig | None = None  # a labelled split for the kNN monitor (null: no monitor)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="resnet18", width=64, norm="batchnorm"))
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)  # the SSL loss and its projector
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # the two-view augmentation
    schedule: SSLSchedule = field(default_factory=SSLSchedule)  # optimiser, lr schedule, epochs, precision
    knn_k: int = 200  # neighbours of the kNN monitor
    knn_temperature: float = 0.1  # temperature of the kNN monitor's weights
    monitor_every: int = 1  # run the kNN monitor every N epochs (and after the last)
    monitor_init: bool = True  # also run it on the initial weights (epoch 0)
    encode_batch_size: int = 512  # batch size of the monitor's encoding (no effect on the teacher)
    keep_checkpoint: bool = False  # keep the last epoch's checkpoint after the teacher is written
    import_path: str | None = None  # a state dict (safetensors or weights-only .pt) to import instead of training

    def check(self) -> None:
        require(self.knn_k >= 1, "knn_k", "at least 1", self.knn_k)
        require(self.knn_temperature > 0, "knn_temperature", "positive", self.knn_temperature)
        require(self.monitor_every >= 1, "monitor_every", "at least 1", self.monitor_every)
        require(self.encode_batch_size >= 1, "encode_batch_size", "at least 1", self.encode_batch_size)


def _monitor_set(config: TeacherConfig, data: ImageSet) -> ImageSet | None:
    """The labelled monitor split, shaped like the source set (resolution, channels)."""
    if config.monitor is None:
        return None
    cfg = config.monitor
    if cfg.resolution is None and config.data.resolution is not None:
        cfg = dataclasses.replace(cfg, resolution=config.data.resolution)
    if cfg.channels is None and config.data.channels is not None:
        cfg = dataclasses.replace(cfg, channels=config.data.channels)
    monitor = load_dataset(cfg)
    if monitor.labels is None:
        raise MkdtError(f"monitor data '{monitor.name}' has no labels; the kNN monitor needs a labelled split "
                        f"(set monitor: null to train without it)")
    if monitor.resolution != data.resolution:
        monitor = monitor.resized(data.resolution)
    if monitor.channels != data.channels:
        monitor = monitor.with_channels(data.channels)
    return monitor


def make_knn_monitor(model: torch.nn.Module, data: ImageSet, monitor: ImageSet, *, k: int, temperature: float,
                     batch_size: int, device: torch.device) -> Callable[[], dict[str, Any]]:
    """A callable returning ``{"knn": accuracy}``: bank = the source set (if labelled) else the monitor set
    itself (leave-one-out); queries = the monitor set; both normalised with the source set's statistics."""

    def run() -> dict[str, Any]:
        queries = encode(model, monitor.images, data.mean, data.std, batch_size=batch_size, device=device)
        if data.labels is not None:
            bank = encode(model, data.images, data.mean, data.std, batch_size=batch_size, device=device)
            acc = knn_accuracy(bank, data.labels, queries, monitor.labels, k=k, temperature=temperature)
        else:
            acc = knn_accuracy(queries, monitor.labels, queries, monitor.labels, k=k, temperature=temperature,
                               exclude_self=True)
        return {"knn": round(acc, 5)}

    return run


def _data_meta(data: ImageSet) -> dict[str, Any]:
    return {"in_channels": data.channels, "resolution": data.resolution, "fingerprint": data.fingerprint(),
            "data_name": data.name, "mean": list(data.mean), "std": list(data.std)}


def _import(config: TeacherConfig, run: StageRun) -> dict[str, Any]:
    data = load_dataset(config.data)
    path = run.output("teacher", TEACHER_FILE)
    _, meta = import_teacher(config.import_path, config.model, dest=path, in_channels=data.channels,
                             resolution=data.resolution, mean=data.mean, std=data.std,
                             fingerprint=data.fingerprint(), data_name=data.name)
    return {"teacher": run.rel(path), "imported_from": config.import_path, "feature_dim": meta["feature_dim"],
            "sha256": meta["sha256"]}


def _load_in_turn(config: TeacherConfig, ctx: DistContext) -> tuple[ImageSet, ImageSet | None]:
    """Source and monitor sets; under torchrun rank 0 loads (downloads, caches) first and the others then
    read its finished cache instead of racing to write it."""
    if ctx.is_main:
        data = load_dataset(config.data)
        monitor_set = _monitor_set(config, data)
    barrier(ctx)
    if not ctx.is_main:
        data = load_dataset(config.data)
        monitor_set = _monitor_set(config, data)
    return data, monitor_set


def _train(config: TeacherConfig, run: StageRun,
           on_epoch_end: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    if config.import_path:
        return _import(config, run) if run.is_main else {}
    device = run.device
    data, monitor_set = _load_in_turn(config, run.dist)
    with seeded(derive_seed(config.seed, "teacher-init")):
        model = build_model(config.model, in_channels=data.channels, resolution=data.resolution)
    augment = BatchAugment(config.augment, data.mean, data.std)
    trainer = SSLTrainer(model, config.objective, config.schedule, augment, seed=config.seed, device=device,
                         ctx=run.dist)
    monitor = None
    if monitor_set is not None:
        monitor = make_knn_monitor(trainer.backbone, data, monitor_set, k=config.knn_k,
                                   temperature=config.knn_temperature, batch_size=config.encode_batch_size,
                                   device=device)
    images = data.images.to(device) if device.type == "cuda" else data.images
    t0 = time.perf_counter()
    history = trainer.fit(images, checkpoint=run.path(CHECKPOINT_FILE), identity=run.key, monitor=monitor,
                          monitor_every=config.monitor_every, monitor_init=config.monitor_init,
                          log_path=run.path(LOG_FILE), on_epoch_end=on_epoch_end, desc="teacher")
    if not run.is_main:
        return {}
    summary = _finish(config, run, trainer, history, data, this_run_seconds=time.perf_counter() - t0)
    if not config.keep_checkpoint:
        run.path(CHECKPOINT_FILE).unlink(missing_ok=True)
    return summary


def _finish(config: TeacherConfig, run: StageRun, trainer: SSLTrainer, history: list[dict], data: ImageSet, *,
            this_run_seconds: float) -> dict[str, Any]:
    """Write the teacher file (rank 0); returns the summary."""
    trained = [r for r in history if r.get("epoch", 0) > 0]
    knn = [r for r in history if "knn" in r]
    meta = {"model": config.model.to_dict(), "feature_dim": int(trainer.backbone.feature_dim), **_data_meta(data),
            "source": "trained", "objective": config.objective.name, "epochs": config.schedule.epochs,
            "knn": knn[-1]["knn"] if knn else None}
    path = run.output("teacher", TEACHER_FILE)
    digest = save_teacher(path, trainer.backbone, meta)
    return {
        "teacher": run.rel(path), "sha256": digest, "epochs": config.schedule.epochs,
        "final_loss": trained[-1]["loss"] if trained else None,
        "knn": meta["knn"], "knn_init": history[0].get("knn") if history and history[0]["epoch"] == 0 else None,
        "train_seconds": round(sum(r["seconds"] for r in trained), 1),
        "images_per_second": _median([r["images_per_second"] for r in trained if r.get("images_per_second")]),
        "this_run_seconds": round(this_run_seconds, 1),
    }


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[len(values) // 2]


def _inputs(config: TeacherConfig, layout: RunLayout) -> dict[str, Path | None]:
    return {"import": Path(config.import_path)} if config.import_path else {}


STAGE = Stage(
    "teacher", TeacherConfig, _train, "train (or import) the self-supervised teacher",
    folder=lambda config, layout: layout.teacher_dir, inputs=_inputs, input_fields=("import_path",),
    runtime=("monitor", "knn_k", "knn_temperature", "monitor_every", "monitor_init", "encode_batch_size",
             "keep_checkpoint"),
    torchrun=True, shown=("import_path", "model.name", "model.width", "objective.name", "schedule.epochs",
                          "schedule.batch_size"),
)


def train_teacher(config: TeacherConfig, *, on_epoch_end: Callable[[int, dict], None] | None = None) -> StageResult:
    """Train (or import) the teacher into ``<out>/teacher/teacher.safetensors``.

    ``on_epoch_end(epoch, record)`` is called (on every rank) after each epoch's checkpoint is on disk
    (tests use it to interrupt a run).
    """
    return run_stage(STAGE, config, on_epoch_end=on_epoch_end)

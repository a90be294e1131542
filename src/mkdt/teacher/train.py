"""``mkdt teacher``: self-supervised training (Barlow Twins / SimCLR) of the teacher encoder, or import.

Stage 1 of REFERENCE.md. The source set's labels are never used for training; when a labelled
monitor split is configured, a kNN classifier (k=200, T=0.1) on the representation is evaluated
after epochs to show progress. Training checkpoints after every epoch in the stage folder and
resumes exactly after an interruption.

Launched by torchrun, training is data-parallel (DDP, see ``mkdt.ssl.train``): the loss and batch norms
see the global batch, so the teacher equals a one-process run's up to float32 summation order. Rank 0
alone decides whether the stage is done, runs the kNN monitor and writes every file; all ranks return
the same result.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from mkdt.artifacts import RunDir, StageDir
from mkdt.config import StageConfig, to_dict
from mkdt.data import DataConfig, ImageSet, load_dataset
from mkdt.distributed import DistContext, barrier, broadcast_object, init_distributed
from mkdt.errors import MkdtError
from mkdt.models import ModelConfig, build_model
from mkdt.runtime import Meter, derive_seed, seeded
from mkdt.ssl import AugmentConfig, BatchAugment, ObjectiveConfig, SSLSchedule, SSLTrainer, encode, knn_accuracy
from mkdt.teacher.io import TEACHER_FILE, import_teacher, save_teacher

CHECKPOINT_FILE = "checkpoint.safetensors"
LOG_FILE = "log.jsonl"


@dataclass
class TeacherConfig(StageConfig):
    """Source data, backbone, SSL objective/augmentation/schedule, kNN monitor, or a file to import."""

    data: DataConfig = field(default_factory=DataConfig)
    monitor: DataConfig | None = None
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="resnet18", width=64, norm="batchnorm"))
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    schedule: SSLSchedule = field(default_factory=SSLSchedule)
    knn_k: int = 200
    knn_temperature: float = 0.1
    monitor_every: int = 1
    monitor_init: bool = True
    encode_batch_size: int = 512
    keep_checkpoint: bool = False
    import_path: str | None = None


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


def _import(config: TeacherConfig, stage: StageDir, cfg_dict: dict) -> dict[str, Any]:
    data = load_dataset(config.data)
    with Meter() as meter:
        _, meta = import_teacher(config.import_path, config.model, dest=stage / TEACHER_FILE,
                                 in_channels=data.channels, resolution=data.resolution, mean=data.mean,
                                 std=data.std, fingerprint=data.fingerprint(), data_name=data.name)
    summary = {"teacher": str(stage / TEACHER_FILE), "imported_from": config.import_path,
               "feature_dim": meta["feature_dim"], "sha256": meta["sha256"], **meter.as_dict()}
    stage.finish(cfg_dict, summary=summary)
    return {"summary": summary, "stage": str(stage.path)}


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


def train_teacher(config: TeacherConfig, *, on_epoch_end: Callable[[int, dict], None] | None = None,
                  progress: bool | None = None) -> dict[str, Any]:
    """Train (or import) the teacher; writes ``<out>/teacher/teacher.safetensors`` and ``stage.json``.

    ``on_epoch_end(epoch, record)`` is called (on every rank) after each epoch's checkpoint is on disk
    (tests use it to interrupt a run).
    """
    ctx = init_distributed(config.device)
    cfg_dict = to_dict(config)
    stage = RunDir(config.out).stage("teacher")
    done = broadcast_object((stage.record() or {}) if ctx.is_main and stage.is_done(cfg_dict) else None, ctx)
    if done is not None:
        return done
    if ctx.is_main:
        stage.invalidate()
        stage.save_config(config)
    if config.import_path:
        return broadcast_object(_import(config, stage, cfg_dict) if ctx.is_main else None, ctx)

    device = ctx.device
    data, monitor_set = _load_in_turn(config, ctx)
    with seeded(derive_seed(config.seed, "teacher-init")):
        model = build_model(config.model, in_channels=data.channels, resolution=data.resolution)
    augment = BatchAugment(config.augment, data.mean, data.std)
    trainer = SSLTrainer(model, config.objective, config.schedule, augment, seed=config.seed, device=device,
                         ctx=ctx)
    monitor = None
    if monitor_set is not None:
        monitor = make_knn_monitor(trainer.backbone, data, monitor_set, k=config.knn_k,
                                   temperature=config.knn_temperature, batch_size=config.encode_batch_size,
                                   device=device)
    images = data.images.to(device) if device.type == "cuda" else data.images
    t0 = time.perf_counter()
    with Meter() as meter:
        history = trainer.fit(images, checkpoint=stage / CHECKPOINT_FILE, identity=stage_identity(cfg_dict),
                              monitor=monitor, monitor_every=config.monitor_every, monitor_init=config.monitor_init,
                              log_path=stage / LOG_FILE, on_epoch_end=on_epoch_end, progress=progress)
    result = None
    if ctx.is_main:
        result = _finish(config, stage, cfg_dict, trainer, history, data, ctx,
                         this_run_seconds=time.perf_counter() - t0, peak_mb=meter.as_dict()["peak_mb"])
    return broadcast_object(result, ctx)


def _finish(config: TeacherConfig, stage: StageDir, cfg_dict: dict, trainer: SSLTrainer, history: list[dict],
            data: ImageSet, ctx: DistContext, *, this_run_seconds: float, peak_mb: Any) -> dict[str, Any]:
    """Write the teacher file and ``stage.json`` (rank 0), drop the checkpoint; returns the stage result."""
    trained = [r for r in history if r.get("epoch", 0) > 0]
    knn = [r for r in history if "knn" in r]
    meta = {"model": config.model.to_dict(), "feature_dim": int(trainer.backbone.feature_dim), **_data_meta(data),
            "source": "trained", "objective": config.objective.name, "epochs": config.schedule.epochs,
            "knn": knn[-1]["knn"] if knn else None}
    digest = save_teacher(stage / TEACHER_FILE, trainer.backbone, meta)
    summary = {
        "teacher": str(stage / TEACHER_FILE), "sha256": digest, "epochs": config.schedule.epochs,
        "final_loss": trained[-1]["loss"] if trained else None,
        "knn": meta["knn"], "knn_init": history[0].get("knn") if history and history[0]["epoch"] == 0 else None,
        "train_seconds": round(sum(r["seconds"] for r in trained), 1),
        "images_per_second": _median([r["images_per_second"] for r in trained if r.get("images_per_second")]),
        "this_run_seconds": round(this_run_seconds, 1), "peak_mb": peak_mb,
        "device": str(ctx.device),
    }
    stage.finish(cfg_dict, summary=summary, world_size=ctx.world_size)
    if not config.keep_checkpoint:
        (stage / CHECKPOINT_FILE).unlink(missing_ok=True)
    return {"summary": summary, "stage": str(stage.path)}


def stage_identity(cfg_dict: dict) -> str:
    """What a checkpoint must have been written for to be resumed: the config minus settings that do not
    change the weights (device, run folder, checkpoint keeping)."""
    from mkdt.artifacts import config_digest

    return config_digest({k: v for k, v in cfg_dict.items() if k not in ("device", "out", "keep_checkpoint")})


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[len(values) // 2]

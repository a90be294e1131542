"""``mkdt experts``: knowledge-distillation expert trajectories (paper, Section 4: step 3).

Each expert is a fresh student (ConvNet + linear head to the target dimension) trained with MSE to
the teacher's targets by the shared :func:`mkdt.training.train_regression` loop, or K at a time by
:mod:`mkdt.experts.batched` (same mathematics). Its flat parameters at init and after every stored
epoch are copies (never views: the authors' defect) written to one safetensors file per expert.

Determinism: expert ``i`` draws its init from ``derive_seed(seed, "expert", i, "init")`` and its
minibatch order from ``derive_seed(seed, "expert", i, "order")``, so it is the same expert whether
trained alone, in a batch of K, by another process, or added later: raising ``num_experts`` keeps the
finished experts and trains only the new ones (the stage extends in place). Under torchrun each rank
trains its round-robin share of the unfinished experts.

``keep_epochs``: distillation only reads epochs ``0..max_start_epoch + expert_epochs``; with
``keep_epochs`` set, only epochs ``0..keep_epochs`` are stored and training stops after epoch
``keep_epochs`` (the learning rate is constant, so the stored epochs are exactly those of a full
``epochs``-long run). The summary says so (``trained_epochs``, ``stopped_early``).

Resume: a finished expert is a file that exists, loads and was trained with the same settings; it is
kept. A batch of K students also checkpoints after every epoch (``partial_<first>-<last>``).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from mkdt.artifacts import JsonLog, TensorSpec, config_digest, load_tensors, read_metadata, save_tensors
from mkdt.config import StageConfig, require
from mkdt.data import DataConfig
from mkdt.distributed import DistContext, barrier, broadcast_object, gather_records, shard
from mkdt.engine import Stage, StageResult, StageRun, run_stage
from mkdt.errors import MkdtError
from mkdt.experts import ssl_experts
from mkdt.experts.batched import IMPLS, BatchedState, check_batchable, make_forward, train_students
from mkdt.experts.ssl_experts import SslExpertSettings
from mkdt.formats import load_trajectory, save_trajectory
from mkdt.inputs import load_source, tensor_digest
from mkdt.layout import EXPERT_FILE, RunLayout
from mkdt.models import ModelConfig, build_model
from mkdt.models.functional import ParamLayout, flat_parameters
from mkdt.progress import Progress
from mkdt.runtime import derive_seed, generator, resolve_device, seeded
from mkdt.training import RegressionSchedule, train_regression

PARTIAL_FILE = "partial_{:04d}-{:04d}.safetensors"
LOG_FILE = "log.jsonl"
RANK_LOG_FILE = "log-rank{}.jsonl"  # one per rank under torchrun


@dataclass
class ExpertsConfig(StageConfig):
    """Expert training (paper defaults: 100 ConvNet-D3-W128 students, SGD 0.1/0.9/1e-4, batch 256, 20 epochs)."""

    data: DataConfig = field(default_factory=DataConfig)  # the source set (as the targets were computed)
    model: ModelConfig = field(default_factory=ModelConfig)  # the student architecture
    num_experts: int = 100  # trajectories to train; raising it later trains only the new ones
    schedule: RegressionSchedule = field(default_factory=RegressionSchedule)  # each expert's SGD schedule
    keep_epochs: int | None = None  # store (and train) only epochs 0..keep_epochs (null: all epochs)
    batch_students: int = 1  # K students trained at once (1 = one by one through train_regression)
    batched_impl: str = "auto"  # auto | grouped | vmap (see mkdt.experts.batched)
    targets: str | None = None  # the teacher targets (default: the run's targets/targets.safetensors)
    threads: int = 0  # torch intra-op threads (0 = torch default)
    # kd: MSE to the teacher targets (MKDT). ssl: the naive MTT-SSL baseline, backbone + projector trained
    # with the SSL loss on two augmented views, no targets (see mkdt.experts.ssl_experts)
    objective: str = "kd"
    ssl: SslExpertSettings = field(default_factory=SslExpertSettings)  # objective ssl only
    name: str | None = None  # a variant's folder experts-<name> (e.g. ssl for MTT-SSL); null: experts

    def check(self) -> None:
        require(self.num_experts >= 1, "num_experts", "at least 1", self.num_experts)
        require(self.schedule.lr is not None, "schedule.lr", "a learning rate", self.schedule.lr)
        require(self.keep_epochs is None or self.keep_epochs >= 1, "keep_epochs", "at least 1 or null (all epochs)",
                self.keep_epochs)
        require(self.batch_students >= 1, "batch_students", "at least 1", self.batch_students)
        require(self.batched_impl in IMPLS, "batched_impl", f"one of {', '.join(IMPLS)}", self.batched_impl)
        require(self.threads >= 0, "threads", ">= 0 (0 = torch default)", self.threads)
        require(self.objective in ssl_experts.OBJECTIVES, "objective", "kd or ssl", self.objective)
        require(self.objective != "ssl" or self.batch_students == 1, "batch_students",
                "1 with objective ssl (SSL experts train one by one)", self.batch_students)
        require(self.objective != "ssl" or self.schedule.batch_size >= 2, "schedule.batch_size",
                "at least 2 with objective ssl", self.schedule.batch_size)
        require(self.name is None or (self.name.replace("_", "").replace("-", "").isalnum()), "name",
                "letters, digits, '-' or '_'", self.name)

    @property
    def trained_epochs(self) -> int:
        return self.schedule.epochs if self.keep_epochs is None else min(self.schedule.epochs, self.keep_epochs)

    def training_schedule(self) -> RegressionSchedule:
        return dataclasses.replace(self.schedule, epochs=self.trained_epochs)


def targets_path(config: ExpertsConfig) -> Path:
    return Path(config.targets) if config.targets else RunLayout(config.out).targets


# ----------------------------------------------------------------------------------------------
# what every expert needs
# ----------------------------------------------------------------------------------------------
@dataclass
class ExpertContext:
    """Data, targets and student description shared by all experts of a run (built once)."""

    config: ExpertsConfig
    folder: Path
    device: torch.device
    images: torch.Tensor  # normalised, on device
    targets: torch.Tensor  # on device
    in_channels: int
    resolution: int
    head_dim: int
    layout: ParamLayout
    meta: dict[str, Any]  # metadata common to every expert file
    log: JsonLog

    def path(self, index: int) -> Path:
        return self.folder / EXPERT_FILE.format(index)

    def build(self, index: int) -> torch.nn.Module:
        """Expert ``index``'s student at its seeded init (built on CPU, so inits agree across devices)."""
        with seeded(init_seed(self.config.seed, index)):
            return build_model(self.config.model, in_channels=self.in_channels, resolution=self.resolution,
                               head_dim=self.head_dim)

    def order_generator(self, index: int) -> torch.Generator:
        return generator(order_seed(self.config.seed, index))


def init_seed(seed: int, index: int) -> int:
    return derive_seed(seed, "expert", index, "init")


def order_seed(seed: int, index: int) -> int:
    return derive_seed(seed, "expert", index, "order")


def prepare(config: ExpertsConfig, folder: Path | None = None) -> ExpertContext:
    """Load and check data + targets, and describe the student; refuses targets of other data.

    Objective ssl: data only (no targets, ``targets`` is ``None``), and the student is backbone +
    projector (:mod:`mkdt.experts.ssl_experts`); its files record ``objective: ssl``. KD files carry no
    ``objective`` key (absent = kd).
    """
    device = resolve_device(config.device)
    folder = folder if folder is not None else RunLayout(config.out).experts_dir(config.name)
    folder.mkdir(parents=True, exist_ok=True)
    if config.objective == "ssl":
        data, layout, settings = ssl_experts.describe(config)
        meta = {**settings, "settings_digest": config_digest(settings), "data_name": data.name,
                "epochs_configured": config.schedule.epochs, "keep_epochs": config.keep_epochs}
        return ExpertContext(config, folder, device, data.normalize().to(device), None, data.channels,
                             data.resolution, 0, layout, meta, JsonLog(folder / LOG_FILE))
    data, targets = load_source(config.data, targets_path(config))
    fingerprint = data.fingerprint()
    head_dim = targets.dim
    with seeded(0):
        probe = build_model(config.model, in_channels=data.channels, resolution=data.resolution, head_dim=head_dim)
    if config.batch_students > 1:
        check_batchable(probe, f"student ({config.model.name}, norm={config.model.norm})")
    layout = ParamLayout.of(probe)
    stored = list(range(config.trained_epochs + 1))
    sched = config.schedule
    settings = {
        "model": config.model.to_dict(), "in_channels": data.channels, "resolution": data.resolution,
        "head_dim": head_dim, "seed": config.seed, "fingerprint": fingerprint,
        "targets_digest": tensor_digest(targets.values), "mean": list(data.mean), "std": list(data.std),
        "lr": sched.lr, "momentum": sched.momentum, "weight_decay": sched.weight_decay,
        "batch_size": sched.batch_size, "trained_epochs": config.trained_epochs, "stored_epochs": stored,
    }
    meta = {**settings, "settings_digest": config_digest(settings), "data_name": data.name,
            "epochs_configured": sched.epochs, "keep_epochs": config.keep_epochs}
    return ExpertContext(config, folder, device, data.normalize().to(device), targets.values.to(device),
                         data.channels, data.resolution, head_dim, layout, meta, JsonLog(folder / LOG_FILE))


# ----------------------------------------------------------------------------------------------
# finished experts
# ----------------------------------------------------------------------------------------------
def finished(ctx: ExpertContext, index: int) -> bool:
    """A finished expert: its file exists, loads (finite, moving, right architecture) and has our settings.

    A readable file trained with other settings is an error (never silently mixed or overwritten); an
    unreadable or broken one is retrained (the new file replaces it atomically).
    """
    path = ctx.path(index)
    if not path.is_file():
        return False
    try:
        meta = read_metadata(path)
    except (MkdtError, ValueError):
        return False
    if meta.get("settings_digest") != ctx.meta["settings_digest"]:
        raise MkdtError(f"{path}: this expert was trained with other settings (data, targets, model, seed or "
                        f"SGD schedule differ); use another --out or delete {ctx.folder} to retrain")
    try:
        load_trajectory(path, layout=ctx.layout)
    except MkdtError:
        return False
    return True


def _save_expert(ctx: ExpertContext, index: int, params: torch.Tensor, losses: Sequence[float],
                 seconds: float, how: str) -> dict[str, Any]:
    epochs = list(range(params.shape[0]))
    for e in range(1, len(epochs)):
        if torch.equal(params[e], params[e - 1]):
            raise MkdtError(f"expert {index}: parameters did not change in epoch {e} (lr {ctx.config.lr}); "
                            f"an expert without displacement is useless for matching, raise the lr")
    save_trajectory(ctx.path(index), params, epochs, ctx.layout, **ctx.meta, expert=index,
                    init_seed=init_seed(ctx.config.seed, index), order_seed=order_seed(ctx.config.seed, index),
                    losses=[float(v) for v in losses], trained_with=how)
    record = {"expert": index, "path": ctx.path(index).name, "final_loss": float(losses[-1]),
              "seconds": round(seconds, 3), "trained_with": how}
    ctx.log.write(**record)
    return record


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------
def _train_one(ctx: ExpertContext, index: int, bar: Progress) -> dict[str, Any]:
    """One expert through the shared KD loop (objective ssl: the SSL loop of :mod:`ssl_experts`),
    snapshotting a copy of the parameters after every epoch."""
    t0 = time.perf_counter()
    cfg = ctx.config
    ssl = cfg.objective == "ssl"
    student = (ssl_experts.build_student(cfg.model, cfg.ssl, ctx.in_channels, ctx.resolution,
                                         init_seed(cfg.seed, index)) if ssl else ctx.build(index))
    model = student.to(ctx.device).train()
    snapshots = [flat_parameters(model).cpu()]

    def snapshot(epoch: int, module: torch.nn.Module, loss: float) -> None:
        snapshots.append(flat_parameters(module).cpu())
        ctx.log.write(expert=index, epoch=epoch, loss=float(loss), seconds=round(time.perf_counter() - t0, 3))
        bar.set(expert=index, epoch=epoch, loss=float(loss))

    if ssl:
        losses = ssl_experts.train_ssl(model, ctx.images, cfg.ssl, cfg.training_schedule(), ctx.meta["mean"],
                                       ctx.meta["std"],
                                       ctx.order_generator(index),
                                       generator(ssl_experts.augment_seed(cfg.seed, index)), on_epoch_end=snapshot)
    else:
        losses = train_regression(model, ctx.images, ctx.targets, ctx.config.training_schedule(),
                                  ctx.order_generator(index), on_epoch_end=snapshot)
    return _save_expert(ctx, index, torch.stack(snapshots), losses, time.perf_counter() - t0, "sequential")


def _partial_path(ctx: ExpertContext, group: Sequence[int]) -> Path:
    return ctx.folder / PARTIAL_FILE.format(group[0], group[-1])


def _load_partial(ctx: ExpertContext, group: Sequence[int]) -> BatchedState | None:
    """A batch's epoch checkpoint, if one exists for exactly these experts and settings."""
    path = _partial_path(ctx, group)
    if not path.is_file():
        return None
    try:
        meta = read_metadata(path)
        if meta.get("experts") != list(group) or meta.get("settings_digest") != ctx.meta["settings_digest"]:
            return None
        epoch = int(meta["epoch"])
        k, p = len(group), ctx.layout.numel
        spec = {"snapshots": TensorSpec(shape=(k, epoch + 1, p), dtype=torch.float32)}
        if ctx.config.schedule.momentum:
            spec["momentum"] = TensorSpec(shape=(k, p), dtype=torch.float32)
        tensors = load_tensors(path, spec)
    except (MkdtError, KeyError, ValueError):
        return None  # a broken checkpoint only costs the epochs it held
    snaps = tensors["snapshots"]
    momentum = None
    if "momentum" in tensors:
        parts = ctx.layout.unflatten(tensors["momentum"].to(ctx.device))
        momentum = [parts[n].contiguous() for n in ctx.layout.names]
    state = BatchedState.fresh(ctx.layout, list(snaps[:, epoch]), ctx.device)
    state.epoch, state.momentum = epoch, momentum
    state.snapshots = [snaps[:, e].clone() for e in range(epoch + 1)]
    state.losses = [list(map(float, row)) for row in meta["losses"]]
    return state


def _save_partial(ctx: ExpertContext, group: Sequence[int], state: BatchedState) -> None:
    tensors = {"snapshots": state.trajectories()}
    if state.momentum is not None:
        k = state.size
        tensors["momentum"] = torch.cat([m.detach().reshape(k, -1).cpu() for m in state.momentum], dim=1)
    save_tensors(_partial_path(ctx, group), tensors, {"experts": list(group), "epoch": state.epoch,
                                                     "losses": state.losses,
                                                     "settings_digest": ctx.meta["settings_digest"]})


def _train_group(ctx: ExpertContext, group: Sequence[int], bar: Progress) -> list[dict[str, Any]]:
    """K experts at once on stacked parameters; checkpoints after every epoch."""
    t0 = time.perf_counter()
    cfg = ctx.config
    module = ctx.build(group[0]).to(ctx.device)
    state = _load_partial(ctx, group)
    if state is None:
        state = BatchedState.fresh(ctx.layout, [flat_parameters(ctx.build(i)) for i in group], ctx.device)
    generators = [ctx.order_generator(i) for i in group]
    _, impl = make_forward(module, cfg.batched_impl, ctx.device)

    def on_step(step: int, total: int) -> None:
        bar.set(experts=f"{group[0]}-{group[-1]}", step=f"{step}/{total}")

    def on_epoch(s: BatchedState) -> None:
        _save_partial(ctx, group, s)
        ctx.log.write(experts=list(group), epoch=s.epoch, losses=s.losses[-1])
        bar.set(experts=f"{group[0]}-{group[-1]}", epoch=s.epoch)

    state = train_students(module, ctx.layout, state, ctx.images, ctx.targets, cfg.training_schedule(), generators,
                           impl=cfg.batched_impl, on_epoch_end=on_epoch, progress=on_step)
    seconds = (time.perf_counter() - t0) / len(group)
    trajectories = state.trajectories()
    records = [_save_expert(ctx, index, trajectories[j], [row[j] for row in state.losses], seconds,
                            f"batched K={len(group)} ({impl})")
               for j, index in enumerate(group)]
    _partial_path(ctx, group).unlink(missing_ok=True)
    return records


def train_expert_range(
    config: ExpertsConfig,
    indices: Sequence[int],
    *,
    context: ExpertContext | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Train the experts ``indices`` (skipping finished ones) into the run's experts folder.

    For sharding by hand (one process per share): each process calls this with its own indices;
    afterwards :func:`train_experts` finds them finished, trains any missing and records the stage.
    """
    bad = [i for i in indices if not 0 <= int(i) < config.num_experts]
    if bad:
        raise MkdtError(f"expert indices {bad[:3]} are outside 0..{config.num_experts - 1} (num_experts)")
    from mkdt.runtime import torch_threads

    with torch_threads(config.threads):
        ctx = context or prepare(config)
        todo = _unfinished(ctx, [int(i) for i in indices])
        return _train_todo(ctx, todo, callback, total=len(indices), enabled=True)


def _unfinished(ctx: ExpertContext, indices: Sequence[int]) -> list[int]:
    """The experts among ``indices`` still to train (a finished one is kept, see :func:`finished`)."""
    return [i for i in indices if not finished(ctx, i)]


def _train_todo(ctx: ExpertContext, todo: list[int], callback: Callable[[dict[str, Any]], None] | None, *,
                total: int, enabled: bool) -> list[dict[str, Any]]:
    """Train the unfinished experts ``todo``, ``batch_students`` at a time; progress counts ``total``."""
    records: list[dict[str, Any]] = []
    k = ctx.config.batch_students
    with Progress(total, "experts", initial=total - len(todo), unit="expert", enabled=enabled) as bar:
        for start in range(0, len(todo), k):
            group = todo[start:start + k]
            done = [_train_one(ctx, group[0], bar)] if k == 1 else _train_group(ctx, group, bar)
            for record in done:
                records.append(record)
                bar.update(1, loss=record["final_loss"])
                if callback is not None:
                    callback(record)
    return records


def _train(config: ExpertsConfig, run: StageRun,
           callback: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train ``num_experts`` trajectories into the stage folder, keeping finished ones.

    Launched by torchrun, the unfinished experts are split round-robin between the ranks. Expert ``i``
    depends only on its own seeds, so every file equals a one-process run's and the ranks need no
    communication until the end; rank 0 then checks every file. ``callback(record)`` runs on the rank
    that saved the expert.
    """
    dctx = run.dist
    ctx = _prepare_in_turn(config, run)
    # Rank 0 lists the unfinished experts once: a rank checking later could see files another already wrote.
    todo = broadcast_object(_unfinished(ctx, range(config.num_experts)) if dctx.is_main else None, dctx)
    if dctx.is_main and len(todo) < config.num_experts:
        run.note(f"{config.num_experts - len(todo)} of {config.num_experts} experts are finished and kept; "
                 f"training {len(todo)}")
    mine = shard(todo, dctx)
    own = _train_todo(ctx, mine, callback, total=config.num_experts - len(todo) + len(mine),
                      enabled=dctx.is_main)
    records = _gather_records(own, dctx)  # waits for every rank
    if not dctx.is_main:
        return {}
    _check_all_written(ctx, dctx)
    for i in range(config.num_experts):
        run.output(f"expert_{i:04d}", EXPERT_FILE.format(i))
    for stale in run.folder.glob("partial_*.safetensors"):
        stale.unlink(missing_ok=True)
    return _summary(ctx, records, config.num_experts - len(records))


def _prepare_in_turn(config: ExpertsConfig, run: StageRun) -> ExpertContext:
    """:func:`prepare` on rank 0 first (it may decode and cache the data), then on the others.

    Under torchrun every rank appends to its own ``log-rank<r>.jsonl``, so no two processes share a file.
    """
    dctx = run.dist
    ctx = prepare(config, run.folder) if dctx.is_main else None
    barrier(dctx)
    if ctx is None:
        ctx = prepare(config, run.folder)
    if dctx.distributed:
        ctx.log = JsonLog(run.folder / RANK_LOG_FILE.format(dctx.rank))
    return ctx


def _gather_records(own: list[dict[str, Any]], dctx: DistContext) -> list[dict[str, Any]]:
    """Every rank's expert records, in expert order (this rank's own in a single process)."""
    merged = gather_records({str(r["expert"]): r for r in own}, dctx)
    return sorted(merged.values(), key=lambda r: r["expert"])


def _check_all_written(ctx: ExpertContext, dctx: DistContext) -> None:
    """Under torchrun, refuse to record the stage unless every expert file (most written by other
    processes, maybe on other nodes) is there and loads; one process has just written its own."""
    if not dctx.distributed:
        return
    missing = _unfinished(ctx, range(ctx.config.num_experts))
    if missing:
        raise MkdtError(f"experts {missing[:5]} are missing or unreadable in {ctx.folder} after every rank "
                        f"finished (is --out on a file system all nodes share?); re-run to train them")


def _summary(ctx: ExpertContext, records: list[dict[str, Any]], already: int) -> dict[str, Any]:
    cfg = ctx.config
    files = [ctx.path(i) for i in range(cfg.num_experts)]
    final = [float(read_metadata(p).get("losses", [float("nan")])[-1]) for p in files]
    trained_seconds = sum(r["seconds"] for r in records)
    return {
        "experts": cfg.num_experts,
        "trained_now": len(records),
        "resumed_finished": already,
        "stored_epochs": list(range(cfg.trained_epochs + 1)),
        "trained_epochs": cfg.trained_epochs,
        "epochs_configured": cfg.schedule.epochs,
        "stopped_early": cfg.trained_epochs < cfg.schedule.epochs,
        "note": (f"keep_epochs={cfg.keep_epochs}: only epochs 0..{cfg.trained_epochs} are stored, so training "
                 f"stopped after epoch {cfg.trained_epochs} of {cfg.schedule.epochs} (constant lr: the stored "
                 f"epochs equal those of the full run)") if cfg.trained_epochs < cfg.schedule.epochs
        else "all epochs trained and stored",
        "batch_students": cfg.batch_students,
        "parameters": ctx.layout.numel,
        "bytes_per_expert": files[0].stat().st_size if files else 0,
        "final_loss_mean": sum(final) / len(final),
        "final_loss_min": min(final),
        "final_loss_max": max(final),
        "seconds_per_expert": round(trained_seconds / len(records), 3) if records else None,
        "experts_per_hour": round(3600 * len(records) / trained_seconds, 2) if records and trained_seconds else None,
        "fingerprint": ctx.meta["fingerprint"],
    }


def _inputs(config: ExpertsConfig, layout: RunLayout) -> dict[str, Path | None]:
    return {} if config.objective == "ssl" else {"targets": targets_path(config)}


STAGE = Stage(
    "experts", ExpertsConfig, _train, "train knowledge-distillation expert trajectories",
    folder=lambda config, layout: layout.experts_dir(config.name), inputs=_inputs, input_fields=("targets",),
    runtime=("batch_students", "batched_impl"), units=("num_experts",),
    extends=lambda old, new: True, torchrun=True,
    shown=("num_experts", "model.name", "model.depth", "model.width", "schedule.epochs", "keep_epochs"),
)


def train_experts(config: ExpertsConfig, *, callback: Callable[[dict[str, Any]], None] | None = None) -> StageResult:
    """Stage ``experts``: ``num_experts`` trajectories in ``<out>/experts/`` (resumable, extendable)."""
    return run_stage(STAGE, config, callback=callback)


__all__ = ["ExpertsConfig", "ExpertContext", "prepare", "train_expert_range", "train_experts", "finished",
           "init_seed", "order_seed"]

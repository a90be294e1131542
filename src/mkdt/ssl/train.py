"""A generic two-view SSL training loop over any registry backbone, with exact resume.

Why its own loop (not ``mkdt.training``): SSL needs two augmented views, a projector, a
contrastive/redundancy loss, Adam/LARS with warm-up + cosine or one-cycle schedules and mixed
precision, none of which the KD regression loop has.

Resume is exact: a checkpoint after every epoch holds the backbone, projector and optimiser tensors
and, in its JSON header, the optimiser's hyperparameters, the step counter (which fully determines
the learning rate), the fp16 grad-scaler state and the history. The random streams need no saved
state: the minibatch order and the augmentation parameters of epoch ``e`` come from generators
seeded with ``derive_seed(seed, "ssl-order" | "ssl-augment", e)``, so epoch ``e`` draws the same
numbers whether or not the run was interrupted before it.

Under torchrun (a distributed :class:`~mkdt.distributed.DistContext`) the trainer is data-parallel:
backbone + projector run inside DistributedDataParallel, every rank walks the same global batches and
takes its contiguous block of rows of each, the augmentation parameters are drawn for the whole global
batch from the shared stream (each rank applies its rows'), the loss and the batch norms use the
global batch (``mkdt.ssl.objectives``), so training equals one process with the same batch size up to
float32 summation order. Rank 0 alone writes checkpoints and logs and runs the monitor; a checkpoint
holds the unwrapped modules, so a run resumes with any number of processes.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from mkdt.artifacts import atomic_write_text, load_tensors, read_metadata, save_tensors
from mkdt.distributed import DistContext, barrier, broadcast_object, shard_indices
from mkdt.config import require, validate
from mkdt.errors import MkdtError
from mkdt.progress import Progress, log
from mkdt.runtime import derive_seed, generator, seeded
from mkdt.ssl.augment import BatchAugment
from mkdt.ssl.objectives import ObjectiveConfig, build_loss, build_projector, to_global_batchnorm

OPTIMIZERS = ("adam", "adamw", "lars", "sgd")
LR_SCHEDULES = ("cosine", "onecycle", "constant")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class SSLSchedule:
    """Optimiser, learning-rate schedule and precision of SSL training."""

    epochs: int = 1000
    batch_size: int = 256
    optimizer: str = "adam"
    lr: float = 0.01
    weight_decay: float = 1e-6
    momentum: float = 0.9
    lr_schedule: str = "cosine"
    warmup_epochs: float = 10.0
    onecycle_pct: float = 0.3
    cycle_momentum: bool = True
    precision: str = "auto"
    channels_last: bool = True

    def check(self) -> None:
        require(self.optimizer in OPTIMIZERS, "optimizer", f"one of {', '.join(OPTIMIZERS)}", self.optimizer)
        require(self.lr_schedule in LR_SCHEDULES, "lr_schedule", f"one of {', '.join(LR_SCHEDULES)}",
                self.lr_schedule)
        require(self.precision in PRECISIONS, "precision", f"one of {', '.join(PRECISIONS)}", self.precision)
        require(self.epochs >= 1, "epochs", "at least 1", self.epochs)
        require(self.batch_size >= 2, "batch_size", "at least 2 (batch norm)", self.batch_size)
        require(self.lr > 0, "lr", "positive", self.lr)
        require(0 < self.onecycle_pct < 1, "onecycle_pct", "in (0, 1)", self.onecycle_pct)


def lr_factor(schedule: SSLSchedule, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Learning-rate multiplier (of ``schedule.lr``) for optimiser step ``step`` (0-based).

    cosine: linear warm-up over ``warmup_epochs`` then cosine decay to 0; onecycle: torch's OneCycleLR
    curve (cosine up from lr/25 over ``onecycle_pct`` of the steps, cosine down to lr/25e4); constant: 1.
    """
    if schedule.lr_schedule == "constant":
        return 1.0
    if schedule.lr_schedule == "onecycle":
        start, end = 1 / 25, 1 / 25e4
        peak = max(1.0, schedule.onecycle_pct * total_steps - 1)
        if step <= peak:
            t = step / peak
            return end_cos(start, 1.0, t)
        t = min(1.0, (step - peak) / max(1.0, total_steps - 1 - peak))
        return end_cos(1.0, end, t)
    warm = int(round(schedule.warmup_epochs * steps_per_epoch))
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(1, total_steps - warm)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def momentum_at(schedule: SSLSchedule, step: int, total_steps: int) -> float | None:
    """torch OneCycleLR's momentum cycle (Adam's beta1 / SGD momentum): 0.95 -> 0.85 at the lr peak -> 0.95.

    ``None`` (leave the optimiser's momentum alone) unless ``lr_schedule`` is onecycle with
    ``cycle_momentum``.
    """
    if schedule.lr_schedule != "onecycle" or not schedule.cycle_momentum:
        return None
    high, low = 0.95, 0.85
    peak = max(1.0, schedule.onecycle_pct * total_steps - 1)
    if step <= peak:
        return end_cos(high, low, step / peak)
    return end_cos(low, high, min(1.0, (step - peak) / max(1.0, total_steps - 1 - peak)))


def end_cos(a: float, b: float, t: float) -> float:
    """Cosine interpolation from ``a`` (t=0) to ``b`` (t=1)."""
    return b + (a - b) * 0.5 * (1 + math.cos(math.pi * t))


def build_optimizer(params: list[tuple[str, nn.Parameter]], schedule: SSLSchedule) -> torch.optim.Optimizer:
    """Adam / AdamW / SGD / LARS; for LARS and SGD, biases and norm weights get no weight decay (and so,
    in :class:`LARS`, no layer-wise scaling), as in SimCLR/BYOL."""
    if schedule.optimizer in ("adam", "adamw"):
        cls = torch.optim.Adam if schedule.optimizer == "adam" else torch.optim.AdamW
        return cls([p for _, p in params], lr=schedule.lr, weight_decay=schedule.weight_decay)
    decay = [p for _, p in params if p.dim() > 1]
    no_decay = [p for _, p in params if p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": schedule.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if schedule.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=schedule.lr, momentum=schedule.momentum)
    return LARS(groups, lr=schedule.lr, momentum=schedule.momentum)


def channels_last_safe(model: nn.Module) -> bool:
    """Whether channels-last is safe for ``model`` on this PyTorch: with torch 2.14 on CPU, a ResNet-18 whose
    convolutions have 8 channels crashes (segmentation fault in the backward pass) in channels-last at 48 px and
    above (tests/ssl/test_train.py shows the guard keeps it in the default layout); 16 channels and more work."""
    return all(m.in_channels >= 16 or m.in_channels <= 3 for m in model.modules() if isinstance(m, nn.Conv2d)) \
        and all(m.out_channels >= 16 for m in model.modules() if isinstance(m, nn.Conv2d))


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You, Gitman & Ginsburg 2017, eq. 6).

    For a parameter ``p`` with gradient ``g`` in a group with weight decay ``wd > 0`` (and both norms
    non-zero), the step direction is ``d = trust * |p| / (|g| + wd |p| + eps) * (g + wd p)``; in a group
    with ``wd = 0`` (biases, norm weights) it is ``g``, unscaled, as in SimCLR and BYOL. Then
    ``v = momentum * v + d`` (``v = d`` at the first step) and ``p -= lr * v``. The velocity is kept as
    ``momentum_buffer``, the name lightly's and torch's SGD use, so their checkpoints resume.
    """

    def __init__(self, params: Any, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 trust_coefficient: float = 1e-3, eps: float = 1e-8):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"LARS needs lr, momentum and weight_decay >= 0, got {lr}, {momentum}, {weight_decay}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient, eps=eps))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            wd, momentum = group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if wd != 0:
                    p_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(p.grad)
                    if p_norm != 0 and g_norm != 0:
                        scale = group["trust_coefficient"] * p_norm / (g_norm + wd * p_norm + group["eps"])
                        d = (d + wd * p) * scale
                if momentum != 0:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = d.detach().clone()
                    else:
                        state["momentum_buffer"].mul_(momentum).add_(d)
                    d = state["momentum_buffer"]
                p.add_(d, alpha=-group["lr"])
        return loss


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 arithmetic in hardware: a CUDA device torch reports bf16 support for,
    or a CPU whose flags (``/proc/cpuinfo``) include AVX512-BF16 or AMX-BF16. Elsewhere bf16 is emulated
    and slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(precision: str, device: torch.device, *, native_only: bool = False) -> torch.dtype | None:
    """The autocast dtype of the forward pass (``None``: float32).

    CUDA: ``auto`` is bf16 where supported, else fp16. CPU: ``auto`` and ``fp16`` train in float32 (no
    fp16 CPU kernels worth having); ``bf16`` must be asked for, and pays off on CPUs with native bf16
    instructions (AVX512-BF16 / AMX): convolutions run in bf16, the SSL loss stays float32.

    ``native_only`` (distillation, whose unrolled second-order steps have no loss scaling for fp16):
    ``auto`` is bf16 where :func:`native_bf16` says the hardware runs it, float32 everywhere else.
    """
    if precision == "fp32":
        return None
    if native_only and precision == "auto":
        return torch.bfloat16 if native_bf16(device) else None
    if device.type != "cuda":
        return torch.bfloat16 if precision == "bf16" else None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


# ----------------------------------------------------------------------------------------------
# optimiser state <-> tensors + JSON (no pickle)
# ----------------------------------------------------------------------------------------------
def flatten_optimizer_state(state: dict[str, Any], prefix: str = "optim.") -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimiser ``state_dict`` into named tensors and a JSON-able remainder."""
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for pid, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}{pid}.{key}"] = value
            else:
                plain.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "plain": plain}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict, prefix: str = "optim.") -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer_state`."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith(prefix):
            pid, key = name[len(prefix):].split(".", 1)
            state.setdefault(int(pid), {})[key] = value
    for pid, entry in meta["plain"].items():
        state.setdefault(int(pid), {}).update(entry)
    groups = [{k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in g.items()}
              for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


# ----------------------------------------------------------------------------------------------
# the trainer
# ----------------------------------------------------------------------------------------------
EpochHook = Callable[[int, dict[str, Any]], None]


class TwoViews(nn.Module):
    """Backbone + projector applied to both views in one ``forward``: DDP expects one forward per backward,
    and each view keeps its own batch-norm statistics, as in a single process."""

    def __init__(self, backbone: nn.Module, projector: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.projector = projector

    def forward(self, x_a: torch.Tensor, x_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z_a = self.projector(self.backbone.features(x_a))
        z_b = self.projector(self.backbone.features(x_b))
        return z_a, z_b


class SSLTrainer:
    """Backbone + projector + loss + optimiser; trains epochs on a uint8 image tensor and checkpoints.

    ``ctx`` (default: one process on ``device``) makes it data-parallel over the ranks of a torchrun
    group; see the module docstring.
    """

    def __init__(self, backbone: nn.Module, objective: ObjectiveConfig, schedule: SSLSchedule,
                 augment: BatchAugment, *, seed: int, device: torch.device, ctx: DistContext | None = None):
        validate(schedule, "schedule.")
        self.ctx = ctx if ctx is not None else DistContext(device=device)
        # channels-last activations: 1.4x faster ResNet-18 training steps on the 2-core CPU (216 -> 308
        # images/s at width 16, batch 256), and the layout tensor cores prefer on GPUs
        self.memory_format = (torch.channels_last if schedule.channels_last and channels_last_safe(backbone)
                              else torch.contiguous_format)
        self.backbone = backbone.to(device, memory_format=self.memory_format)
        self.schedule = schedule
        self.augment = augment
        self.seed = int(seed)
        self.device = device
        with seeded(derive_seed(seed, "ssl-projector")):
            self.projector = build_projector(objective, backbone.feature_dim).to(device)
        if self.ctx.distributed:  # batch-norm statistics over the global batch
            self.backbone = to_global_batchnorm(self.backbone, device)
            self.projector = to_global_batchnorm(self.projector, device)
        self.loss_fn = build_loss(objective, global_batch=self.ctx.distributed)
        params = [(f"backbone.{n}", p) for n, p in self.backbone.named_parameters()]
        params += [(f"projector.{n}", p) for n, p in self.projector.named_parameters()]
        self.optimizer = build_optimizer(params, schedule)
        self.net = self._data_parallel(TwoViews(self.backbone, self.projector))
        self.amp_dtype = autocast_dtype(schedule.precision, device)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.step = 0
        self.epoch = 0
        self.history: list[dict[str, Any]] = []

    # -- batching --------------------------------------------------------------------------------
    def batches(self, n: int, epoch: int) -> list[torch.Tensor]:
        """Epoch ``epoch``'s minibatches: a seeded permutation, the last incomplete batch dropped."""
        order = torch.randperm(n, generator=generator(derive_seed(self.seed, "ssl-order", epoch)))
        size = min(self.schedule.batch_size, n)
        return [order[i:i + size] for i in range(0, n - size + 1, size)]

    def steps_per_epoch(self, n: int) -> int:
        return max(1, n // min(self.schedule.batch_size, n))

    def shard_rows(self, size: int) -> slice:
        """This rank's contiguous rows of every global batch of ``size`` images (all rows in one process)."""
        if size % self.ctx.world_size:
            raise MkdtError(f"a batch of {size} images cannot be split evenly over {self.ctx.world_size} "
                            f"processes; set schedule.batch_size to a multiple of the number of processes")
        rows = shard_indices(size, self.ctx.rank, self.ctx.world_size, "contiguous")
        return slice(rows[0], rows[-1] + 1)

    def _data_parallel(self, net: nn.Module) -> nn.Module:
        if not self.ctx.distributed:
            return net
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(net, device_ids=ids)

    # -- one step / one epoch ----------------------------------------------------------------------
    def _set_lr(self, total_steps: int, steps_per_epoch: int) -> float:
        lr = self.schedule.lr * lr_factor(self.schedule, self.step, total_steps, steps_per_epoch)
        momentum = momentum_at(self.schedule, self.step, total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            if momentum is not None and "betas" in group:
                group["betas"] = (momentum, group["betas"][1])
            elif momentum is not None and "momentum" in group:
                group["momentum"] = momentum
        return lr

    def _view(self, shard: torch.Tensor, batch_size: int, rows: slice, gen: torch.Generator) -> torch.Tensor:
        """One augmented view of this rank's ``rows`` of a global batch: the parameters are drawn for the
        whole batch (the single-process stream), so each image gets the parameters one process gives it."""
        x = shard.float() / 255.0 if shard.dtype == torch.uint8 else shard.float()
        params = self.augment.sample(batch_size, x.shape[-2], x.shape[-1], gen)
        return self.augment.normalize(self.augment.apply(x, {k: v[rows] for k, v in params.items()}))

    def _loss(self, x_a: torch.Tensor, x_b: torch.Tensor) -> torch.Tensor:
        x_a = x_a.contiguous(memory_format=self.memory_format)
        x_b = x_b.contiguous(memory_format=self.memory_format)
        with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            z_a, z_b = self.net(x_a, x_b)
        return self.loss_fn(z_a, z_b)

    def train_epoch(self, images: torch.Tensor, epoch: int, progress: Progress | None = None) -> dict[str, Any]:
        """Train epoch ``epoch`` (1-based) on uint8 ``images`` (any device); returns the epoch's record.

        Every rank holds all ``images``; the loss and image counts of the record are the global batch's.
        """
        n = len(images)
        if n < 2:
            raise MkdtError(f"SSL training needs at least 2 images, got {n}")
        spe = self.steps_per_epoch(n)
        total = spe * self.schedule.epochs
        rows = self.shard_rows(min(self.schedule.batch_size, n))
        aug_gen = generator(derive_seed(self.seed, "ssl-augment", epoch))
        self.net.train()
        t0, cpu0 = time.perf_counter(), time.process_time()
        total_loss, count, lr = 0.0, 0, self.schedule.lr
        for idx in self.batches(n, epoch):
            lr = self._set_lr(total, spe)
            mine = idx[rows]
            batch = images[mine.to(images.device)].to(self.device, non_blocking=True)
            x_a = self._view(batch, len(idx), rows, aug_gen)
            x_b = self._view(batch, len(idx), rows, aug_gen)
            loss = self._loss(x_a, x_b)
            if not torch.isfinite(loss):
                raise MkdtError(f"SSL training diverged at epoch {epoch}, step {self.step} (loss {loss.item()}); "
                                f"lower schedule.lr (currently {self.schedule.lr})")
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                loss.backward()
                self.optimizer.step()
            self.step += 1
            value = float(loss.detach())
            total_loss += value * len(idx)
            count += len(idx)
            if progress is not None:
                progress.update(1, epoch=epoch, loss=value, lr=lr)
        seconds = time.perf_counter() - t0
        self.epoch = epoch
        # cpu_seconds (all threads of this process) tells a slow machine from a shared one
        return {"epoch": epoch, "loss": total_loss / max(count, 1), "lr": lr, "seconds": round(seconds, 3),
                "cpu_seconds": round(time.process_time() - cpu0, 3),
                "images_per_second": round(count / seconds, 1) if seconds > 0 else None}

    # -- checkpoints -------------------------------------------------------------------------------
    def save_checkpoint(self, path: str | Path, identity: str = "") -> None:
        """One atomic safetensors file: model/projector/optimiser tensors + JSON header for the rest."""
        tensors = {f"backbone.{k}": v for k, v in self.backbone.state_dict().items()}
        tensors.update({f"projector.{k}": v for k, v in self.projector.state_dict().items()})
        optim_tensors, optim_meta = flatten_optimizer_state(self.optimizer.state_dict())
        tensors.update(optim_tensors)
        meta = {"identity": identity, "epoch": self.epoch, "step": self.step, "optimizer": optim_meta,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "history": self.history,
                "rng": "order/augmentation streams are derive_seed(seed, 'ssl-order'|'ssl-augment', epoch)",
                "seed": self.seed}
        save_tensors(path, tensors, meta)

    def load_checkpoint(self, path: str | Path, identity: str = "") -> bool:
        """Restore a checkpoint written by :meth:`save_checkpoint` for the same ``identity``."""
        path = Path(path)
        if not path.is_file():
            return False
        meta = read_metadata(path)
        if meta.get("identity") != identity:
            return False
        tensors = load_tensors(path)

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        try:
            self.backbone.load_state_dict(part("backbone."))
            self.projector.load_state_dict(part("projector."))
            self.optimizer.load_state_dict(unflatten_optimizer_state(tensors, meta["optimizer"]))
        except (RuntimeError, KeyError, ValueError) as exc:
            raise MkdtError(f"{path}: checkpoint does not fit this model ({str(exc).splitlines()[0]}); "
                            f"delete it to start over") from None
        if self.scaler is not None and meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        self.epoch = int(meta["epoch"])
        self.step = int(meta["step"])
        self.history = list(meta.get("history", []))
        return True

    # -- the whole run -----------------------------------------------------------------------------
    def fit(self, images: torch.Tensor, *, checkpoint: str | Path | None = None, identity: str = "",
            monitor: Callable[[], dict[str, Any]] | None = None, monitor_every: int = 1,
            monitor_init: bool = False, log_path: str | Path | None = None,
            on_epoch_end: EpochHook | None = None, desc: str = "ssl") -> list[dict[str, Any]]:
        """Train up to ``schedule.epochs``, resuming from ``checkpoint`` when it is this run's.

        After each epoch: optional ``monitor()`` (e.g. kNN accuracy, every ``monitor_every`` epochs and
        at the last), checkpoint written, ``log_path`` (JSON lines) rewritten from the history, then
        ``on_epoch_end(epoch, record)``. ``monitor_init`` records ``monitor()`` of the initial weights
        as epoch 0. Under torchrun every rank calls ``fit``; ``monitor()`` runs on rank 0 only (the others
        receive its result) and only rank 0 writes, the others waiting until the files are on disk.
        """
        if checkpoint is not None and self.load_checkpoint(checkpoint, identity) and self.ctx.is_main:
            log.info(f"{desc}: resumed from the checkpoint after epoch {self.epoch} of {self.schedule.epochs}")
        if monitor is not None and monitor_init and not self.history:
            self.history.append({"epoch": 0, **self._on_main(monitor)})
            self._persist(checkpoint, identity, log_path)
        spe = self.steps_per_epoch(len(images))
        with Progress(spe * self.schedule.epochs, desc, initial=spe * self.epoch, unit="step",
                      enabled=self.ctx.is_main) as progress:
            for epoch in range(self.epoch + 1, self.schedule.epochs + 1):
                record = self.train_epoch(images, epoch, progress)
                if monitor is not None and (epoch % max(1, monitor_every) == 0 or epoch == self.schedule.epochs):
                    record.update(self._on_main(lambda: _timed(monitor)))
                    progress.note(f"{desc} epoch {epoch}: " + ", ".join(
                        f"{k} {v}" for k, v in record.items() if k in ("loss", "knn")))
                progress.record(**{f"epoch_{k}": v for k, v in record.items()
                                    if k in ("loss", "knn", "images_per_second")})
                self.history.append(record)
                self._persist(checkpoint, identity, log_path)
                if on_epoch_end is not None:
                    on_epoch_end(epoch, record)
        return self.history

    def _on_main(self, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """``fn()`` evaluated on rank 0 and shared, so every rank keeps the same history."""
        return broadcast_object(fn() if self.ctx.is_main else None, self.ctx)

    def _persist(self, checkpoint: str | Path | None, identity: str, log_path: str | Path | None) -> None:
        """Checkpoint and log, written by rank 0 alone; every rank returns once they are on disk."""
        if self.ctx.is_main:
            if checkpoint is not None:
                self.save_checkpoint(checkpoint, identity)
            self._write_log(log_path)
        barrier(self.ctx)

    def _write_log(self, log_path: str | Path | None) -> None:
        if log_path is not None:
            atomic_write_text(log_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.history))


def _timed(monitor: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    t0 = time.perf_counter()
    record = dict(monitor())
    record["monitor_seconds"] = round(time.perf_counter() - t0, 3)
    return record

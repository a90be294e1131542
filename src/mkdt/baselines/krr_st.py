"""``mkdt krr-st``: the KRR-ST baseline (Lee et al., ICLR 2024), tuned to run on CIFAR-10 too.

Learned: synthetic images X_s and their target representations Y_s (initialised from real images and
their teacher targets). Each outer step takes one network from a pool of BatchNorm ConvNets, encodes
X_s and an augmented real batch, fits kernel ridge regression from synthetic features to Y_s with a
linear kernel (features plus a ones column, ridge = 1e-6 * trace(K_ss)), and scores its predictions for
the real batch against the real teacher targets with MSE; AdamW (no weight decay, lr decayed linearly to
0.001x) updates X_s and Y_s. Pool members are trained online on (X_s, Y_s) and restarted after
``max_online_steps`` steps, so the kernels come from networks at every stage of training.

Architecture choice: a KRR-ST-specific ConvNet with one width *per layer* (:class:`KrrFeatureNet`,
128-256-512 in the paper preset) rather than the shared single-width ConvNet, because the reference
feature extractor doubles its channels at every block and its last-layer feature count (8192 at 32 px)
is what the linear kernel sees; a single width would quarter it.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mkdt.artifacts import JsonLog, load_tensors, read_metadata, save_tensors
from mkdt.config import StageConfig, require
from mkdt.data import DataConfig
from mkdt.data.imageset import ImageSet, normalize
from mkdt.engine import Stage, StageResult, StageRun, run_stage
from mkdt.errors import MkdtError
from mkdt.formats import SyntheticSet, load_synthetic, save_synthetic
from mkdt.inputs import load_source, random_indices, resolve_size
from mkdt.layout import SET_FILE, RunLayout
from mkdt.models import ModelConfig, build_model
from mkdt.progress import Progress
from mkdt.runtime import derive_seed, generator, seeded
from mkdt.training import RegressionSchedule

CHECKPOINT = "checkpoint.safetensors"


def _krr_recipe() -> RegressionSchedule:
    return RegressionSchedule(epochs=1000, lr=0.1, momentum=0.9, weight_decay=5e-4, batch_size=256)


@dataclasses.dataclass
class KrrStConfig(StageConfig):
    """KRR-ST settings; defaults are the reference CIFAR recipe (see the ``paper`` / ``cifar10-cpu`` presets)."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)  # the source set
    size: float = 0.02  # synthetic images: fraction (<1) of the source or a count
    targets: str | None = None  # the teacher targets (default: the run's targets/targets.safetensors)
    init: str | None = None  # a synthetic-set file to start from; default a seeded random subset
    real_targets: str = "stored"  # stored: precomputed targets of the un-augmented images; teacher: encode
    teacher: str | None = None  # for real_targets=teacher; default: the run's teacher/teacher.safetensors
    widths: list[int] = dataclasses.field(default_factory=lambda: [128, 256, 512])  # the feature nets' widths
    pool_size: int = 10  # networks in the pool
    max_online_steps: int = 1000  # a pool member restarts after this many online steps
    online_lr: float = 0.1  # SGD lr of the pool's online training
    online_momentum: float = 0.9  # its momentum
    online_weight_decay: float = 1e-3  # its weight decay
    online_batch_size: int = 256  # its minibatch size
    iterations: int = 160_000  # outer steps (the lr decays linearly over them)
    lr: float = 1e-4  # AdamW lr of images and targets
    final_lr_factor: float = 1e-3  # the lr decays to lr * final_lr_factor
    real_batch: int = 1024  # real images per outer step
    crop_padding: int = 4  # random-crop padding of the real batch
    flip: bool = True  # random horizontal flips of the real batch
    ridge: float = 1e-6  # ridge = this * trace(K_ss)
    solve_dtype: str = "float64"  # float64 or float32 for the ridge solve
    checkpoint_every: int = 1000  # outer steps between checkpoints
    max_bad_steps: int = 10  # consecutive non-finite steps that stop the run
    log_every: int = 10  # outer steps between log lines
    # Pre-training recipes recorded with the output so the evaluation can choose between them.
    krr_recipe: RegressionSchedule = dataclasses.field(default_factory=_krr_recipe)
    mkdt_recipe: RegressionSchedule = dataclasses.field(default_factory=RegressionSchedule)

    def check(self) -> None:
        require(self.real_targets in ("stored", "teacher"), "real_targets", "stored or teacher", self.real_targets)
        require(self.solve_dtype in ("float64", "float32"), "solve_dtype", "float64 or float32", self.solve_dtype)
        for key in ("pool_size", "max_online_steps", "iterations", "real_batch", "checkpoint_every",
                    "max_bad_steps", "log_every", "online_batch_size"):
            require(getattr(self, key) >= 1, key, "at least 1", getattr(self, key))
        require(self.lr > 0, "lr", "positive", self.lr)
        require(0 < self.final_lr_factor <= 1, "final_lr_factor", "in (0, 1]", self.final_lr_factor)
        require(self.size > 0, "size", "a fraction (< 1) or a count (>= 1)", self.size)


def targets_path(config: KrrStConfig) -> Path:
    return Path(config.targets) if config.targets else RunLayout(config.out).targets


def teacher_path(config: KrrStConfig) -> Path:
    return Path(config.teacher) if config.teacher else RunLayout(config.out).teacher


# ----------------------------------------------------------------------------------------------
# the pieces: feature network, kernel regression, augmentation
# ----------------------------------------------------------------------------------------------
class KrrFeatureNet(nn.Module):
    """ConvNet with per-layer widths: [Conv3x3 -> BatchNorm -> ReLU -> AvgPool2] per width, flatten,
    and a linear head to the target dimension (used only for the online MSE training)."""

    def __init__(self, widths: Sequence[int], in_channels: int, resolution: int, out_dim: int):
        super().__init__()
        widths = [int(w) for w in widths]
        if not widths or min(widths) < 1:
            raise MkdtError(f"KRR-ST widths must be a non-empty list of positive integers, got {widths}")
        shrink = 2 ** len(widths)
        if resolution < shrink or resolution % shrink:
            raise MkdtError(f"KRR-ST feature net with {len(widths)} layers needs a resolution divisible by "
                            f"{shrink}, got {resolution}; use fewer widths or resize the data")
        layers: list[nn.Module] = []
        channels = in_channels
        for w in widths:
            layers += [nn.Conv2d(channels, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.AvgPool2d(2)]
            channels = w
        self.body = nn.Sequential(*layers)
        side = resolution // shrink
        self.feature_dim = channels * side * side
        self.head = nn.Linear(self.feature_dim, out_dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _with_ones(f: torch.Tensor) -> torch.Tensor:
    return torch.cat([f, f.new_ones(f.shape[0], 1)], dim=1)


def krr_predict(f_syn: torch.Tensor, f_real: torch.Tensor, y_syn: torch.Tensor, *, ridge: float = 1e-6,
                solve_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """K_rs (K_ss + lambda I)^-1 Y_s with a linear kernel on [features, 1], lambda = ridge * trace(K_ss).

    The kernels are formed in the features' dtype; the solve runs in ``solve_dtype`` (float64 by
    default: with lambda ~ 1e-3 of the mean diagonal the system's condition number reaches ~1e6, too
    much for float32). Differentiable w.r.t. all inputs; returns the features' dtype.
    """
    fs, fr = _with_ones(f_syn), _with_ones(f_real)
    k_ss = fs @ fs.T
    k_rs = fr @ fs.T
    k_ss = k_ss.to(solve_dtype)
    lam = ridge * torch.trace(k_ss)
    eye = torch.eye(k_ss.shape[0], dtype=solve_dtype, device=k_ss.device)
    alpha = torch.linalg.solve(k_ss + lam * eye, y_syn.to(solve_dtype))
    return (k_rs.to(solve_dtype) @ alpha).to(f_syn.dtype)


def crop_flip(x: torch.Tensor, padding: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Per-image random crop from a zero-padded copy and random horizontal flip (offsets drawn on CPU)."""
    n, _, h, w = x.shape
    if padding > 0:
        padded = F.pad(x, (padding, padding, padding, padding))
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=gen).to(x.device)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=gen).to(x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # n x h x 1
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]  # n x 1 x w
        batch = torch.arange(n, device=x.device)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)
    if flip:
        mask = (torch.rand(n, generator=gen) < 0.5).to(x.device)
        x = torch.where(mask[:, None, None, None], x.flip(-1), x)
    return x.contiguous()


# ----------------------------------------------------------------------------------------------
# the model pool
# ----------------------------------------------------------------------------------------------
class ModelPool:
    """``pool_size`` feature nets, each with its own SGD state, online step count and restart count."""

    def __init__(self, config: KrrStConfig, in_channels: int, resolution: int, out_dim: int,
                 device: torch.device):
        self.config = config
        self.shape = (in_channels, resolution, out_dim)
        self.device = device
        self.steps = [0] * config.pool_size
        self.generations = [0] * config.pool_size
        self.models: list[KrrFeatureNet] = []
        self.optimizers: list[torch.optim.SGD] = []
        for i in range(config.pool_size):
            model, opt = self._fresh(i)
            self.models.append(model)
            self.optimizers.append(opt)

    def _fresh(self, i: int) -> tuple[KrrFeatureNet, torch.optim.SGD]:
        with seeded(derive_seed(self.config.seed, "krr_st", "model", i, self.generations[i])):
            model = KrrFeatureNet(self.config.widths, *self.shape).to(self.device)
        opt = torch.optim.SGD(model.parameters(), lr=self.config.online_lr, momentum=self.config.online_momentum,
                              weight_decay=self.config.online_weight_decay)
        return model, opt

    def restart(self, i: int) -> None:
        self.generations[i] += 1
        self.steps[i] = 0
        self.models[i], self.optimizers[i] = self._fresh(i)

    def online_step(self, i: int, x_syn: torch.Tensor, y_syn: torch.Tensor, gen: torch.Generator) -> float:
        """One SGD step of model ``i`` on a minibatch of (X_s, Y_s); a diverged model is restarted."""
        model, opt = self.models[i], self.optimizers[i]
        idx = torch.randperm(len(x_syn), generator=gen)[: self.config.online_batch_size].to(x_syn.device)
        model.train()
        loss = F.mse_loss(model(x_syn[idx]), y_syn[idx])
        if not torch.isfinite(loss):
            self.restart(i)
            return float("nan")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            self.restart(i)
            return float("nan")
        self.steps[i] += 1
        return loss.item()

    def advance(self, i: int, x_syn: torch.Tensor, y_syn: torch.Tensor, gen: torch.Generator) -> None:
        """After an outer step: model ``i`` trains one more step; at ``max_online_steps`` it restarts."""
        self.online_step(i, x_syn, y_syn, gen)
        if self.steps[i] >= self.config.max_online_steps:
            self.restart(i)

    def warm_up(self, x_syn: torch.Tensor, y_syn: torch.Tensor, gen: torch.Generator) -> None:
        """Train every model for a random 1..max_online_steps-1 steps so the pool spans training stages."""
        high = max(2, self.config.max_online_steps)
        targets = torch.randint(1, high, (len(self.models),), generator=gen).tolist()
        with Progress(sum(targets), "krr-st pool warm-up", unit="step") as bar:
            for i, n in enumerate(targets):
                for _ in range(n):
                    self.online_step(i, x_syn, y_syn, gen)
                    bar.update(1)

    # -- checkpointing ---------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for i, (model, opt) in enumerate(zip(self.models, self.optimizers)):
            for name, t in model.state_dict().items():
                out[f"pool.{i}.model.{name}"] = t
            for name, p in model.named_parameters():
                buf = opt.state.get(p, {}).get("momentum_buffer")
                if buf is not None:
                    out[f"pool.{i}.momentum.{name}"] = buf
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], steps: list[int], generations: list[int]) -> None:
        self.steps, self.generations = list(steps), list(generations)
        for i in range(len(self.models)):
            self.models[i], self.optimizers[i] = self._fresh(i)
            prefix = f"pool.{i}.model."
            state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            self.models[i].load_state_dict(state)
            for name, p in self.models[i].named_parameters():
                key = f"pool.{i}.momentum.{name}"
                if key in tensors:
                    self.optimizers[i].state[p]["momentum_buffer"] = tensors[key].to(p.device).clone()


# ----------------------------------------------------------------------------------------------
# the stage
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _State:
    x_syn: torch.Tensor
    y_syn: torch.Tensor
    optimizer: torch.optim.AdamW
    pool: ModelPool
    gen: torch.Generator
    indices: torch.Tensor
    iteration: int = 0
    bad_total: int = 0
    bad_run: int = 0


def _distill(config: KrrStConfig, run: StageRun) -> dict[str, Any]:
    """Run KRR-ST; writes ``<out>/krr_st/distilled.safetensors``. Resumes from its checkpoint."""
    device = run.device
    solve_dtype = {"float64": torch.float64, "float32": torch.float32}[config.solve_dtype]
    data, targets = load_source(config.data, targets_path(config))
    real_y = targets.values
    teacher = _load_teacher(config, data, real_y, device) if config.real_targets == "teacher" else None
    state, resumed = _start(config, run, data, real_y, device)
    if resumed:
        run.note(f"resumed from the checkpoint at iteration {state.iteration} of {config.iterations}")
    log = JsonLog(run.path("log.jsonl"), fresh=not resumed)
    first = state.iteration
    t0 = time.perf_counter()
    with run.progress(config.iterations, "krr-st", initial=first) as bar:
        while state.iteration < config.iterations:
            loss, i = _outer_step(config, state, data, real_y, teacher, device, solve_dtype)
            state.iteration += 1
            it = state.iteration
            if it % config.log_every == 0 or it == config.iterations or not math.isfinite(loss):
                log.write(iteration=it, loss=loss, model=i, lr=state.optimizer.param_groups[0]["lr"],
                          model_steps=state.pool.steps[i], seconds=round(time.perf_counter() - t0, 3))
            bar.update(1, loss=loss)
            if it % config.checkpoint_every == 0 and it < config.iterations:
                _save_checkpoint(run, state)
    seconds_per_iteration = (time.perf_counter() - t0) / max(1, config.iterations - first)
    synthetic = SyntheticSet(
        images=state.x_syn.detach().cpu(), targets=state.y_syn.detach().cpu(), mean=data.mean, std=data.std,
        lr=None, indices=state.indices,
        meta={"kind": "distilled", "method": "krr_st", "iterations": config.iterations, "data_name": data.name,
              "fingerprint": data.fingerprint(), "seed": config.seed, "skipped_steps": state.bad_total,
              "recipes": {"krr_st": dataclasses.asdict(config.krr_recipe),
                          "mkdt": dataclasses.asdict(config.mkdt_recipe)},
              "teacher": {k: v for k, v in targets.meta.items() if k != "fingerprint"}},
    )
    out_path = run.output("set", SET_FILE["krr_st"])
    save_synthetic(out_path, synthetic)
    losses = [r["loss"] for r in log.read() if math.isfinite(r.get("loss", float("nan")))]
    run.path(CHECKPOINT).unlink(missing_ok=True)
    return {"images": len(synthetic), "iterations": config.iterations, "path": run.rel(out_path),
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "skipped_steps": state.bad_total, "seconds_per_iteration": round(seconds_per_iteration, 4),
            "resumed_from": first}


def _inputs(config: KrrStConfig, layout: RunLayout) -> dict[str, Path | None]:
    found: dict[str, Path | None] = {"targets": targets_path(config)}
    if config.init:
        found["init"] = Path(config.init)
    if config.real_targets == "teacher":
        found["teacher"] = teacher_path(config)
    return found


STAGE = Stage(
    "krr-st", KrrStConfig, _distill, "distill with the KRR-ST baseline",
    folder=lambda config, layout: layout.krr_st_dir, inputs=_inputs, input_fields=("targets", "init", "teacher"),
    runtime=("checkpoint_every", "log_every", "max_bad_steps"), shown=("size", "iterations", "lr", "pool_size"),
)


def distill_krr_st(config: KrrStConfig) -> StageResult:
    """``<out>/krr_st/distilled.safetensors``."""
    return run_stage(STAGE, config)


def _initial_set(config: KrrStConfig, data: ImageSet, real_y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(X_s, Y_s, indices) from ``init`` or a seeded random subset with its teacher targets."""
    if config.init:
        init = load_synthetic(config.init)
        if tuple(init.mean) != tuple(data.mean) or tuple(init.std) != tuple(data.std):
            raise MkdtError(f"{config.init}: normalised with mean/std {init.mean}/{init.std}, the data uses "
                            f"{data.mean}/{data.std}; build the init set from the same data")
        if init.targets.shape[1] != real_y.shape[1] or tuple(init.images.shape[1:]) != tuple(data.images.shape[1:]):
            raise MkdtError(f"{config.init}: images {tuple(init.images.shape[1:])} / targets of dim "
                            f"{init.targets.shape[1]} do not match the data {tuple(data.images.shape[1:])} / "
                            f"targets of dim {real_y.shape[1]}")
        indices = init.indices if init.indices is not None else torch.empty(0, dtype=torch.int64)
        return init.images.clone(), init.targets.clone(), indices
    count = resolve_size(config.size, len(data), "size")
    indices = random_indices(len(data), count, generator(derive_seed(config.seed, "krr_st", "init")))
    return data.normalize(data.images[indices]), real_y[indices].clone(), indices


def _new_state(config: KrrStConfig, data: ImageSet, real_y: torch.Tensor, device: torch.device) -> _State:
    x0, y0, indices = _initial_set(config, data, real_y)
    x_syn = x0.to(device).requires_grad_(True)
    y_syn = y0.to(device).requires_grad_(True)
    optimizer = torch.optim.AdamW([x_syn, y_syn], lr=config.lr, weight_decay=0.0)
    pool = ModelPool(config, data.channels, data.resolution, real_y.shape[1], device)
    return _State(x_syn, y_syn, optimizer, pool, generator(derive_seed(config.seed, "krr_st", "stream")), indices)


def _start(config: KrrStConfig, run: StageRun, data: ImageSet, real_y: torch.Tensor,
           device: torch.device) -> tuple[_State, bool]:
    state = _new_state(config, data, real_y, device)
    path = run.path(CHECKPOINT)
    if path.is_file():
        meta = read_metadata(path)
        if meta.get("identity") == run.key:
            _load_checkpoint(path, meta, state, device)
            return state, True
        path.unlink()  # written for other settings: start afresh
    state.pool.warm_up(state.x_syn.detach(), state.y_syn.detach(), state.gen)
    _save_checkpoint(run, state)
    return state, False


def _lr_at(config: KrrStConfig, iteration: int) -> float:
    """Linear decay from ``lr`` to ``lr * final_lr_factor`` over the run."""
    frac = iteration / max(1, config.iterations - 1)
    return config.lr * (1.0 - (1.0 - config.final_lr_factor) * min(1.0, frac))


def _outer_step(config: KrrStConfig, state: _State, data: ImageSet, real_y: torch.Tensor,
                teacher: nn.Module | None, device: torch.device, solve_dtype: torch.dtype) -> tuple[float, int]:
    """One KRR-ST update of (X_s, Y_s); returns the loss (NaN when the step was skipped) and the model used."""
    gen = state.gen
    i = int(torch.randint(0, len(state.pool.models), (1,), generator=gen))
    idx = torch.randperm(len(data), generator=gen)[: config.real_batch]
    raw = crop_flip(data.images[idx].to(device).float() / 255.0, config.crop_padding, config.flip, gen)
    x_real = normalize(raw * 255.0, data.mean, data.std)
    if teacher is not None:
        with torch.no_grad():
            y_real = teacher(normalize(raw * 255.0, *teacher.norm_stats))
    else:
        y_real = real_y[idx].to(device)
    model = state.pool.models[i]
    model.train()
    model.requires_grad_(False)
    try:
        with torch.no_grad():
            f_real = model.features(x_real)
        f_syn = model.features(state.x_syn)
        pred = krr_predict(f_syn, f_real, state.y_syn, ridge=config.ridge, solve_dtype=solve_dtype)
        loss = F.mse_loss(pred, y_real)
        state.optimizer.zero_grad(set_to_none=True)
        if torch.isfinite(loss):
            loss.backward()
    finally:
        model.requires_grad_(True)
    grads_ok = all(p.grad is not None and torch.isfinite(p.grad).all() for p in (state.x_syn, state.y_syn))
    if not (torch.isfinite(loss) and grads_ok):
        _bad_step(config, state, i)
        state.pool.advance(i, state.x_syn.detach(), state.y_syn.detach(), gen)
        return float("nan"), i
    state.bad_run = 0
    for group in state.optimizer.param_groups:
        group["lr"] = _lr_at(config, state.iteration)
    state.optimizer.step()
    state.pool.advance(i, state.x_syn.detach(), state.y_syn.detach(), gen)
    return loss.item(), i


def _bad_step(config: KrrStConfig, state: _State, i: int) -> None:
    """Skip a non-finite step, restart the model that produced it, and stop after too many in a row."""
    state.optimizer.zero_grad(set_to_none=True)
    state.bad_total += 1
    state.bad_run += 1
    state.pool.restart(i)
    if state.bad_run >= config.max_bad_steps:
        raise MkdtError(f"KRR-ST: {state.bad_run} non-finite steps in a row at iteration {state.iteration + 1}; "
                        f"lower lr (now {config.lr}) or online_lr (now {config.online_lr}); the last checkpoint "
                        f"is kept")


def _save_checkpoint(run: StageRun, state: _State) -> None:
    tensors: dict[str, torch.Tensor] = {"x_syn": state.x_syn.detach(), "y_syn": state.y_syn.detach(),
                                        "indices": state.indices, "generator": state.gen.get_state()}
    for k, p in enumerate((state.x_syn, state.y_syn)):
        for name, value in state.optimizer.state.get(p, {}).items():
            tensors[f"adam.{k}.{name}"] = torch.as_tensor(value)
    tensors.update(state.pool.state_tensors())
    meta = {"identity": run.key, "iteration": state.iteration, "bad_total": state.bad_total,
            "bad_run": state.bad_run, "pool_steps": state.pool.steps, "pool_generations": state.pool.generations}
    save_tensors(run.path(CHECKPOINT), tensors, meta)


def _load_checkpoint(path: Path, meta: dict, state: _State, device: torch.device) -> None:
    tensors = load_tensors(path)
    with torch.no_grad():
        if tensors["x_syn"].shape != state.x_syn.shape or tensors["y_syn"].shape != state.y_syn.shape:
            raise MkdtError(f"{path}: checkpoint shapes do not match the configured run; delete it to start afresh")
        state.x_syn.copy_(tensors["x_syn"].to(device))
        state.y_syn.copy_(tensors["y_syn"].to(device))
    for k, p in enumerate((state.x_syn, state.y_syn)):
        prefix = f"adam.{k}."
        entry = {key[len(prefix):]: v for key, v in tensors.items() if key.startswith(prefix)}
        if entry:
            entry = {name: (v if name == "step" else v.to(device)) for name, v in entry.items()}
            state.optimizer.state[p] = entry
    state.indices = tensors["indices"]
    state.gen.set_state(tensors["generator"])
    state.pool.load_state_tensors(tensors, meta["pool_steps"], meta["pool_generations"])
    state.iteration = int(meta["iteration"])
    state.bad_total = int(meta["bad_total"])
    state.bad_run = int(meta["bad_run"])


def _load_teacher(config: KrrStConfig, data: ImageSet, real_y: torch.Tensor, device: torch.device) -> nn.Module:
    """The teacher backbone (eval mode) to encode augmented real batches; ``norm_stats`` = its mean/std."""
    path = teacher_path(config)
    if not path.is_file():
        raise MkdtError(f"{path}: teacher not found; train/import it (`mkdt teacher`) or use real_targets=stored")
    meta = read_metadata(path)
    if "model" not in meta:
        raise MkdtError(f"{path}: no model metadata; not an mkdt teacher file")
    model = build_model(ModelConfig(**meta["model"]), in_channels=int(meta.get("in_channels", data.channels)),
                        resolution=int(meta.get("resolution", data.resolution)))
    try:
        model.load_state_dict(load_tensors(path))
    except RuntimeError as exc:
        raise MkdtError(f"{path}: state dict does not match its recorded model ({str(exc).splitlines()[0]})") from None
    model.to(device).eval().requires_grad_(False)
    model.norm_stats = (tuple(meta.get("mean", data.mean)), tuple(meta.get("std", data.std)))
    _check_teacher(path, model, data, real_y, device)
    return model


@torch.no_grad()
def _check_teacher(path: Path, teacher: nn.Module, data: ImageSet, real_y: torch.Tensor, device: torch.device) -> None:
    """The teacher must reproduce the stored targets on un-augmented images (same model, same data)."""
    probe = data.images[:64].to(device)
    got = teacher(normalize(probe, *teacher.norm_stats)).cpu()
    want = real_y[: len(probe)]
    if got.shape[1] != want.shape[1]:
        raise MkdtError(f"{path}: the teacher gives {got.shape[1]}-d representations but the targets are "
                        f"{want.shape[1]}-d; use the teacher that computed the targets")
    err = float((got - want).norm() / want.norm().clamp_min(1e-12))
    if err > 1e-2:
        raise MkdtError(f"{path}: the teacher does not reproduce the stored targets (relative error {err:.3g}); "
                        f"use the teacher that computed them or real_targets=stored")

"""``mkdt distill``: the outer loop of MKDT (paper, Algorithm 1), with checkpoints and guards.

Each iteration draws an expert uniformly from ALL experts (but the last ``validation_experts``, held out:
their matching loss is logged as ``val_loss`` at the start and at every checkpoint) and a start epoch t in
[0, max_start_epoch) from the run's seeded generator, matches ``syn_steps`` student steps on the synthetic set against the
expert's ``expert_epochs`` (see ``matching.py``), and updates images, targets and the inner lr with
their own SGD (momentum 0.5). Non-finite losses or gradients skip the update; ``max_bad_steps`` in a
row stop the run. The learned lr is clamped to ``lr_min`` after each step: the authors' parametrisation
(and so the meaning of ``lr_lr``) is kept, and the clamp only acts in the pathological case where the
lr would go to zero or below (a student that moves backwards).

Each update averages ``trajectories`` draws. Launched by torchrun with W processes (W dividing
``trajectories``), distillation is data-parallel over them: every rank holds the same images, targets
and lr, draws the same (expert, start epoch, minibatch plan) tuples from the shared generators and
matches its share; the loss, gradients and a non-finite flag are averaged in one all-reduce, so every
rank applies the same update (or skips it), and the result does not depend on W. Rank 0 alone writes
logs, checkpoints and outputs.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from mkdt.artifacts import atomic_write_text, read_metadata
from mkdt.distill import fast, matching, memory
from mkdt.distill.config import DistillConfig
from mkdt.distill.experts import ExpertBank
from mkdt.distill.outputs import mean_abs_pixel_change, save_grid, save_loss_curve
from mkdt.distill.state import CHECKPOINT, LEARNED, DistillState, read_checkpoint
from mkdt.distributed import (DistContext, all_reduce_mean, assert_in_sync, broadcast_object, shard)
from mkdt.engine import Stage, StageResult, StageRun, run_stage
from mkdt.errors import ConfigError, MkdtError
from mkdt.formats import SyntheticSet, load_synthetic, save_synthetic
from mkdt.layout import RunLayout, SET_FILE
from mkdt.models import build_model
from mkdt.models.functional import ParamLayout
from mkdt.progress import Progress, log
from mkdt.runtime import derive_seed, generator, seeded
from mkdt.ssl.train import autocast_dtype

LOG = "log.jsonl"
VALIDATION_LOG = "validation.jsonl"


@dataclass
class Setup:
    """What a run reads once: the initial set, the student, its layout and inner objective, the experts."""

    init_path: Path
    initial: SyntheticSet
    student: torch.nn.Module
    layout: ParamLayout
    bank: ExpertBank
    device: torch.device
    objective: matching.InnerObjective = matching.KD
    fast_student: fast.FastStudent | None = None  # the opt-in fast inner loop (``fast_inner``)

    @property
    def precision(self) -> str:
        """The student's arithmetic in the matching steps, as recorded in the summary."""
        amp = self.fast_student.amp_dtype if self.fast_student is not None else None
        return "bf16" if amp == torch.bfloat16 else "fp32"


@dataclass
class Draw:
    """One trajectory segment to match: an expert, a start epoch and the inner steps' minibatches."""

    expert: int
    start: int
    steps: list[matching.InnerStep]


# ----------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------
def init_path(config: DistillConfig) -> Path:
    """``high_loss`` / ``random`` -> the run's ``init/<name>.safetensors``; anything else is a file path."""
    if config.init in ("high_loss", "random"):
        return RunLayout(config.out).init_set(config.init)
    return Path(config.init)


def experts_dir(config: DistillConfig) -> Path:
    return Path(config.experts_dir) if config.experts_dir else RunLayout(config.out).experts_dir()


def _distill(config: DistillConfig, run: StageRun) -> dict[str, Any]:
    """Run (or resume, or extend) MKDT distillation; returns the summary (rank 0)."""
    dctx = run.dist
    if config.trajectories % dctx.world_size:
        raise ConfigError(f"distill.trajectories={config.trajectories} must be a multiple of the {dctx.world_size} "
                          f"processes; run with a number of processes that divides it")
    setup = _setup(config, dctx.device)
    state = _start_or_resume(config, setup, run)
    choice = _choose_path(config, setup, state) if dctx.is_main else None
    use_memory_saving, estimate = broadcast_object(choice, dctx)
    _run(config, setup, state, run, use_memory_saving)
    if not dctx.is_main:
        return {}
    result = _write_outputs(config, setup, state, run)
    result.update(memory_saving=use_memory_saving, plain_path_estimate_gb=estimate,
                  trajectories_per_update=config.trajectories, fast_inner=config.fast_inner,
                  precision=setup.precision)
    return result


STAGE = Stage(
    "distill", DistillConfig, _distill, "learn the synthetic set by matching expert trajectories",
    folder=lambda config, layout: layout.distill_dir(config.name),
    inputs=lambda config, layout: {"init": init_path(config), "experts": experts_dir(config)},
    input_fields=("init", "experts_dir"),
    # fast_inner: how the same gradients are computed (like memory_saving), recorded in the summary. precision
    # changes the numbers: part of the key unless fp32, so runs made before the key existed keep theirs
    runtime=("checkpoint_every", "memory_saving", "memory_budget_gb", "max_bad_steps", "grid_images", "fast_inner"),
    added=(("precision", "fp32"),),
    units=("iterations",), extends=lambda old, new: new["iterations"] >= (old.get("iterations") or 0),
    torchrun=True, shown=("init", "iterations", "syn_steps", "batch_syn", "expert_epochs", "max_start_epoch", "lr_img",
                          "lr_targets", "lr_lr", "trajectories", "model.width", "model.depth"),
)


def distill(config: DistillConfig) -> StageResult:
    """``<out>/distill/distilled.safetensors`` (``distill-<name>/`` for a named variant)."""
    return run_stage(STAGE, config)


# ----------------------------------------------------------------------------------------------
# setup
# ----------------------------------------------------------------------------------------------
def _setup(config: DistillConfig, device: torch.device) -> Setup:
    path = init_path(config)
    if not path.is_file():
        raise MkdtError(f"{path}: initial set not found; run `mkdt init` first or set distill.init to a "
                        f"synthetic-set file (high_loss, random or a path)")
    initial = load_synthetic(path)
    n, c, h, w = initial.images.shape
    if n == 0 or h != w:
        raise MkdtError(f"{path}: need a non-empty set of square images, got shape {tuple(initial.images.shape)}")
    ssl = config.inner_objective == "ssl"
    if ssl:  # MTT-SSL: the SSL experts' backbone + projector, loss and views (see distill/ssl_inner.py)
        from mkdt.distill import ssl_inner

        student = ssl_inner.build_inner_student(config.model, experts_dir(config), c, h, initial.mean, initial.std,
                                                config.seed)
    else:
        with seeded(derive_seed(config.seed, "distill", "student")):
            student = build_model(config.model, in_channels=c, resolution=h, head_dim=initial.targets.shape[1])
    student = student.to(device).train()
    layout = ParamLayout.of(student)
    expect = {"in_channels": c, "resolution": h, "head_dim": int(initial.targets.shape[1]),
              "mean": list(initial.mean), "std": list(initial.std), "fingerprint": initial.meta.get("fingerprint")}
    if ssl:
        del expect["head_dim"]  # SSL experts have a projector, no head to the targets
    bank = ExpertBank.open(experts_dir(config), layout, config.model,
                           epochs_needed=config.max_start_epoch + config.expert_epochs,
                           expert_epochs=config.expert_epochs, expect=expect, objective=config.inner_objective)
    if ssl:
        ssl_inner.check_setup(bank, n, config.batch_syn)
    if config.validation_experts >= len(bank):
        raise MkdtError(f"{experts_dir(config)}: validation_experts={config.validation_experts} leaves none of the "
                        f"{len(bank)} experts to distill from; lower validation_experts or train more experts")
    objective = student if ssl else matching.KD
    fast_student = None
    if config.fast_inner:
        amp = autocast_dtype(config.precision, device, native_only=True)
        fast_student = fast.FastStudent(student, layout, amp_dtype=amp)
    return Setup(path, initial, student, layout, bank, device, objective, fast_student)


def _start_or_resume(config: DistillConfig, setup: Setup, run: StageRun) -> DistillState:
    """A fresh state, or the checkpoint's; rank 0 checks and reads the checkpoint, every rank loads it."""
    initial, dctx = setup.initial, run.dist
    state = DistillState.fresh(
        initial.images.to(setup.device), initial.targets.to(setup.device), config.lr_init,
        learn={"targets": config.targets_learned, "lr": config.learn_lr},
        rates={"images": config.lr_img, "targets": config.lr_targets, "lr": config.lr_lr},
        momentum=config.momentum,
        rng=generator(derive_seed(config.seed, "distill", "iterations")),
        rng_augment=generator(derive_seed(config.seed, "distill", "augment")),
    )
    path = run.path(CHECKPOINT)
    saved = broadcast_object(_resumable(path, config, run) if dctx.is_main else None, dctx)
    if saved is not None:
        state.load(*saved, path)
        run.note(f"resumed from the checkpoint at iteration {state.iteration} of {config.iterations}")
    _check_in_sync(state, dctx)
    if dctx.is_main:
        _rewrite_log(run.path(LOG), state.log)
    return state


def _resumable(path: Path, config: DistillConfig, run: StageRun) -> tuple[dict, dict] | None:
    """The checkpoint's tensors and metadata if it was written for this run's identity (else ``None``)."""
    if not path.is_file():
        return None
    meta = read_metadata(path)
    if meta.get("identity") != run.key:
        log.warning(f"{path}: checkpoint of other settings; starting over")
        return None
    if int(meta.get("iteration", 0)) > config.iterations:
        raise MkdtError(f"{path}: checkpoint is at iteration {meta['iteration']}, beyond iterations="
                        f"{config.iterations}; raise iterations or delete the checkpoint")
    return read_checkpoint(path)


def _check_in_sync(state: DistillState, dctx: DistContext) -> None:
    """Every learned leaf must be the same on every rank (a cheap checksum; no-op in one process)."""
    for name in LEARNED:
        assert_in_sync(state.leaf(name), dctx, f"distill {name}")


def _rewrite_log(path: Path, log_rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in log_rows))


def _choose_path(config: DistillConfig, setup: Setup, state: DistillState) -> tuple[bool, float | None]:
    """memory_saving on/off, or for ``auto`` on when the plain path's estimate exceeds the budget.

    The estimate is a measured one-step cost (bytes autograd saves for one unrolled step at the real
    batch size) times ``syn_steps``; it uses its own generator so the run's random stream is untouched.
    """
    mode = config.memory_mode
    if mode != "auto":
        return mode == "on", None
    probe_rng = generator(derive_seed(config.seed, "distill", "memory-probe"))
    theta0, theta_star = setup.bank.pair(0, 0, config.expert_epochs)
    steps = matching.plan_steps(len(state.images), config.batch_syn, 1, probe_rng,
                                augment_generator=probe_rng if config.augment else None,
                                resolution=state.images.shape[-1])
    problem = matching.Problem(setup.student, setup.layout, theta0.to(setup.device), theta_star.to(setup.device),
                               state.images, state.targets, state.lr, steps, setup.objective)
    estimate = memory.estimate_plain_bytes(problem, config.syn_steps)
    budget = memory.memory_budget_bytes(setup.device, config.memory_budget_gb)
    return estimate > budget, round(estimate / 2**30, 3)


# ----------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------
def _run(config: DistillConfig, setup: Setup, state: DistillState, run: StageRun, use_memory_saving: bool) -> None:
    dctx = run.dist
    meta = {"identity": run.key, "experts": setup.bank.names()}
    with Progress(config.iterations, "distill", initial=state.iteration, enabled=dctx.is_main) as bar:
        if state.iteration == 0:
            _validate(config, setup, state, dctx)
            _note_validation(bar, state)
        with _log_writer(run.path(LOG), dctx) as write_row:
            while state.iteration < config.iterations:
                row = _iteration(config, setup, state, use_memory_saving, dctx)
                state.log.append(row)
                write_row(row)
                if state.consecutive_bad >= config.max_bad_steps:
                    _stop_bad(config, setup, state, row)
                bar.update(1, loss=row["loss"], lr=row["lr"])
                if state.iteration % config.checkpoint_every == 0 or state.iteration == config.iterations:
                    _validate(config, setup, state, dctx)
                    _note_validation(bar, state)
                    _check_in_sync(state, dctx)
                    if dctx.is_main:
                        state.save(run.path(CHECKPOINT), meta)


def _note_validation(bar: Progress, state: DistillState) -> None:
    if state.validation and state.validation[-1]["iteration"] == state.iteration:
        value = state.validation[-1]["val_loss"]
        bar.set(val=value)
        bar.note(f"distill iteration {state.iteration}: val_loss {value:.4f}")


@contextlib.contextmanager
def _log_writer(path: Path, dctx: DistContext) -> Iterator[Callable[[dict[str, Any]], None]]:
    """Append rows to the log on rank 0 (flushed, so a kill loses at most one row); a no-op elsewhere."""
    if not dctx.is_main:
        yield lambda row: None
        return
    with open(path, "a", encoding="utf-8") as fh:
        def write(row: dict[str, Any]) -> None:
            fh.write(json.dumps(row) + "\n")
            fh.flush()

        yield write


def _iteration(config: DistillConfig, setup: Setup, state: DistillState, use_memory_saving: bool,
               dctx: DistContext) -> dict[str, Any]:
    """One outer update (or a logged skip) from ``config.trajectories`` trajectories; returns its log row."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    draws = draw_trajectories(config, setup, state, config.trajectories)
    result, ok = match_draws(config, setup, state, draws, use_memory_saving, dctx)
    state.iteration += 1
    if ok:
        _apply(state, result, config.lr_min)
        state.consecutive_bad = 0
    else:
        state.skipped += 1
        state.consecutive_bad += 1
    loss = float(result.loss)
    return {"iteration": state.iteration, "loss": loss if ok else None, "lr": float(state.lr.detach()),
            "skipped": not ok, "expert": _one_or_all([d.expert for d in draws]),
            "start_epoch": _one_or_all([d.start for d in draws]), "seconds": round(time.perf_counter() - t0, 4),
            "cpu_seconds": round(time.process_time() - cpu0, 4), **({} if ok else {"bad_loss": str(loss)})}


def draw_trajectories(config: DistillConfig, setup: Setup, state: DistillState, count: int) -> list[Draw]:
    """``count`` (expert, start epoch, minibatch plan) draws from the run's generators, in that order.

    Every rank draws all of them (the generators stay identical everywhere) and matches its share;
    ``count`` 1 is the one-process stream, so W = 1 runs and their checkpoints are unchanged.
    """
    draws = []
    for _ in range(count):
        expert = int(torch.randint(training_experts(config, setup), (1,), generator=state.rng))
        start = int(torch.randint(config.max_start_epoch, (1,), generator=state.rng))
        steps = matching.plan_steps(len(state.images), config.batch_syn, config.syn_steps, state.rng,
                                    augment_generator=state.rng_augment if config.augment else None,
                                    resolution=state.images.shape[-1])
        draws.append(Draw(expert, start, steps))
    return draws


def training_experts(config: DistillConfig, setup: Setup) -> int:
    """Experts ``0 .. k-1`` are drawn for updates; the last ``validation_experts`` are held out."""
    return len(setup.bank) - config.validation_experts


def validation_loss(config: DistillConfig, setup: Setup, state: DistillState) -> float:
    """Mean matching loss of the current set on the held-out experts, every start epoch, with minibatch
    plans (and augmentations) fixed by the seed, so values at different iterations are comparable."""
    losses = []
    for expert in range(training_experts(config, setup), len(setup.bank)):
        for start in range(config.max_start_epoch):
            rng = generator(derive_seed(config.seed, "distill", "validation", expert, start))
            steps = matching.plan_steps(len(state.images), config.batch_syn, config.syn_steps, rng,
                                        augment_generator=rng if config.augment else None,
                                        resolution=state.images.shape[-1])
            theta0, theta_star = (t.to(setup.device) for t in setup.bank.pair(expert, start,
                                                                               start + config.expert_epochs))
            problem = matching.Problem(setup.student, setup.layout, theta0, theta_star, state.images,
                                       state.targets, state.lr, steps, setup.objective)
            losses.append(float(matching.matching_loss(matching.rollout(problem)[-1], theta0, theta_star)))
    return sum(losses) / len(losses)


def _validate(config: DistillConfig, setup: Setup, state: DistillState, dctx: DistContext) -> None:
    """Append ``val_loss`` at this iteration (computed by rank 0, shared), unless recorded already."""
    if not config.validation_experts or (state.validation and state.validation[-1]["iteration"] == state.iteration):
        return
    value = broadcast_object(validation_loss(config, setup, state) if dctx.is_main else None, dctx)
    state.validation.append({"iteration": state.iteration, "val_loss": value})


def match_draws(config: DistillConfig, setup: Setup, state: DistillState, draws: list[Draw],
                use_memory_saving: bool, dctx: DistContext) -> tuple[matching.MatchResult, bool]:
    """Match this rank's share of ``draws`` (entry ``rank``, ``rank + W``, ...) and average over all.

    Returns the mean loss and gradients, identical bytes on every rank, and whether every draw on
    every rank was finite (if not, all ranks skip the update together). One process given all the
    draws computes the same mean as W processes given one each: the reference the tests compare with.
    """
    results = [_match(config, setup, state, d, use_memory_saving) for d in shard(draws, dctx)]
    return _mean_over_ranks(results, state, dctx)


def _match(config: DistillConfig, setup: Setup, state: DistillState, draw: Draw,
           use_memory_saving: bool) -> matching.MatchResult:
    theta0, theta_star = setup.bank.pair(draw.expert, draw.start, draw.start + config.expert_epochs)
    problem = matching.Problem(setup.student, setup.layout, theta0.to(setup.device), theta_star.to(setup.device),
                               state.images, state.targets, state.lr, draw.steps, setup.objective)
    return match_problem(problem, setup.fast_student, use_memory_saving)


def match_problem(problem: matching.Problem, fast_student: fast.FastStudent | None,
                  memory_saving: bool) -> matching.MatchResult:
    """The path a run takes: the fast inner loop when ``fast_inner`` built a student for it, else the
    reference (plain or memory-saving); benchmarks/speed_vs_baseline.py times both through here."""
    if fast_student is not None:
        return fast.match(problem, fast_student, memory_saving=memory_saving)
    return memory.match_memory_saving(problem) if memory_saving else matching.match_plain(problem)


GRADIENTS = {"images": "grad_images", "targets": "grad_targets", "lr": "grad_lr"}


def _mean_over_ranks(results: list[matching.MatchResult], state: DistillState,
                     dctx: DistContext) -> tuple[matching.MatchResult, bool]:
    """Mean of the loss, the learned leaves' gradients and a non-finite flag: locally, then over ranks.

    Everything travels in ONE all-reduce (one flat buffer). A non-finite draw contributes zero
    gradients and raises the flag, so a rank whose loss is NaN (no gradients at all) still sends a
    buffer of the usual size, and the mean flag tells every rank alike to skip.
    """
    learned = [name for name in LEARNED if state.leaf(name).requires_grad]
    finite = [r.finite() for r in results]
    loss = results[0].loss
    parts = {
        "loss": _local_mean([r.loss for r in results]),
        "bad": _local_mean([torch.tensor(0.0 if ok else 1.0, dtype=loss.dtype, device=loss.device)
                            for ok in finite]),
    }
    for name in learned:
        leaf = state.leaf(name)
        parts[name] = _local_mean([getattr(r, GRADIENTS[name]) if ok else torch.zeros_like(leaf)
                                   for r, ok in zip(results, finite)])
    all_reduce_mean(parts, dctx)
    mean = matching.MatchResult(parts["loss"], **{GRADIENTS[name]: parts[name] for name in learned})
    return mean, bool(parts["bad"] == 0) and mean.finite()


def _local_mean(values: list[torch.Tensor]) -> torch.Tensor:
    """Sum in order, then divide: one value comes back unchanged (bit for bit), as W = 1 requires."""
    total = values[0].detach().clone()
    for value in values[1:]:
        total += value.detach()
    return total / len(values)


def _one_or_all(values: list[int]) -> int | list[int]:
    """A log field: the single draw's value (the one-process format), else the list of all draws'."""
    return values[0] if len(values) == 1 else values


def _as_list(value: int | list[int]) -> list[int]:
    return list(value) if isinstance(value, list) else [value]


def _apply(state: DistillState, result: matching.MatchResult, lr_min: float) -> None:
    """One SGD step per learned leaf, then keep the inner lr positive."""
    grads = {"images": result.grad_images, "targets": result.grad_targets, "lr": result.grad_lr}
    for name, opt in state.optimizers.items():
        if opt is None:
            continue
        leaf = state.leaf(name)
        leaf.grad = grads[name].detach().reshape(leaf.shape)
        opt.step()
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        state.lr.clamp_(min=lr_min)
    for name in ("images", "targets", "lr"):
        if not torch.isfinite(state.leaf(name)).all():
            raise MkdtError(f"distill: {name} became non-finite after the update at iteration {state.iteration} "
                            f"although its gradient was finite; lower lr_img / lr_targets / lr_lr")


def _stop_bad(config: DistillConfig, setup: Setup, state: DistillState, row: dict[str, Any]) -> None:
    where = ", ".join(f"expert {setup.bank.experts[e].path.name} epoch {s}"
                      for e, s in zip(_as_list(row["expert"]), _as_list(row["start_epoch"])))
    raise MkdtError(
        f"distill: {state.consecutive_bad} consecutive non-finite updates (last at iteration {state.iteration}, "
        f"loss {row['bad_loss']}, {where}); likely "
        f"lr_img={config.lr_img:g} is too high (try "
        f"{config.lr_img / 10:g}) or an expert with (near-)zero displacement (retrain it); nothing after the "
        f"last checkpoint was saved"
    )


# ----------------------------------------------------------------------------------------------
# outputs
# ----------------------------------------------------------------------------------------------
def _write_outputs(config: DistillConfig, setup: Setup, state: DistillState, run: StageRun) -> dict[str, Any]:
    initial = setup.initial
    provenance = {k: initial.meta[k] for k in ("data_name", "fingerprint") if k in initial.meta}
    method = "mtt_ssl" if config.inner_objective == "ssl" else "mkdt"
    meta = {**provenance, "kind": "distilled", "method": method, "iterations": state.iteration,
            "model": config.model.to_dict(), "init": run.rel(setup.init_path), "experts": len(setup.bank),
            "experts_dir": run.rel(experts_dir(config)), "seed": config.seed}
    final = SyntheticSet(state.images.detach().cpu(), state.targets.detach().cpu(), initial.mean, initial.std,
                         lr=float(state.lr.detach()), indices=initial.indices, meta=meta)
    name = SET_FILE["distill"]
    save_synthetic(run.output("set", name), final)
    save_grid(run.path("grid_initial.png"), initial.images, initial.mean, initial.std, config.grid_images)
    save_grid(run.path("grid_distilled.png"), final.images, initial.mean, initial.std, config.grid_images)
    save_loss_curve(run.path("loss.png"), state.log, state.validation)
    if state.validation:  # the held-out experts' loss, for reports
        _rewrite_log(run.path(VALIDATION_LOG), state.validation)
    losses = [r["loss"] for r in state.log if r["loss"] is not None]
    head = losses[: max(1, min(10, len(losses)))]
    tail = losses[-max(1, min(10, len(losses))):]
    return {
        "iterations": state.iteration,
        "updates_applied": state.iteration - state.skipped,
        "skipped": state.skipped,
        "final_lr": float(state.lr.detach()),
        "loss_first10": sum(head) / len(head) if losses else None,
        "loss_last10": sum(tail) / len(tail) if losses else None,
        "mean_abs_pixel_change": mean_abs_pixel_change(initial.images, final.images, initial.std),
        "experts": len(setup.bank),
        "validation_experts": config.validation_experts,
        "val_loss_initial": state.validation[0]["val_loss"] if state.validation else None,
        "val_loss_final": state.validation[-1]["val_loss"] if state.validation else None,
        "experts_used": len({e for r in state.log for e in _as_list(r["expert"])}),
        "images": list(final.images.shape),
        "target_dim": int(final.targets.shape[1]),
        "seconds_total": round(sum(r["seconds"] for r in state.log), 2),
    }

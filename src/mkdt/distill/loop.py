"""``mkdt distill``: the outer loop of MKDT (REFERENCE.md section 1.5), with checkpoints and guards.

Each iteration draws an expert uniformly from ALL experts (but the last ``validation_experts``, held out:
their matching loss is logged as ``val_loss`` at the start and at every checkpoint) and a start epoch t in
[0, max_start_epoch) from the run's seeded generator, matches ``syn_steps`` student steps on the synthetic set against the
expert's ``expert_epochs`` (see ``matching.py``), and updates images, targets and the inner lr with
their own SGD (momentum 0.5). Non-finite losses or gradients skip the update; ``max_bad_steps`` in a
row stop the run. The learned lr is clamped to ``lr_min`` after each step: the authors' parametrisation
(and so the meaning of ``lr_lr``) is kept, and the clamp only acts in the pathological case where the
lr would go to zero or below (a student that moves backwards).

Launched by torchrun with W processes, distillation is data-parallel over trajectories: every rank
holds the same images, targets and lr, draws the same W (expert, start epoch, minibatch plan) tuples
from the shared generators and matches entry ``rank``; the loss, gradients and a non-finite flag are
averaged in one all-reduce, so every rank applies the same update (or skips it). W = 1 draws exactly
the one-process stream. Rank 0 alone decides about resuming and writes logs, checkpoints and outputs.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from tqdm import tqdm

from mkdt.artifacts import RunDir, StageDir, atomic_write_text, read_metadata
from mkdt.config import to_dict
from mkdt.distill import matching, memory
from mkdt.distill.config import DistillConfig, memory_saving_mode, resume_key
from mkdt.distill.experts import ExpertBank
from mkdt.distill.outputs import mean_abs_pixel_change, save_grid, save_loss_curve
from mkdt.distill.state import CHECKPOINT, LEARNED, DistillState, read_checkpoint, tensor_digest
from mkdt.distributed import (DistContext, all_reduce_mean, assert_in_sync, broadcast_object, init_distributed,
                              progress_disabled, shard)
from mkdt.errors import MkdtError
from mkdt.formats import SyntheticSet, load_synthetic, save_synthetic
from mkdt.models import build_model
from mkdt.models.functional import ParamLayout
from mkdt.runtime import Meter, derive_seed, generator, seeded

LOG = "log.jsonl"


@dataclass
class Setup:
    """What a run reads once: the initial set, the student and its layout, the experts."""

    init_path: Path
    initial: SyntheticSet
    student: torch.nn.Module
    layout: ParamLayout
    bank: ExpertBank
    device: torch.device


@dataclass
class Draw:
    """One trajectory segment to match: an expert, a start epoch and the inner steps' minibatches."""

    expert: int
    start: int
    steps: list[matching.InnerStep]


# ----------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------
def distill(config: DistillConfig, *, trajectories: int | None = None) -> dict:
    """Run (or resume, or return the recorded result of) MKDT distillation; returns a summary.

    ``trajectories``: trajectories matched per update, their gradients averaged (default: one per
    process). Under torchrun with W processes each rank matches ``trajectories / W`` of them; one
    process with ``trajectories=W`` computes the same updates as W processes (the tests compare them).
    Every rank returns the same result.
    """
    config.check()
    dctx = init_distributed(config.device)
    per_update = _trajectories_per_update(trajectories, dctx)
    cfg = to_dict(config)
    stage = RunDir(config.out).stage("distill")
    recorded = broadcast_object(_recorded(stage) if dctx.is_main and stage.is_done(cfg) else None, dctx)
    if recorded is not None:
        return recorded
    if dctx.is_main:
        stage.invalidate()
        stage.save_config(config)
    with Meter() as meter, _threads(config.threads):
        setup = _setup(config, dctx.device)
        state = _start_or_resume(config, setup, stage, dctx)
        choice = _choose_path(config, setup, state) if dctx.is_main else None
        use_memory_saving, estimate = broadcast_object(choice, dctx)
        _run(config, setup, state, stage, use_memory_saving, dctx, per_update)
        result = _write_outputs(config, setup, state, stage) if dctx.is_main else None
    out = None
    if dctx.is_main:
        result.update(memory_saving=use_memory_saving, plain_path_estimate_gb=estimate,
                      trajectories_per_update=per_update, world_size=dctx.world_size, **_measure(meter))
        stage.finish(cfg, file=result["file"], summary=result)
        out = {"summary": result, "stage": str(stage.path), "path": str(stage / result["file"])}
    return broadcast_object(out, dctx)


def _trajectories_per_update(trajectories: int | None, dctx: DistContext) -> int:
    """Default one trajectory per process; otherwise a multiple of the number of processes."""
    count = dctx.world_size if trajectories is None else int(trajectories)
    if count < 1 or count % dctx.world_size:
        raise MkdtError(f"distill: trajectories per update must be a positive multiple of the {dctx.world_size} "
                        f"processes, got {trajectories}")
    return count


@contextlib.contextmanager
def _threads(threads: int | None) -> Iterator[None]:
    """Use ``threads`` CPU threads inside the stage (on a shared machine 1 can beat 2: no barrier stalls)."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _recorded(stage: StageDir) -> dict:
    record = stage.record() or {}
    return {"summary": record.get("summary", {}), "stage": str(stage.path),
            "path": str(stage / record.get("file", "")), "reused": True}


def _measure(meter: Meter) -> dict:
    return {"seconds_this_session": round(meter.seconds, 2), "peak_rss_mb": round(meter.peak_mb, 1)}


# ----------------------------------------------------------------------------------------------
# setup
# ----------------------------------------------------------------------------------------------
def init_path(config: DistillConfig) -> Path:
    """``high_loss`` / ``random`` -> ``<out>/init/<name>.safetensors``; anything else is a file path."""
    if config.init in ("high_loss", "random"):
        return Path(config.out) / "init" / f"{config.init}.safetensors"
    return Path(config.init)


def experts_dir(config: DistillConfig) -> Path:
    return Path(config.experts_dir) if config.experts_dir else Path(config.out) / "experts"


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
    return Setup(path, initial, student, layout, bank, device)


def _start_or_resume(config: DistillConfig, setup: Setup, stage: StageDir, dctx: DistContext) -> DistillState:
    """A fresh state, or the checkpoint's; rank 0 checks and reads the checkpoint, every rank loads it."""
    initial = setup.initial
    state = DistillState.fresh(
        initial.images.to(setup.device), initial.targets.to(setup.device), config.lr_init,
        learn={"targets": config.learn_targets, "lr": config.learn_lr},
        rates={"images": config.lr_img, "targets": config.lr_targets, "lr": config.lr_lr},
        momentum=config.momentum,
        rng=generator(derive_seed(config.seed, "distill", "iterations")),
        rng_augment=generator(derive_seed(config.seed, "distill", "augment")),
    )
    path = stage / CHECKPOINT
    saved = broadcast_object(_resumable(path, config, setup) if dctx.is_main else None, dctx)
    if saved is not None:
        state.load(*saved, path)
    _check_in_sync(state, dctx)
    if dctx.is_main:
        _rewrite_log(stage / LOG, state.log)
    return state


def _resumable(path: Path, config: DistillConfig, setup: Setup) -> tuple[dict, dict] | None:
    """The checkpoint's tensors and metadata if there is one for this problem (else ``None``)."""
    if not path.is_file():
        return None
    _check_checkpoint(path, config, setup)
    return read_checkpoint(path)


def _check_in_sync(state: DistillState, dctx: DistContext) -> None:
    """Every learned leaf must be the same on every rank (a cheap checksum; no-op in one process)."""
    for name in LEARNED:
        assert_in_sync(state.leaf(name), dctx, f"distill {name}")


def _checkpoint_meta(config: DistillConfig, setup: Setup) -> dict[str, Any]:
    return {"resume_key": resume_key(to_dict(config)), "experts": setup.bank.names(),
            "init_digest": tensor_digest(setup.initial.images, setup.initial.targets)}


def _check_checkpoint(path: Path, config: DistillConfig, setup: Setup) -> None:
    """A checkpoint is resumed only for the same problem: config (up to resumable fields), experts, init."""
    meta = read_metadata(path)
    want = _checkpoint_meta(config, setup)
    old_key, new_key = meta.get("resume_key", {}), want["resume_key"]
    if old_key != new_key:
        diff = sorted(k for k in set(old_key) | set(new_key) if old_key.get(k) != new_key.get(k))
        key = diff[0] if diff else "?"
        raise MkdtError(f"{path}: checkpoint was written for another distill config ({key}: {old_key.get(key)!r} "
                        f"there, {new_key.get(key)!r} now); delete it to start over or use another --out")
    if meta.get("experts") != want["experts"]:
        raise MkdtError(f"{path}: checkpoint was written with other expert files; delete it to start over")
    if meta.get("init_digest") != want["init_digest"]:
        raise MkdtError(f"{path}: checkpoint was written from another initial set ({setup.init_path} changed); "
                        f"delete it to start over")
    if int(meta.get("iteration", 0)) > config.iterations:
        raise MkdtError(f"{path}: checkpoint is at iteration {meta['iteration']}, beyond iterations="
                        f"{config.iterations}; raise iterations or delete the checkpoint")


def _rewrite_log(path: Path, log: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in log))


def _choose_path(config: DistillConfig, setup: Setup, state: DistillState) -> tuple[bool, float | None]:
    """memory_saving on/off, or for ``auto`` on when the plain path's estimate exceeds the budget.

    The estimate is a measured one-step cost (bytes autograd saves for one unrolled step at the real
    batch size) times ``syn_steps``; it uses its own generator so the run's random stream is untouched.
    """
    mode = memory_saving_mode(config.memory_saving)
    if mode != "auto":
        return mode == "on", None
    probe_rng = generator(derive_seed(config.seed, "distill", "memory-probe"))
    theta0, theta_star = setup.bank.pair(0, 0, config.expert_epochs)
    steps = matching.plan_steps(len(state.images), config.batch_syn, 1, probe_rng,
                                augment_generator=probe_rng if config.augment else None,
                                resolution=state.images.shape[-1])
    problem = matching.Problem(setup.student, setup.layout, theta0.to(setup.device), theta_star.to(setup.device),
                               state.images, state.targets, state.lr, steps)
    estimate = memory.estimate_plain_bytes(problem, config.syn_steps)
    budget = memory.memory_budget_bytes(setup.device, config.memory_budget_gb)
    return estimate > budget, round(estimate / 2**30, 3)


# ----------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------
def _run(config: DistillConfig, setup: Setup, state: DistillState, stage: StageDir, use_memory_saving: bool,
         dctx: DistContext, per_update: int) -> None:
    meta = _checkpoint_meta(config, setup)
    bar = tqdm(total=config.iterations, initial=state.iteration, desc="distill", disable=progress_disabled(dctx),
               dynamic_ncols=True)
    try:
        if state.iteration == 0:
            _validate(config, setup, state, dctx)
        with _log_writer(stage / LOG, dctx) as write_row:
            while state.iteration < config.iterations:
                row = _iteration(config, setup, state, use_memory_saving, dctx, per_update)
                state.log.append(row)
                write_row(row)
                if state.consecutive_bad >= config.max_bad_steps:
                    _stop_bad(config, setup, state, row)
                bar.update(1)
                if row["loss"] is not None:
                    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.4f}")
                if state.iteration % config.checkpoint_every == 0 or state.iteration == config.iterations:
                    _validate(config, setup, state, dctx)
                    if dctx.is_main and state.validation and state.validation[-1]["iteration"] == state.iteration:
                        bar.write(f"distill iteration {state.iteration}: val_loss {state.validation[-1]['val_loss']:.4f}")
                    _check_in_sync(state, dctx)
                    if dctx.is_main:
                        state.save(stage / CHECKPOINT, meta)
    finally:
        bar.close()


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
               dctx: DistContext, per_update: int) -> dict[str, Any]:
    """One outer update (or a logged skip) from ``per_update`` trajectories; returns its log row."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    draws = draw_trajectories(config, setup, state, per_update)
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
                                       state.targets, state.lr, steps)
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
                               state.images, state.targets, state.lr, draw.steps)
    return memory.match_memory_saving(problem) if use_memory_saving else matching.match_plain(problem)


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
def distilled_name(updates: int) -> str:
    return f"distilled_{updates}.safetensors"


def _write_outputs(config: DistillConfig, setup: Setup, state: DistillState, stage: StageDir) -> dict[str, Any]:
    initial = setup.initial
    name = distilled_name(state.iteration)
    provenance = {k: initial.meta[k] for k in ("data_name", "fingerprint") if k in initial.meta}
    method = "mtt_ssl" if config.inner_objective == "ssl" else "mkdt"
    meta = {**provenance, "kind": "distilled", "method": method, "iterations": state.iteration,
            "model": config.model.to_dict(), "init": str(setup.init_path), "experts": len(setup.bank),
            "experts_dir": str(experts_dir(config)), "seed": config.seed}
    final = SyntheticSet(state.images.detach().cpu(), state.targets.detach().cpu(), initial.mean, initial.std,
                         lr=float(state.lr.detach()), indices=initial.indices, meta=meta)
    save_synthetic(stage / name, final)
    save_grid(stage / "grid_initial.png", initial.images, initial.mean, initial.std, config.grid_images)
    save_grid(stage / "grid_distilled.png", final.images, initial.mean, initial.std, config.grid_images)
    save_loss_curve(stage / "loss.png", state.log, state.validation)
    losses = [r["loss"] for r in state.log if r["loss"] is not None]
    head = losses[: max(1, min(10, len(losses)))]
    tail = losses[-max(1, min(10, len(losses))):]
    return {
        "file": name,
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

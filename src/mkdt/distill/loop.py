"""``mkdt distill``: the outer loop of MKDT (REFERENCE.md section 1.5), with checkpoints and guards.

Each iteration draws an expert uniformly from ALL experts and a start epoch t in [0, max_start_epoch)
from the run's seeded generator, matches ``syn_steps`` student steps on the synthetic set against the
expert's ``expert_epochs`` (see ``matching.py``), and updates images, targets and the inner lr with
their own SGD (momentum 0.5). Non-finite losses or gradients skip the update; ``max_bad_steps`` in a
row stop the run. The learned lr is clamped to ``lr_min`` after each step: the authors' parametrisation
(and so the meaning of ``lr_lr``) is kept, and the clamp only acts in the pathological case where the
lr would go to zero or below (a student that moves backwards).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm import tqdm

from mkdt.artifacts import RunDir, StageDir, atomic_write_text, read_metadata
from mkdt.config import to_dict
from mkdt.distill import matching, memory
from mkdt.distill.config import DistillConfig, memory_saving_mode, resume_key
from mkdt.distill.experts import ExpertBank
from mkdt.distill.outputs import mean_abs_pixel_change, save_grid, save_loss_curve
from mkdt.distill.state import CHECKPOINT, DistillState, tensor_digest
from mkdt.errors import MkdtError
from mkdt.formats import SyntheticSet, load_synthetic, save_synthetic
from mkdt.models import build_model
from mkdt.models.functional import ParamLayout
from mkdt.runtime import Meter, derive_seed, generator, resolve_device, seeded

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


# ----------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------
def distill(config: DistillConfig) -> dict:
    """Run (or resume, or return the recorded result of) MKDT distillation; returns a summary."""
    config.check()
    cfg = to_dict(config)
    stage = RunDir(config.out).stage("distill")
    if stage.is_done(cfg):
        return _recorded(stage)
    stage.invalidate()
    stage.save_config(config)
    with Meter() as meter, _threads(config.threads):
        setup = _setup(config)
        state = _start_or_resume(config, setup, stage)
        use_memory_saving, estimate = _choose_path(config, setup, state)
        _run(config, setup, state, stage, use_memory_saving)
        result = _write_outputs(config, setup, state, stage)
    result.update(memory_saving=use_memory_saving, plain_path_estimate_gb=estimate, **_measure(meter))
    stage.finish(cfg, file=result["file"], summary=result)
    return {"summary": result, "stage": str(stage.path), "path": str(stage / result["file"])}


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


def _setup(config: DistillConfig) -> Setup:
    device = resolve_device(config.device)
    path = init_path(config)
    if not path.is_file():
        raise MkdtError(f"{path}: initial set not found; run `mkdt init` first or set distill.init to a "
                        f"synthetic-set file (high_loss, random or a path)")
    initial = load_synthetic(path)
    n, c, h, w = initial.images.shape
    if n == 0 or h != w:
        raise MkdtError(f"{path}: need a non-empty set of square images, got shape {tuple(initial.images.shape)}")
    with seeded(derive_seed(config.seed, "distill", "student")):
        student = build_model(config.model, in_channels=c, resolution=h, head_dim=initial.targets.shape[1])
    student = student.to(device).train()
    layout = ParamLayout.of(student)
    expect = {"in_channels": c, "resolution": h, "head_dim": int(initial.targets.shape[1]),
              "mean": list(initial.mean), "std": list(initial.std), "fingerprint": initial.meta.get("fingerprint")}
    bank = ExpertBank.open(experts_dir(config), layout, config.model,
                           epochs_needed=config.max_start_epoch + config.expert_epochs,
                           expert_epochs=config.expert_epochs, expect=expect)
    return Setup(path, initial, student, layout, bank, device)


def _start_or_resume(config: DistillConfig, setup: Setup, stage: StageDir) -> DistillState:
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
    if path.is_file():
        _check_checkpoint(path, config, setup)
        state.restore(path)
    _rewrite_log(stage / LOG, state.log)
    return state


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
def _run(config: DistillConfig, setup: Setup, state: DistillState, stage: StageDir, use_memory_saving: bool) -> None:
    meta = _checkpoint_meta(config, setup)
    bar = tqdm(total=config.iterations, initial=state.iteration, desc="distill", disable=None, dynamic_ncols=True)
    try:
        with open(stage / LOG, "a", encoding="utf-8") as log_file:
            while state.iteration < config.iterations:
                row = _iteration(config, setup, state, use_memory_saving)
                state.log.append(row)
                log_file.write(json.dumps(row) + "\n")
                log_file.flush()
                if state.consecutive_bad >= config.max_bad_steps:
                    _stop_bad(config, setup, state, row)
                bar.update(1)
                if row["loss"] is not None:
                    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.4f}")
                if state.iteration % config.checkpoint_every == 0 or state.iteration == config.iterations:
                    state.save(stage / CHECKPOINT, meta)
    finally:
        bar.close()


def _iteration(config: DistillConfig, setup: Setup, state: DistillState, use_memory_saving: bool) -> dict[str, Any]:
    """One outer update (or a logged skip); returns its log row."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    expert = int(torch.randint(len(setup.bank), (1,), generator=state.rng))
    start = int(torch.randint(config.max_start_epoch, (1,), generator=state.rng))
    steps = matching.plan_steps(len(state.images), config.batch_syn, config.syn_steps, state.rng,
                                augment_generator=state.rng_augment if config.augment else None,
                                resolution=state.images.shape[-1])
    theta0, theta_star = setup.bank.pair(expert, start, start + config.expert_epochs)
    problem = matching.Problem(setup.student, setup.layout, theta0.to(setup.device), theta_star.to(setup.device),
                               state.images, state.targets, state.lr, steps)
    result = memory.match_memory_saving(problem) if use_memory_saving else matching.match_plain(problem)
    state.iteration += 1
    ok = result.finite()
    if ok:
        _apply(state, result, config.lr_min)
        state.consecutive_bad = 0
    else:
        state.skipped += 1
        state.consecutive_bad += 1
    loss = float(result.loss)
    return {"iteration": state.iteration, "loss": loss if ok else None, "lr": float(state.lr.detach()),
            "skipped": not ok, "expert": expert, "start_epoch": start, "seconds": round(time.perf_counter() - t0, 4),
            "cpu_seconds": round(time.process_time() - cpu0, 4), **({} if ok else {"bad_loss": str(loss)})}


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
    path = setup.bank.experts[row["expert"]].path
    raise MkdtError(
        f"distill: {state.consecutive_bad} consecutive non-finite updates (last at iteration {state.iteration}, "
        f"loss {row['bad_loss']}, expert {path.name} epoch {row['start_epoch']}); likely "
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
    meta = {**provenance, "kind": "distilled", "method": "mkdt", "iterations": state.iteration,
            "model": config.model.to_dict(), "init": str(setup.init_path), "experts": len(setup.bank),
            "experts_dir": str(experts_dir(config)), "seed": config.seed}
    final = SyntheticSet(state.images.detach().cpu(), state.targets.detach().cpu(), initial.mean, initial.std,
                         lr=float(state.lr.detach()), indices=initial.indices, meta=meta)
    save_synthetic(stage / name, final)
    save_grid(stage / "grid_initial.png", initial.images, initial.mean, initial.std, config.grid_images)
    save_grid(stage / "grid_distilled.png", final.images, initial.mean, initial.std, config.grid_images)
    save_loss_curve(stage / "loss.png", state.log)
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
        "experts_used": len({r["expert"] for r in state.log}),
        "images": list(final.images.shape),
        "target_dim": int(final.targets.shape[1]),
        "seconds_total": round(sum(r["seconds"] for r in state.log), 2),
    }

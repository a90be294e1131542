"""Behaviour of ``mkdt distill`` on a tiny digits problem (3 experts, ConvNet depth 1 width 8)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from helpers import stage_status
import torch

from mkdt.artifacts import load_json, load_tensors, read_metadata
from mkdt.distill import DistillConfig, distill
from mkdt.distill import matching
from mkdt.distill.experts import ExpertBank
from mkdt.distill.loop import Setup, validation_loss
from mkdt.errors import MkdtError
from mkdt.formats import load_synthetic
from mkdt.models import build_model
from mkdt.models.functional import ParamLayout
from mkdt.runtime import generator

from distill_helpers import MODEL, TinyRun, write_expert


def read_log(config: DistillConfig) -> list[dict]:
    return [json.loads(line) for line in (Path(config.out) / "distill" / "log.jsonl").read_text().splitlines()]


def test_run_uses_every_expert_and_writes_outputs(config: DistillConfig, tiny: TinyRun):
    result = distill(config)
    stage = Path(config.out) / "distill"
    record = load_json(stage / "stage.json")
    rows = read_log(config)
    assert [r["iteration"] for r in rows] == list(range(1, 11))
    assert {r["expert"] for r in rows} == {0, 1, 2}
    assert {r["start_epoch"] for r in rows} <= {0, 1}
    final = load_synthetic(stage / "distilled.safetensors")
    initial = load_synthetic(tiny.init)
    assert final.images.shape == initial.images.shape and final.targets.shape == initial.targets.shape
    assert final.mean == initial.mean and final.std == initial.std
    assert torch.equal(final.indices, initial.indices)
    assert final.lr == pytest.approx(rows[-1]["lr"]) and final.lr != pytest.approx(config.lr_init)
    assert not torch.equal(final.images, initial.images) and not torch.equal(final.targets, initial.targets)
    change = ((final.images - initial.images) * torch.tensor(initial.std).view(1, -1, 1, 1)).abs().mean()
    assert record["summary"]["mean_abs_pixel_change"] == pytest.approx(float(change), rel=1e-5)
    for name in ("grid_initial.png", "grid_distilled.png", "loss.png", "config.yaml", "checkpoint.safetensors"):
        assert (stage / name).stat().st_size > 0, name
    assert result.outputs["set"] == stage / "distilled.safetensors"
    # a finished stage with the same config is a no-op that returns the recorded result
    before = (stage / "distilled.safetensors").stat().st_mtime_ns
    again = distill(config)
    assert again.status == "reused" and again.summary == result.summary
    assert (stage / "distilled.safetensors").stat().st_mtime_ns == before


def _fixed_matching_loss(images, targets, lr, tiny: TinyRun, config: DistillConfig) -> float:
    """Mean matching loss over every expert and start epoch with fixed minibatches (no sampling noise)."""
    student = build_model(MODEL, in_channels=1, resolution=8, head_dim=targets.shape[1])
    layout = ParamLayout.of(student)
    bank = ExpertBank.open(tiny.experts, layout, MODEL, config.max_start_epoch + config.expert_epochs,
                           config.expert_epochs)
    losses = []
    for e in range(len(bank)):
        for start in range(config.max_start_epoch):
            theta0, theta_star = bank.pair(e, start, start + config.expert_epochs)
            steps = matching.plan_steps(len(images), config.batch_syn, config.syn_steps, generator(e * 10 + start))
            problem = matching.Problem(student, layout, theta0, theta_star, images, targets, torch.tensor(lr), steps)
            losses.append(float(matching.matching_loss(matching.unroll(problem), theta0, theta_star).detach()))
    return sum(losses) / len(losses)


def test_loss_decreases_over_30_iterations(config: DistillConfig, tiny: TinyRun):
    config = dataclasses.replace(config, iterations=30, checkpoint_every=30)
    distill(config)
    losses = [r["loss"] for r in read_log(config)]
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5
    final = load_synthetic(Path(config.out) / "distill" / "distilled.safetensors")
    initial = load_synthetic(tiny.init)
    before = _fixed_matching_loss(initial.images, initial.targets, config.lr_init, tiny, config)
    after = _fixed_matching_loss(final.images, final.targets, final.lr, tiny, config)
    assert after < 0.9 * before


def test_learning_only_images_keeps_targets_and_lr(config: DistillConfig, tiny: TinyRun):
    config = dataclasses.replace(config, iterations=4, learn_targets=False, learn_lr=False)
    distill(config)
    final = load_synthetic(Path(config.out) / "distill" / "distilled.safetensors")
    initial = load_synthetic(tiny.init)
    assert torch.equal(final.targets, initial.targets) and final.lr == pytest.approx(config.lr_init)
    assert not torch.equal(final.images, initial.images)


def distill_interrupted_at(config: DistillConfig, monkeypatch, call: int) -> None:
    """Run ``distill`` with a Ctrl-C raised inside the ``call``-th trajectory match, then restore matching."""
    real, calls = matching.match_plain, {"n": 0}

    def interrupt(problem):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return real(problem)

    with monkeypatch.context() as patch:
        patch.setattr(matching, "match_plain", interrupt)
        with pytest.raises(KeyboardInterrupt):
            distill(config)


def test_resume_after_interrupt_is_bit_identical(config: DistillConfig, monkeypatch, tmp_path: Path):
    straight = dataclasses.replace(config, out=str(tmp_path / "straight"))
    distill(straight)
    interrupted = dataclasses.replace(config, out=str(tmp_path / "interrupted"))
    distill_interrupted_at(interrupted, monkeypatch, call=7)
    stage = Path(interrupted.out) / "distill"
    assert stage_status(stage) != "done" and not list(stage.glob("distilled*"))
    assert len(read_log(interrupted)) == 6
    distill(interrupted)  # resumes from the checkpoint at iteration 5
    a = load_synthetic(Path(straight.out) / "distill" / "distilled.safetensors")
    b = load_synthetic(stage / "distilled.safetensors")
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets) and a.lr == b.lr
    keys = ("iteration", "loss", "lr", "expert", "start_epoch", "skipped")
    assert [[r[k] for k in keys] for r in read_log(straight)] == [[r[k] for k in keys] for r in read_log(interrupted)]


def test_raising_iterations_extends_a_finished_run(config: DistillConfig, tmp_path: Path):
    short = dataclasses.replace(config, iterations=5, out=str(tmp_path / "ext"))
    distill(short)
    distill(dataclasses.replace(short, iterations=10))
    straight = dataclasses.replace(config, out=str(tmp_path / "straight"))
    distill(straight)
    a = load_synthetic(Path(short.out) / "distill" / "distilled.safetensors")
    b = load_synthetic(Path(straight.out) / "distill" / "distilled.safetensors")
    assert torch.equal(a.images, b.images) and a.lr == b.lr


def test_other_settings_start_over_and_keep_the_finished_set(config: DistillConfig):
    """A finished run is never resumed with other settings: it is kept aside and comes back when they do."""
    first = distill(dataclasses.replace(config, iterations=5))
    other = distill(dataclasses.replace(config, iterations=5, lr_img=1.0))
    assert other.status == "ran" and (Path(config.out) / "distill.stale.1" / "distilled.safetensors").is_file()
    back = distill(dataclasses.replace(config, iterations=5))
    assert back.status == "restored" and back.summary == first.summary


def _nan_on(calls_to_poison):
    real, calls = matching.match_plain, {"n": 0}

    def poisoned(problem):
        calls["n"] += 1
        result = real(problem)
        if calls["n"] in calls_to_poison:
            result.loss = torch.tensor(float("nan"))
            result.grad_images = torch.full_like(result.grad_images, float("nan"))
        return result

    return poisoned


def test_single_nan_is_skipped(config: DistillConfig, monkeypatch):
    monkeypatch.setattr(matching, "match_plain", _nan_on({3}))
    result = distill(config)
    rows = read_log(config)
    assert [r["skipped"] for r in rows] == [i == 3 for i in range(1, 11)]
    assert rows[2]["loss"] is None and rows[2]["lr"] == rows[1]["lr"]  # no update applied
    assert result.summary["skipped"] == 1 and result.summary["updates_applied"] == 9
    final = load_synthetic(Path(config.out) / "distill" / "distilled.safetensors")
    assert torch.isfinite(final.images).all()


def test_persistent_nan_stops_with_a_cause(config: DistillConfig, monkeypatch):
    monkeypatch.setattr(matching, "match_plain", _nan_on(set(range(3, 100))))
    config = dataclasses.replace(config, max_bad_steps=4, checkpoint_every=1)
    with pytest.raises(MkdtError, match=r"4 consecutive non-finite.*lr_img=100 is too high.*zero displacement"):
        distill(config)
    stage = Path(config.out) / "distill"
    assert stage_status(stage) != "done" and not list(stage.glob("distilled*"))
    assert len(read_log(config)) == 6  # 2 good + 4 skipped, then the stop
    checkpoint = load_tensors(stage / "checkpoint.safetensors")  # last good state, finite
    assert all(torch.isfinite(checkpoint[k]).all() for k in ("images", "targets", "lr"))


def test_expert_with_no_displacement_is_refused(config: DistillConfig, tiny: TinyRun, tmp_path: Path):
    from mkdt.formats import load_trajectory

    traj = load_trajectory(tiny.experts / "expert_0000.safetensors")
    folder = tmp_path / "bad-experts"
    params = traj.params.clone()
    params[2] = params[0]  # epoch 2 == epoch 0: consecutive epochs differ, but theta_0 == theta* for t=0
    write_expert(folder / "expert_0000.safetensors", params, traj.layout, tiny)
    with pytest.raises(MkdtError, match="expert_0000.*no displacement"):
        distill(dataclasses.replace(config, experts_dir=str(folder)))
    params[1] = params[0]  # snapshots saved as views: consecutive epochs equal
    write_expert(folder / "expert_0000.safetensors", params, traj.layout, tiny)
    with pytest.raises(MkdtError, match="no displacement"):
        distill(dataclasses.replace(config, experts_dir=str(folder)))


def test_student_must_match_the_experts(config: DistillConfig):
    wider = dataclasses.replace(config, model=dataclasses.replace(MODEL, width=16))
    with pytest.raises(MkdtError, match="expert_0000"):
        distill(wider)
    other_norm = dataclasses.replace(config, model=dataclasses.replace(MODEL, norm="groupnorm"))
    with pytest.raises(MkdtError, match="distill.model"):
        distill(other_norm)


def test_too_few_stored_epochs_are_refused(config: DistillConfig):
    with pytest.raises(MkdtError, match="needs epochs 0..5"):
        distill(dataclasses.replace(config, max_start_epoch=4))


def test_missing_inputs_name_the_fix(config: DistillConfig, tmp_path: Path):
    with pytest.raises(MkdtError, match="mkdt init"):
        distill(dataclasses.replace(config, init="high_loss"))
    with pytest.raises(MkdtError, match="mkdt experts"):
        distill(dataclasses.replace(config, experts_dir=str(tmp_path / "nothing")))
    with pytest.raises(MkdtError, match="batch_syn"):
        distill(dataclasses.replace(config, batch_syn=0))


def test_learned_lr_is_clamped_positive():
    from mkdt.distill.loop import _apply
    from mkdt.distill.state import DistillState

    state = DistillState.fresh(torch.zeros(4, 1, 8, 8), torch.zeros(4, 3), 0.1, learn={"targets": True, "lr": True},
                               rates={"images": 1.0, "targets": 1.0, "lr": 1.0}, momentum=0.5, rng=generator(0),
                               rng_augment=generator(1))
    push_down = matching.MatchResult(torch.tensor(1.0), torch.zeros(4, 1, 8, 8), torch.zeros(4, 3), torch.tensor(5.0))
    _apply(state, push_down, lr_min=1e-3)
    assert float(state.lr.detach()) == pytest.approx(1e-3)
    nudge = matching.MatchResult(torch.tensor(1.0), torch.zeros(4, 1, 8, 8), torch.zeros(4, 3), torch.tensor(-0.01))
    _apply(state, nudge, lr_min=1e-3)  # momentum 0.5 * 5 still pushes down: stays at the floor
    assert float(state.lr.detach()) == pytest.approx(1e-3)


def test_memory_saving_auto_follows_the_budget(config: DistillConfig, tmp_path: Path):
    tight = distill(dataclasses.replace(config, iterations=2, memory_saving="auto", memory_budget_gb=1e-6,
                                        out=str(tmp_path / "tight")))
    roomy = distill(dataclasses.replace(config, iterations=2, memory_saving="auto", memory_budget_gb=100.0,
                                        out=str(tmp_path / "roomy")))
    assert tight.summary["memory_saving"] is True and roomy.summary["memory_saving"] is False
    assert 0 < tight.summary["plain_path_estimate_gb"] < 0.1
    a = load_synthetic(tmp_path / "tight" / "distill" / "distilled.safetensors")
    b = load_synthetic(tmp_path / "roomy" / "distill" / "distilled.safetensors")
    assert torch.allclose(a.images, b.images, atol=1e-5) and a.lr == pytest.approx(b.lr, rel=1e-5)


def test_augmented_run_is_reproducible(config: DistillConfig, tmp_path: Path):
    runs = []
    for name in ("a", "b"):
        cfg = dataclasses.replace(config, iterations=3, augment=True, out=str(tmp_path / name))
        distill(cfg)
        runs.append(load_synthetic(tmp_path / name / "distill" / "distilled.safetensors"))
    plain = dataclasses.replace(config, iterations=3, out=str(tmp_path / "plain"))
    distill(plain)
    other = load_synthetic(tmp_path / "plain" / "distill" / "distilled.safetensors")
    assert torch.equal(runs[0].images, runs[1].images)
    assert not torch.equal(runs[0].images, other.images)


def test_experts_of_other_normalisation_are_refused(config: DistillConfig, tiny: TinyRun, tmp_path: Path):
    from mkdt.formats import load_trajectory

    traj = load_trajectory(tiny.experts / "expert_0000.safetensors")
    folder = tmp_path / "other-norm"
    write_expert(folder / "expert_0000.safetensors", traj.params, traj.layout, tiny, mean=[0.5], std=[0.25])
    with pytest.raises(MkdtError, match="expert_0000.*mean.*normalisation"):
        distill(dataclasses.replace(config, experts_dir=str(folder)))


def test_held_out_experts_are_never_drawn_and_give_a_validation_loss(config: DistillConfig, tiny: TinyRun,
                                                                       tmp_path: Path, monkeypatch):
    """validation_experts=1: the last of the 3 experts is never matched for an update; its loss is logged at
    the start and at every checkpoint, equals a direct computation on the saved set, and an interrupted
    run resumes to the same validation record."""
    held = dataclasses.replace(config, validation_experts=1, out=str(tmp_path / "held"))
    result = distill(held)
    assert {r["expert"] for r in read_log(held)} == {0, 1}
    summary = result.summary
    record = load_json(Path(held.out) / "distill" / "stage.json")
    validation = read_metadata(Path(held.out) / "distill" / "checkpoint.safetensors")["validation"]
    assert [v["iteration"] for v in validation] == [0, 5, 10]
    assert summary["val_loss_initial"] == validation[0]["val_loss"] and summary["val_loss_final"] == validation[-1]["val_loss"]
    assert record["summary"]["validation_experts"] == 1
    final = load_synthetic(Path(held.out) / "distill" / "distilled.safetensors")
    student = build_model(MODEL, in_channels=1, resolution=8, head_dim=final.targets.shape[1])
    layout = ParamLayout.of(student)
    bank = ExpertBank.open(tiny.experts, layout, MODEL, held.max_start_epoch + held.expert_epochs, held.expert_epochs)
    setup = Setup(Path(tiny.init), load_synthetic(tiny.init), student, layout, bank, torch.device("cpu"))

    class Leaves:
        images, targets, lr = final.images, final.targets, torch.tensor(final.lr)

    assert validation_loss(held, setup, Leaves) == pytest.approx(validation[-1]["val_loss"], rel=1e-5)
    # interrupted after the checkpoint at 5, resumed: the same validation rows
    again = dataclasses.replace(held, out=str(tmp_path / "again"))
    distill_interrupted_at(again, monkeypatch, call=7)
    resumed = distill(again).summary
    assert resumed["val_loss_final"] == summary["val_loss_final"]
    with pytest.raises(MkdtError, match="validation_experts=3 leaves none"):
        distill(dataclasses.replace(config, validation_experts=3, out=str(tmp_path / "all")))

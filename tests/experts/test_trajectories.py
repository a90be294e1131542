"""The experts stage: stored trajectories, determinism, batching, keep_epochs, resume and refusals."""

from __future__ import annotations

from pathlib import Path

import shutil

import pytest
from helpers import stage_status
import torch

from mkdt.artifacts import load_json, read_metadata
from mkdt.errors import ConfigError, MkdtError
from mkdt.experts import train_expert_range, train_experts
from mkdt.experts import trajectories as traj_mod
from mkdt.formats import load_trajectory, save_targets
from mkdt.models import ModelConfig, build_model
from mkdt.models.functional import ParamLayout


def params_of(out: Path, n: int) -> list[torch.Tensor]:
    # clone: safetensors tensors are memory-mapped views of the file
    return [load_trajectory(out / "experts" / f"expert_{i:04d}.safetensors").params.clone() for i in range(n)]


def test_experts_are_stored_per_epoch_as_copies_with_metadata(run):
    result = train_experts(run.experts())
    files = sorted((run.out / "experts").glob("expert_*.safetensors"))
    assert [f.name for f in files] == ["expert_0000.safetensors", "expert_0001.safetensors", "expert_0002.safetensors"]
    traj = load_trajectory(files[1])
    assert traj.epochs == [0, 1, 2]
    for a, b in zip(traj.params[:-1], traj.params[1:]):
        assert not torch.equal(a, b)  # snapshots are copies, not views of the final weights
    meta = traj.meta
    assert meta["expert"] == 1 and meta["head_dim"] == run.targets.shape[1] and meta["in_channels"] == 1
    assert meta["model"]["width"] == 8 and meta["resolution"] == 8 and len(meta["losses"]) == 2
    assert meta["losses"][1] < meta["losses"][0]  # the student learns the targets
    student = build_model(ModelConfig(**meta["model"]), in_channels=1, resolution=8, head_dim=meta["head_dim"])
    assert traj.layout == ParamLayout.of(student)
    assert (run.out / "experts" / "stage.json").is_file() and (run.out / "experts" / "config.yaml").is_file()
    assert result.summary["experts"] == 3 and result.summary["trained_now"] == 3
    log = (run.out / "experts" / "log.jsonl").read_text().splitlines()
    assert len(log) == 3 * (2 + 1)
    # re-running the finished stage is a no-op returning the recorded result
    again = train_experts(run.experts())
    assert again.status == "reused" and again.summary == result.summary
    assert len((run.out / "experts" / "log.jsonl").read_text().splitlines()) == len(log)


def test_different_experts_differ_and_seed_fixes_everything(run):
    train_experts(run.experts(num_experts=2))
    first = params_of(run.out, 2)
    assert not torch.allclose(first[0][0], first[1][0])  # independent inits
    same = run.clone("same")
    train_experts(run.experts(num_experts=2, out=str(same)))
    assert all(torch.equal(a, b) for a, b in zip(first, params_of(same, 2)))
    other = run.clone("other")
    train_experts(run.experts(num_experts=2, out=str(other), seed=1))
    assert not torch.equal(first[0], params_of(other, 2)[0])


def test_batched_students_equal_one_by_one(run):
    train_experts(run.experts())
    sequential = params_of(run.out, 3)
    batched = run.clone("batched")
    result = train_experts(run.experts(out=str(batched), batch_students=2))
    assert result.summary["batch_students"] == 2
    for a, b in zip(sequential, params_of(batched, 3)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    meta = read_metadata(batched / "experts" / "expert_0002.safetensors")
    assert meta["trained_with"].startswith("batched K=1")  # the last expert of 3 in batches of 2
    assert read_metadata(batched / "experts" / "expert_0000.safetensors")["trained_with"].startswith("batched K=2")


def test_expert_range_trains_any_share_identically(run):
    """Expert 2 trained alone (e.g. on another rank) equals expert 2 of a full run."""
    train_experts(run.experts())
    full = params_of(run.out, 3)[2]
    share = run.clone("share")
    records = train_expert_range(run.experts(out=str(share)), [2])
    assert [r["expert"] for r in records] == [2]
    assert not (share / "experts" / "expert_0000.safetensors").exists()
    assert torch.equal(load_trajectory(share / "experts" / "expert_0002.safetensors").params, full)
    with pytest.raises(MkdtError, match="outside"):
        train_expert_range(run.experts(out=str(share)), [5])


def test_keep_epochs_stores_and_trains_only_what_is_needed(run):
    result = train_experts(run.experts(epochs=5, keep_epochs=2, num_experts=1))
    traj = load_trajectory(run.out / "experts" / "expert_0000.safetensors")
    assert traj.epochs == [0, 1, 2]
    summary = result.summary
    assert summary["stopped_early"] and summary["trained_epochs"] == 2 and summary["epochs_configured"] == 5
    assert "keep_epochs=2" in summary["note"]
    assert load_json(run.out / "experts" / "stage.json")["summary"]["stored_epochs"] == [0, 1, 2]
    # the stored epochs are those of the full run (constant lr)
    full = run.clone("full")
    train_experts(run.experts(epochs=5, num_experts=1, out=str(full)))
    assert torch.equal(load_trajectory(full / "experts" / "expert_0000.safetensors").params[:3], traj.params)


def _interrupt_after_first(record: dict) -> None:
    raise KeyboardInterrupt


def test_resume_after_interrupt_trains_only_the_rest(run):
    with pytest.raises(KeyboardInterrupt):
        train_experts(run.experts(), callback=_interrupt_after_first)
    assert (run.out / "experts" / "expert_0000.safetensors").is_file()
    assert not (run.out / "experts" / "expert_0001.safetensors").exists()
    assert stage_status(run.out / "experts") == "running"
    trained = []
    result = train_experts(run.experts(), callback=lambda r: trained.append(r["expert"]))
    assert trained == [1, 2] and result.summary["resumed_finished"] == 1
    clean = run.clone("clean")
    train_experts(run.experts(out=str(clean)))
    assert all(torch.equal(a, b) for a, b in zip(params_of(run.out, 3), params_of(clean, 3)))


def test_batched_resume_mid_group_continues_from_epoch_checkpoint(run, monkeypatch):
    """Killed after epoch 1 of a batch: the re-run restarts at epoch 2 and gives the uninterrupted result."""
    original = traj_mod._save_partial
    calls = []

    def save_then_stop(ctx, group, state):
        original(ctx, group, state)
        calls.append(state.epoch)
        raise KeyboardInterrupt

    monkeypatch.setattr(traj_mod, "_save_partial", save_then_stop)
    cfg = run.experts(epochs=3, batch_students=3)
    with pytest.raises(KeyboardInterrupt):
        train_experts(cfg)
    assert calls == [1] and (run.out / "experts" / "partial_0000-0002.safetensors").is_file()
    monkeypatch.setattr(traj_mod, "_save_partial", lambda ctx, group, state: calls.append(state.epoch) or original(
        ctx, group, state))
    train_experts(cfg)
    assert calls == [1, 2, 3]  # epoch 1 was not trained again
    assert not list((run.out / "experts").glob("partial_*"))
    clean = run.clone("clean")
    train_experts(run.experts(epochs=3, batch_students=3, out=str(clean)))
    assert all(torch.equal(a, b) for a, b in zip(params_of(run.out, 3), params_of(clean, 3)))


def test_broken_expert_file_is_retrained(run):
    train_experts(run.experts(num_experts=2))
    good = params_of(run.out, 2)
    path = run.out / "experts" / "expert_0001.safetensors"
    path.unlink()  # replace, not truncate: live tensors may map the old file
    path.write_bytes(b"not a safetensors file")  # the recorded size no longer matches: the stage runs again
    trained = []
    train_experts(run.experts(num_experts=2), callback=lambda r: trained.append(r["expert"]))
    assert trained == [1] and torch.equal(params_of(run.out, 2)[1], good[1])


def test_targets_of_other_data_are_refused(run, digits):
    other = run.clone("other")
    wrong = torch.zeros(run.n, run.targets.shape[1])
    save_targets(other / "targets" / "targets.safetensors", wrong, "0123456789abcdef", data_name="other")
    with pytest.raises(MkdtError, match="targets.safetensors.*fingerprint"):
        train_experts(run.experts(out=str(other)))
    assert not list((other / "experts").glob("expert_*"))


@pytest.mark.parametrize("change", [{"lr": 0.05}, {"model": ModelConfig(width=4, depth=1)}, {"seed": 3}])
def test_changed_settings_never_mix_experts(run, change):
    """Other settings: the finished experts are kept aside (experts.stale.1), never mixed with new ones; a
    folder of hand-placed expert files is checked file by file."""
    train_experts(run.experts(num_experts=1))
    before = params_of(run.out, 1)[0]
    train_experts(run.experts(num_experts=2, **change))
    assert torch.equal(load_trajectory(run.out / "experts.stale.1" / "expert_0000.safetensors").params, before)
    assert not torch.equal(params_of(run.out, 1)[0], before)
    hand = run.clone("hand")  # expert files placed by hand, without a record, are checked file by file
    shutil.copytree(run.out / "experts", hand / "experts", ignore=shutil.ignore_patterns("stage.json"))
    with pytest.raises(MkdtError, match="expert_0000.safetensors.*other settings"):
        train_experts(run.experts(num_experts=2, out=str(hand)))


def test_batchnorm_student_cannot_be_batched(run):
    with pytest.raises(MkdtError, match="BatchNorm"):
        train_experts(run.experts(model=ModelConfig(width=8, depth=1, norm="batchnorm"), batch_students=2))


@pytest.mark.parametrize("key,value", [("num_experts", 0), ("keep_epochs", 0), ("batch_students", 0),
                                       ("batched_impl", "magic"), ("lr", 0.0)])
def test_bad_config_values_are_refused(run, key, value):
    with pytest.raises(ConfigError, match=key):
        train_experts(run.experts(**{key: value}))
    assert not (run.out / "experts").exists()


def test_raising_num_experts_trains_only_the_new_ones(run):
    first = train_experts(run.experts(num_experts=2))
    before = params_of(run.out, 2)
    trained = []
    more = train_experts(run.experts(num_experts=3), callback=lambda r: trained.append(r["expert"]))
    assert more.status == "extended" and trained == [2] and len(more.outputs) == 3
    assert all(torch.equal(a, b) for a, b in zip(before, params_of(run.out, 2)))
    assert not list(run.out.glob("experts.stale.*"))  # nothing was moved aside
    fewer = train_experts(run.experts(num_experts=2))  # shrinking keeps the files, records the first two
    assert fewer.status == "extended" and len(fewer.outputs) == 2 and first.summary["experts"] == 2
    assert (run.out / "experts" / "expert_0002.safetensors").is_file()

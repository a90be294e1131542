"""The init stage: high-loss and random initial sets, sizes, resume and refusal of broken experts."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import stage_status
import torch

from mkdt.artifacts import load_tensors, read_metadata, save_tensors
from mkdt.data import load_dataset
from mkdt.errors import MkdtError
from mkdt.experts import init as init_mod
from mkdt.experts import select_initial_set, train_experts
from mkdt.formats import load_synthetic, load_trajectory, save_trajectory
from mkdt.models import ModelConfig, build_model
from mkdt.models.functional import load_flat_parameters


@pytest.fixture
def trained(run):
    train_experts(run.experts())
    return run


def independent_mean_loss(run, epoch: int = 1) -> torch.Tensor:
    """Per-example MSE averaged over experts, computed with ordinary modules (not the stage's code path)."""
    data = load_dataset(run.data)
    x = data.normalize()
    losses = []
    for path in sorted((run.out / "experts").glob("expert_*.safetensors")):
        traj = load_trajectory(path)
        model = build_model(ModelConfig(**traj.meta["model"]), in_channels=1, resolution=8,
                            head_dim=traj.meta["head_dim"])
        load_flat_parameters(model, traj.at(epoch))
        with torch.no_grad():
            losses.append(((model(x) - run.targets) ** 2).mean(dim=1))
    return torch.stack(losses).mean(0)


def test_high_loss_set_holds_the_highest_mean_losses(trained):
    result = select_initial_set(trained.init(size=0.05))
    k = round(0.05 * trained.n)
    high = load_synthetic(trained.out / "init" / "high_loss.safetensors")
    mean_loss = independent_mean_loss(trained)
    chosen = high.indices
    assert len(high) == k and len(set(chosen.tolist())) == k
    rest = torch.ones(trained.n, dtype=torch.bool)
    rest[chosen] = False
    assert mean_loss[chosen].min() >= mean_loss[rest].max() - 1e-6
    assert torch.equal(torch.sort(chosen).values, torch.sort(torch.topk(mean_loss, k).indices).values)
    # images are the normalised pixels of the chosen examples, targets their teacher targets
    data = load_dataset(trained.data)
    torch.testing.assert_close(high.images, data.normalize(data.images[chosen]))
    torch.testing.assert_close(high.targets, trained.targets[chosen])
    assert high.meta["method"] == "high_loss" and high.meta["fingerprint"] == data.fingerprint()
    summary = result.summary
    assert summary["mean_loss_high_loss"] > summary["mean_loss_all"] > 0
    assert summary["mean_loss_high_loss"] > summary["mean_loss_random"]
    assert abs(summary["mean_loss_all"] - float(mean_loss.mean())) < 1e-5
    stored = load_tensors(trained.out / "init" / "losses.safetensors")
    assert stored["losses"].shape == (3, trained.n)


def test_random_set_is_seeded(trained):
    select_initial_set(trained.init(size=20))
    first = load_synthetic(trained.out / "init" / "random.safetensors")
    assert len(first) == 20 and torch.equal(first.indices, torch.sort(first.indices).values)
    assert len(set(first.indices.tolist())) == 20
    torch.testing.assert_close(first.targets, trained.targets[first.indices])
    (trained.out / "init" / "stage.json").unlink()
    select_initial_set(trained.init(size=20))
    assert torch.equal(load_synthetic(trained.out / "init" / "random.safetensors").indices, first.indices)
    select_initial_set(trained.init(size=20, seed=5))
    assert not torch.equal(load_synthetic(trained.out / "init" / "random.safetensors").indices, first.indices)


@pytest.mark.parametrize("size,count", [(0.02, None), (0.1, None), (1, 1), (37, 37), (37.0, 37)])
def test_size_as_fraction_or_count(trained, size, count):
    result = select_initial_set(trained.init(size=size))
    want = count if count is not None else round(size * trained.n)
    assert result.summary["count"] == want
    assert len(load_synthetic(trained.out / "init" / "high_loss.safetensors")) == want
    assert len(load_synthetic(trained.out / "init" / "random.safetensors")) == want


@pytest.mark.parametrize("size", [2.5, 100000, -0.1, 0])
def test_bad_sizes_are_refused(trained, size):
    with pytest.raises(MkdtError, match="size"):
        select_initial_set(trained.init(size=size))
    assert not (trained.out / "init" / "high_loss.safetensors").exists()


def test_scoring_resumes_after_interrupt(trained, monkeypatch):
    original = init_mod.per_example_loss
    calls = []

    def scored_then_stop(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(init_mod, "per_example_loss", scored_then_stop)
    with pytest.raises(KeyboardInterrupt):
        select_initial_set(trained.init())
    assert stage_status(trained.out / "init") == "running"
    assert read_metadata(trained.out / "init" / init_mod.PARTIAL_FILE)["experts"][0][0] == "expert_0000.safetensors"
    calls.clear()
    monkeypatch.setattr(init_mod, "per_example_loss", lambda *a, **k: calls.append(1) or original(*a, **k))
    resumed = select_initial_set(trained.init())
    assert len(calls) == 2  # experts 1 and 2 only
    assert not (trained.out / "init" / init_mod.PARTIAL_FILE).exists()
    (trained.out / "init" / "stage.json").unlink()
    fresh = select_initial_set(trained.init())
    assert resumed.status == "resumed"
    assert resumed.summary["sets"]["high_loss"]["mean_loss_selected"] == pytest.approx(
        fresh.summary["sets"]["high_loss"]["mean_loss_selected"], abs=1e-7)
    assert select_initial_set(trained.init()).status == "reused"


def _rewrite_expert(path: Path, params: torch.Tensor, allow_nonfinite: bool = False) -> None:
    meta = read_metadata(path)
    path.unlink()  # replace, not truncate: live tensors may map the old file
    save_tensors(path, {"params": params}, meta, allow_nonfinite=allow_nonfinite)


def test_expert_with_nan_is_refused_naming_the_file(trained):
    path = trained.out / "experts" / "expert_0001.safetensors"
    params = load_trajectory(path).params.clone()
    params[2, 0] = float("nan")
    _rewrite_expert(path, params, allow_nonfinite=True)
    with pytest.raises(MkdtError, match="expert_0001.safetensors.*NaN"):
        select_initial_set(trained.init())


def test_expert_without_displacement_is_refused_naming_the_file(trained):
    path = trained.out / "experts" / "expert_0002.safetensors"
    params = load_trajectory(path).params.clone()
    params[1] = params[0]
    _rewrite_expert(path, params)
    with pytest.raises(MkdtError, match="expert_0002.safetensors.*identical"):
        select_initial_set(trained.init())


def test_expert_of_another_architecture_is_refused_naming_the_file(trained):
    with pytest.raises(MkdtError, match="expert_0000.safetensors.*architecture"):
        select_initial_set(trained.init(model=ModelConfig(width=16, depth=1)))


def test_experts_of_other_data_are_refused(trained):
    path = trained.out / "experts" / "expert_0000.safetensors"
    traj = load_trajectory(path)
    meta = {k: v for k, v in traj.meta.items() if k not in ("layout", "epochs")}
    params = traj.params.clone()
    path.unlink()
    save_trajectory(path, params, traj.epochs, traj.layout, **{**meta, "fingerprint": "ffffffffffffffff"})
    with pytest.raises(MkdtError, match="expert_0000.safetensors.*other data"):
        select_initial_set(trained.init())


def test_unfinished_experts_stage_is_refused(trained):
    record = trained.out / "experts" / "stage.json"
    record.write_text(record.read_text().replace('"status": "done"', '"status": "running"'))
    with pytest.raises(MkdtError, match="experts stage there has not finished"):
        select_initial_set(trained.init())


def test_targets_of_other_data_are_refused(trained, digits):
    from mkdt.data import DataConfig

    with pytest.raises(MkdtError, match="fingerprint"):
        select_initial_set(trained.init(data=DataConfig(name="digits", resolution=16)))

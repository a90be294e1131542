"""MTT-SSL experts (``objective: ssl``): SSL-trained trajectories of backbone + projector, no targets;
and the KD default left exactly as it was."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mkdt.config import from_dict, resolve, validate
from mkdt.data import load_dataset
from mkdt.errors import ConfigError
from mkdt.experts import ExpertsConfig, train_experts
from mkdt.ssl.student import SslExpertSettings, build_student
from mkdt.experts.trajectories import init_seed, order_seed
from mkdt.formats import load_trajectory
from mkdt.models import ModelConfig, build_model
from mkdt.models.functional import ParamLayout, flat_parameters
from mkdt.runtime import generator, seeded
from mkdt.ssl import ObjectiveConfig
from mkdt.training import RegressionSchedule, train_regression

TINY = ModelConfig(name="convnet", width=8, depth=1, norm="instancenorm", pool="avgpool")  # conftest.TINY

SMALL_SSL = SslExpertSettings(objective=ObjectiveConfig(projector_hidden=16, projector_out=16))


def ssl_config(run, out: Path, **overrides) -> ExpertsConfig:
    base = dict(objective="ssl", ssl=SMALL_SSL, num_experts=2, epochs=3, lr=0.02, out=str(out))
    return run.experts(**{**base, **overrides})


def trajectories(out: Path, n: int) -> list:
    return [load_trajectory(out / "experts" / f"expert_{i:04d}.safetensors") for i in range(n)]


def test_kd_is_the_default_and_trains_exactly_as_before(run):
    config = run.experts(num_experts=1)
    assert config.objective == "kd"
    train_experts(config)
    (traj,) = trajectories(run.out, 1)
    assert "objective" not in traj.meta and "ssl" not in traj.meta  # KD files are what they always were
    with seeded(init_seed(config.seed, 0)):
        net = build_model(TINY, in_channels=1, resolution=8, head_dim=run.targets.shape[1])
    snapshots = [flat_parameters(net)]
    images = load_dataset(run.data).normalize()
    train_regression(net, images, run.targets, RegressionSchedule(epochs=2, lr=0.1, batch_size=128),
                     generator(order_seed(config.seed, 0)),
                     on_epoch_end=lambda epoch, m, loss: snapshots.append(flat_parameters(m)))
    assert torch.equal(torch.stack(snapshots), traj.params)


def test_ssl_experts_train_backbone_and_projector_without_targets(tmp_path: Path, run):
    out = tmp_path / "no-targets"  # no targets/ folder: SSL experts never read them
    result = train_experts(ssl_config(run, out))
    assert result.summary["experts"] == 2
    for traj in trajectories(out, 2):
        meta = traj.meta
        assert meta["objective"] == "ssl" and meta["ssl"]["objective"]["projector_out"] == 16
        assert "head_dim" not in meta and "targets_digest" not in meta
        assert traj.epochs == [0, 1, 2, 3] and len(meta["losses"]) == 3
        assert all(torch.isfinite(torch.tensor(meta["losses"])))
        student = build_student(TINY, SMALL_SSL, in_channels=1, resolution=8, seed=0)
        assert traj.layout == ParamLayout.of(student)
        assert traj.layout.names[0].startswith("backbone.") and traj.layout.names[-1].startswith("projector.")
        for a, b in zip(traj.params[:-1], traj.params[1:]):
            assert not torch.equal(a, b)
        # the backbone moves too, not only the projector
        backbone = sum(s for n, s in zip(traj.layout.names, traj.layout.sizes) if n.startswith("backbone."))
        assert not torch.equal(traj.params[0][:backbone], traj.params[-1][:backbone])
    again = train_experts(ssl_config(run, out))
    assert again.status == "reused"


def test_ssl_experts_are_deterministic_by_seed(tmp_path: Path, run):
    train_experts(ssl_config(run, tmp_path / "a"))
    train_experts(ssl_config(run, tmp_path / "b"))
    train_experts(ssl_config(run, tmp_path / "c", seed=1))
    first = [t.params.clone() for t in trajectories(tmp_path / "a", 2)]
    same = [t.params.clone() for t in trajectories(tmp_path / "b", 2)]
    other = [t.params.clone() for t in trajectories(tmp_path / "c", 2)]
    assert all(torch.equal(a, b) for a, b in zip(first, same))
    assert not torch.equal(first[0][0], first[1][0])  # independent inits
    assert not torch.equal(first[0], other[0])


def test_ssl_and_kd_experts_are_never_mixed_in_one_folder(run):
    train_experts(run.experts(num_experts=1))
    train_experts(ssl_config(run, run.out, num_experts=1))  # same folder, other objective
    kept = load_trajectory(run.out / "experts.stale.1" / "expert_0000.safetensors")
    now = load_trajectory(run.out / "experts" / "expert_0000.safetensors")
    assert "objective" not in kept.meta and now.meta["objective"] == "ssl"
    back = train_experts(run.experts(num_experts=1))  # the KD settings again: the kept experts come back
    assert back.status == "restored" and "objective" not in load_trajectory(back.outputs["expert_0000"]).meta


def test_ssl_settings_parse_from_a_document_and_bad_values_are_refused(run):
    doc = {"objective": "ssl", "ssl": {"objective": {"projector_out": 8}, "augment": {"flip_p": 0.0}}}
    config = from_dict(ExpertsConfig, doc)
    assert config.ssl.objective.projector_out == 8 and config.ssl.augment.flip_p == 0.0
    with pytest.raises(ConfigError, match="experts.objective must be kd or ssl"):
        validate(run.experts(objective="barlow"), "experts.")
    with pytest.raises(ConfigError, match="experts.batch_students must be 1 with objective ssl"):
        validate(ssl_config(run, run.out, batch_students=2), "experts.")
    with pytest.raises(ConfigError, match="experts.ssl.augment.flip_p"):
        resolve(ExpertsConfig, section="experts", values={"objective": "ssl", "ssl": {"augment": {"flip_p": 2.0}}})

"""MTT-SSL end to end on digits: SSL experts (the experts stage) -> distillation with the SSL inner
objective -> a synthetic set; its matching loss is finite and objectives are never mixed."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mkdt.artifacts import load_json
from mkdt.data import DataConfig, load_dataset
from mkdt.distill import DistillConfig, distill, matching
from mkdt.distill import ssl_inner
from mkdt.distill.experts import ExpertBank
from mkdt.config import validate
from mkdt.errors import ConfigError, MkdtError
from mkdt.experts import ExpertsConfig, train_experts
from mkdt.ssl.student import SslExpertSettings
from mkdt.training import RegressionSchedule
from mkdt.formats import SyntheticSet, load_synthetic, save_synthetic
from mkdt.models.functional import ParamLayout
from mkdt.runtime import generator
from mkdt.ssl import ObjectiveConfig

from distill_helpers import MODEL, TinyRun

DATA = DataConfig(name="digits", resolution=8)


@pytest.fixture(scope="module")
def ssl_run(tmp_path_factory) -> SimpleNamespace:
    """Two SSL experts of 3 epochs trained by the experts stage, and a 32-image initial set of their data."""
    root = tmp_path_factory.mktemp("mtt-ssl")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        settings = SslExpertSettings(objective=ObjectiveConfig(projector_hidden=16, projector_out=16))
        train_experts(ExpertsConfig(data=DATA, model=MODEL, objective="ssl", ssl=settings, num_experts=2,
                                    schedule=RegressionSchedule(epochs=3, lr=0.02, batch_size=128), out=str(root),
                                    device="cpu"))
    finally:
        torch.set_num_threads(before)
    data = load_dataset(DATA)
    x = data.normalize()
    idx = torch.randperm(len(x), generator=generator(3))[:32]
    targets = torch.randn(32, 6, generator=generator(4))  # an MKDT-style init carries targets; MTT-SSL ignores them
    init = root / "init" / "high_loss.safetensors"
    save_synthetic(init, SyntheticSet(x[idx], targets, data.mean, data.std, indices=idx,
                                      meta={"fingerprint": data.fingerprint(), "data_name": data.name}))
    return SimpleNamespace(experts=root / "experts", init=init)


@pytest.fixture
def ssl_config(ssl_run, tmp_path: Path) -> DistillConfig:
    return DistillConfig(model=MODEL, experts_dir=str(ssl_run.experts), init=str(ssl_run.init),
                         out=str(tmp_path / "run"), device="cpu", inner_objective="ssl", iterations=4, syn_steps=3,
                         expert_epochs=1, max_start_epoch=2, lr_img=10.0, lr_lr=1e-3, lr_init=0.02, batch_syn=16,
                         checkpoint_every=2, grid_images=16)


def test_mtt_ssl_distills_a_synthetic_set(ssl_config: DistillConfig, ssl_run):
    result = distill(ssl_config)
    stage = Path(ssl_config.out) / "distill"
    record = load_json(stage / "stage.json")
    assert result.outputs["set"] == stage / "distilled.safetensors"
    rows = [json.loads(line) for line in (stage / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    assert len(losses) == 4 and all(v is not None and 0 < v < float("inf") for v in losses)
    final, initial = load_synthetic(stage / "distilled.safetensors"), load_synthetic(ssl_run.init)
    assert not torch.equal(final.images, initial.images)
    assert torch.equal(final.targets, initial.targets)  # unused, never learned
    assert final.meta["method"] == "mtt_ssl"
    assert final.lr != pytest.approx(ssl_config.lr_init)
    saved = record["config"]
    assert saved["inner_objective"] == "ssl" and saved["learn_targets"] is None and saved["memory_saving"] == "auto"
    assert result.summary["memory_saving"] is False


def test_ssl_matching_loss_is_finite_with_image_gradients(ssl_run):
    init = load_synthetic(ssl_run.init)
    student = ssl_inner.build_inner_student(MODEL, ssl_run.experts, 1, 8, init.mean, init.std, seed=0)
    layout = ParamLayout.of(student)
    bank = ExpertBank.open(ssl_run.experts, layout, MODEL, 3, 1, objective="ssl")
    theta0, theta_star = bank.pair(0, 0, 1)
    images = init.images.clone().requires_grad_(True)
    steps = matching.plan_steps(len(images), 16, 3, generator(0))
    problem = matching.Problem(student, layout, theta0, theta_star, images, init.targets,
                               torch.tensor(0.02, requires_grad=True), steps, objective=student)
    result = matching.match_plain(problem)
    assert torch.isfinite(result.loss) and result.finite()
    assert result.grad_images.abs().sum() > 0 and result.grad_targets is None
    # the views of a step are a function of its minibatch: the same plan gives the same loss
    again = matching.matching_loss(matching.unroll(problem), theta0, theta_star)
    assert float(again.detach()) == pytest.approx(float(result.loss), rel=1e-6)
    x = images[steps[0].indices]
    assert torch.equal(student.views(steps[0], x)[0]["boxes"], student.views(steps[0], x)[0]["boxes"])
    assert not torch.equal(student.views(steps[0], x)[0]["boxes"], student.views(steps[0], x)[1]["boxes"])


def test_extended_run_equals_an_uninterrupted_one(ssl_config: DistillConfig, tmp_path: Path):
    short = dataclasses.replace(ssl_config, iterations=2, out=str(tmp_path / "ext"))
    distill(short)
    extended = load_synthetic(distill(dataclasses.replace(short, iterations=4)).outputs["set"])
    straight = load_synthetic(distill(ssl_config).outputs["set"])
    assert torch.equal(extended.images, straight.images) and extended.lr == straight.lr


def test_mismatched_objectives_are_refused_in_one_line(ssl_config: DistillConfig, ssl_run, tiny: TinyRun):
    kd_experts = dataclasses.replace(ssl_config, experts_dir=str(tiny.experts), init=str(tiny.init))
    with pytest.raises(MkdtError, match="trained with objective kd but distill inner_objective is ssl") as err:
        distill(kd_experts)
    assert str(tiny.experts) in str(err.value) and "\n" not in str(err.value)
    ssl_experts_for_kd = dataclasses.replace(ssl_config, inner_objective="kd", learn_targets=True,
                                             memory_saving=False)
    with pytest.raises(MkdtError, match="trained with objective ssl but distill inner_objective is kd") as err:
        distill(ssl_experts_for_kd)
    assert str(ssl_run.experts) in str(err.value) and "set inner_objective=ssl" in str(err.value)
    assert "\n" not in str(err.value)


def test_a_kd_expert_among_ssl_experts_is_named(ssl_config: DistillConfig, ssl_run, tiny: TinyRun, tmp_path: Path):
    mixed = tmp_path / "mixed"
    shutil.copytree(ssl_run.experts, mixed, ignore=shutil.ignore_patterns("stage.json"))  # files by hand
    shutil.copy(tiny.experts / "expert_0000.safetensors", mixed / "expert_0009.safetensors")
    with pytest.raises(MkdtError, match="expert_0009.safetensors was trained with objective kd") as err:
        distill(dataclasses.replace(ssl_config, experts_dir=str(mixed)))
    assert "\n" not in str(err.value)


def test_ssl_config_leaves_targets_alone_and_takes_the_plain_path():
    config = DistillConfig(inner_objective="ssl")
    validate(config)
    assert config.targets_learned is False and config.memory_mode == "off"
    assert config.learn_targets is None and config.memory_saving == "auto"  # the user's values are not rewritten
    for bad, message in (({"memory_saving": True}, "memory_saving must be false or auto with inner_objective ssl"),
                         ({"augment": True}, "augment must be false with inner_objective ssl"),
                         ({"learn_targets": True}, "learn_targets must be false or null with inner_objective ssl")):
        with pytest.raises(ConfigError, match=message):
            validate(DistillConfig(inner_objective="ssl", **bad))
    with pytest.raises(ConfigError, match="inner_objective must be kd or ssl"):
        validate(DistillConfig(inner_objective="simclr"))
    kd = DistillConfig()
    assert kd.targets_learned is True and kd.memory_mode == "auto"


def test_one_image_minibatches_are_refused(ssl_config: DistillConfig):
    with pytest.raises(MkdtError, match="holds one image"):
        distill(dataclasses.replace(ssl_config, batch_syn=31))

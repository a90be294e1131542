"""The opt-in fast inner loop (``distill/fast.py``) computes the reference path's loss and gradients.

Tolerances: float64 runs agree to rtol 1e-9 (only the order of float operations differs); float32 runs
to 1e-4 of each gradient's norm (the unrolled second-order graph amplifies rounding); bf16 autocast is a
different arithmetic, held to 2% of the loss and gradients pointing the same way (cosine > 0.95).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mkdt.distill import DistillConfig, distill, fast, matching, memory
from mkdt.config import validate
from mkdt.errors import ConfigError
from mkdt.models import ModelConfig, build_model
from mkdt.models.functional import ParamLayout, flat_parameters
from mkdt.runtime import generator, seeded


def make_problem(*, learn=(True, True, True), augment=False, dtype=torch.float64, norm="instancenorm",
                 pool="avgpool", resolution=8, steps=4, batch=4):
    """A 2-block width-8 ConvNet on 10 images of 1x8x8 (or 16x16), theta* a perturbation of theta_0."""
    with seeded(5):
        student = build_model(ModelConfig(width=8, depth=2, norm=norm, pool=pool), in_channels=1,
                              resolution=resolution, head_dim=6).to(dtype)
    layout = ParamLayout.of(student)
    g = generator(9)
    theta0 = flat_parameters(student)
    theta_star = theta0 + 0.05 * torch.randn(theta0.shape, generator=g, dtype=dtype)
    images = torch.randn(10, 1, resolution, resolution, generator=g, dtype=dtype).requires_grad_(learn[0])
    targets = torch.randn(10, 6, generator=g, dtype=dtype).requires_grad_(learn[1])
    lr = torch.tensor(0.2, dtype=dtype).requires_grad_(learn[2])
    plan = matching.plan_steps(10, batch, steps, generator(13), augment_generator=generator(14) if augment else None,
                               resolution=resolution)
    return matching.Problem(student, layout, theta0, theta_star, images, targets, lr, plan)


def reference(problem: matching.Problem, memory_saving: bool) -> matching.MatchResult:
    return memory.match_memory_saving(problem) if memory_saving else matching.match_plain(problem)


def assert_same(ref: matching.MatchResult, got: matching.MatchResult, dtype: torch.dtype) -> None:
    if dtype == torch.float64:
        torch.testing.assert_close(got.loss, ref.loss, rtol=1e-12, atol=0)
    else:
        torch.testing.assert_close(got.loss, ref.loss, rtol=1e-6, atol=0)
    for name in ("grad_images", "grad_targets", "grad_lr"):
        a, b = getattr(ref, name), getattr(got, name)
        assert (a is None) == (b is None), name
        if a is None:
            continue
        assert a.shape == b.shape and a.abs().max() > 0, name
        if dtype == torch.float64:
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)
        else:
            assert float((a - b).norm()) <= 1e-4 * float(a.norm()), name


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("augment", [False, True])
@pytest.mark.parametrize("memory_saving", [False, True])
@pytest.mark.parametrize("hand_norm", [False, True])
def test_fast_path_equals_reference(dtype, augment, memory_saving, hand_norm):
    problem = make_problem(augment=augment, dtype=dtype)
    student = fast.FastStudent(problem.student, problem.layout, hand_norm=hand_norm)
    assert student.hand_written
    assert_same(reference(problem, memory_saving), fast.match(problem, student, memory_saving=memory_saving), dtype)


@pytest.mark.parametrize("memory_saving", [False, True])
def test_fast_path_at_16px_channels_last(memory_saving):
    problem = make_problem(resolution=16)
    student = fast.FastStudent(problem.student, problem.layout, channels_last=True)
    assert_same(reference(problem, memory_saving), fast.match(problem, student, memory_saving=memory_saving),
                torch.float64)


@pytest.mark.parametrize("memory_saving", [False, True])
def test_fast_path_respects_frozen_leaves(memory_saving):
    problem = make_problem(learn=(True, False, False))
    got = fast.match(problem, fast.FastStudent(problem.student, problem.layout), memory_saving=memory_saving)
    assert got.grad_targets is None and got.grad_lr is None
    torch.testing.assert_close(got.grad_images, reference(problem, memory_saving).grad_images, rtol=1e-9,
                               atol=1e-12)


@pytest.mark.parametrize("norm,pool", [("groupnorm", "maxpool"), ("none", "avgpool"), ("instancenorm", "none")])
@pytest.mark.parametrize("hand_norm", [False, True])
def test_hand_written_forward_equals_module(norm, pool, hand_norm):
    problem = make_problem(norm=norm, pool=pool)
    student = fast.FastStudent(problem.student, problem.layout, hand_norm=hand_norm)
    assert student.hand_written
    x = problem.images.detach()
    torch.testing.assert_close(student.forward(student.split(problem.theta0), x), problem.student(x),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("memory_saving", [False, True])
def test_models_without_a_hand_written_forward_fall_back(memory_saving):
    """A student the hand-written forward does not cover (batchnorm) runs through functional_call."""
    problem = make_problem(norm="batchnorm")
    student = fast.FastStudent(problem.student, problem.layout)
    assert not student.hand_written
    assert_same(reference(problem, memory_saving), fast.match(problem, student, memory_saving=memory_saving),
                torch.float64)


def test_gathered_batches_equal_step_batches():
    problem = make_problem(augment=True, dtype=torch.float32)
    plans = {"augmented": problem.steps,
             "mixed": [dataclasses.replace(s, augment=None) if i % 2 else s for i, s in enumerate(problem.steps)]}
    for plan in plans.values():
        xs, ys = fast.gathered_batches(problem.images, problem.targets, plan)
        for step, x, y in zip(plan, xs, ys):
            want_x, want_y = matching.step_batch(problem.images, problem.targets, step)
            assert torch.equal(x, want_x) and torch.equal(y, want_y)


@pytest.mark.parametrize("memory_saving", [False, True])
def test_bf16_autocast_is_close_to_float32(memory_saving):
    problem = make_problem(dtype=torch.float32, resolution=16)
    ref = reference(problem, memory_saving)
    got = fast.match(problem, fast.FastStudent(problem.student, problem.layout, amp_dtype=torch.bfloat16),
                     memory_saving=memory_saving)
    assert got.loss.dtype == torch.float32
    torch.testing.assert_close(got.loss, ref.loss, rtol=2e-2, atol=0)
    for a, b in zip(ref.grads(), got.grads()):
        assert b.dtype == torch.float32
        assert float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)) > 0.95


def test_config_keeps_precision_and_objective_with_the_fast_path():
    with pytest.raises(ConfigError, match="precision must be fp32 unless fast_inner"):
        validate(DistillConfig(precision="bf16"))
    with pytest.raises(ConfigError, match="precision must be fp32, bf16 or auto"):
        validate(DistillConfig(fast_inner=True, precision="fp16"))
    with pytest.raises(ConfigError, match="fast_inner must be false with inner_objective ssl"):
        validate(DistillConfig(fast_inner=True, inner_objective="ssl", memory_saving=False))
    validate(DistillConfig(fast_inner=True, precision="auto"))


@pytest.mark.parametrize("native,expect", [(False, "fp32"), (True, "bf16")])
def test_stage_records_fast_path_and_precision(config, monkeypatch, native, expect):
    """precision auto: bf16 only where the capability probe says the hardware runs it, fp32 elsewhere;
    the choice is in the stage's summary."""
    monkeypatch.setattr("mkdt.ssl.train.native_bf16", lambda device: native)
    result = distill(dataclasses.replace(config, iterations=2, fast_inner=True, precision="auto"))
    assert result.summary["fast_inner"] is True and result.summary["precision"] == expect
    assert result.summary["updates_applied"] == 2


def test_stage_default_is_the_reference_path(config):
    result = distill(dataclasses.replace(config, iterations=1))
    assert result.summary["fast_inner"] is False and result.summary["precision"] == "fp32"


def test_fast_path_settings_and_the_run_key(config):
    """fast_inner says how the same gradients are computed (like memory_saving): out of the key. precision
    changes the numbers: in the key unless fp32, so a run made before either key existed keeps its key."""
    from mkdt.distill.loop import STAGE
    from mkdt.engine import identify
    from mkdt.layout import RunLayout

    layout = RunLayout(config.out)
    key, _, _, identity = identify(STAGE, config, layout)
    assert "precision" not in identity["config"] and "fast_inner" not in identity["config"]
    assert identify(STAGE, dataclasses.replace(config, fast_inner=True), layout)[0] == key
    bf16 = identify(STAGE, dataclasses.replace(config, fast_inner=True, precision="bf16"), layout)
    assert bf16[0] != key and bf16[3]["config"]["precision"] == "bf16"


def test_instance_norm_derivatives_are_exact():
    """InstanceNorm's written-out first and second derivatives against finite differences (float64), and
    its values against torch's GroupNorm."""
    g = generator(3)
    x = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(3, generator=g, dtype=torch.float64) + 0.5).requires_grad_(True)
    b = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    norm = lambda x, w, b: fast.InstanceNorm.apply(x, w, b, 1e-5)  # noqa: E731
    torch.testing.assert_close(norm(x, w, b), torch.nn.functional.group_norm(x, 3, w, b, 1e-5), rtol=1e-12,
                               atol=1e-12)
    assert torch.autograd.gradcheck(norm, (x, w, b))
    assert torch.autograd.gradgradcheck(norm, (x, w, b))

"""The memory-saving path computes the plain path's gradients (images, targets, lr)."""

from __future__ import annotations

import pytest
import torch

from mkdt.distill import augment as aug
from mkdt.distill import matching, memory
from mkdt.models import ModelConfig, build_model
from mkdt.models.functional import ParamLayout, flat_parameters
from mkdt.runtime import generator, seeded


def make_problem(*, learn=(True, True, True), augment=False, batch=6, steps=5, dtype=torch.float64):
    """A 2-block ConvNet at 8 px in float64, theta* a random perturbation of theta_0."""
    with seeded(3):
        student = build_model(ModelConfig(width=4, depth=2), in_channels=1, resolution=8, head_dim=5).to(dtype)
    layout = ParamLayout.of(student)
    g = generator(7)
    theta0 = flat_parameters(student)
    theta_star = theta0 + 0.05 * torch.randn(theta0.shape, generator=g, dtype=dtype)
    images = torch.randn(10, 1, 8, 8, generator=g, dtype=dtype).requires_grad_(learn[0])
    targets = torch.randn(10, 5, generator=g, dtype=dtype).requires_grad_(learn[1])
    lr = torch.tensor(0.3, dtype=dtype).requires_grad_(learn[2])
    plan = matching.plan_steps(10, batch, steps, generator(11), augment_generator=generator(12) if augment else None,
                               resolution=8)
    return matching.Problem(student, layout, theta0, theta_star, images, targets, lr, plan)


@pytest.mark.parametrize("augment", [False, True])
def test_memory_saving_gradients_equal_plain(augment: bool):
    problem = make_problem(augment=augment)
    plain = matching.match_plain(problem)
    saving = memory.match_memory_saving(problem)
    assert torch.allclose(plain.loss, saving.loss, rtol=1e-12)
    for a, b in [(plain.grad_images, saving.grad_images), (plain.grad_targets, saving.grad_targets),
                 (plain.grad_lr, saving.grad_lr)]:
        assert a is not None and b is not None and a.shape == b.shape
        assert a.abs().max() > 0  # a real gradient, not two zeros
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_memory_saving_respects_frozen_leaves():
    problem = make_problem(learn=(True, False, False))
    plain = matching.match_plain(problem)
    saving = memory.match_memory_saving(problem)
    assert saving.grad_targets is None and saving.grad_lr is None and plain.grad_lr is None
    torch.testing.assert_close(plain.grad_images, saving.grad_images, rtol=1e-9, atol=1e-12)


def test_gradients_match_finite_differences():
    """The plain path (and so both) is the true derivative of the matching loss w.r.t. the lr."""
    problem = make_problem(learn=(False, False, True))
    grad = memory.match_memory_saving(problem).grad_lr
    eps = 1e-6

    def loss_at(lr: float) -> float:
        p = make_problem(learn=(False, False, False))
        p.lr = torch.tensor(lr, dtype=torch.float64)
        return float(matching.matching_loss(matching.unroll(p), p.theta0, p.theta_star).detach())

    numeric = (loss_at(0.3 + eps) - loss_at(0.3 - eps)) / (2 * eps)
    assert float(grad) == pytest.approx(numeric, rel=1e-5)


def test_plan_cycles_through_permutations():
    plan = matching.plan_steps(10, 4, 6, generator(0))
    sizes = [len(s.indices) for s in plan]
    assert sizes == [4, 4, 2, 4, 4, 2]
    first, second = torch.cat([s.indices for s in plan[:3]]), torch.cat([s.indices for s in plan[3:]])
    assert sorted(first.tolist()) == list(range(10)) == sorted(second.tolist())
    assert not torch.equal(first, second)


def test_augmentation_is_an_exact_flip_and_shift():
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8)
    params = aug.AugmentParams(flip=torch.tensor([True, False]), shift=torch.tensor([[1, 0], [0, -2]]))
    y = aug.apply(x, params)
    flipped = x[0].flip(-1)
    assert torch.equal(y[0, :, :, 1:], flipped[:, :, :-1])  # moved right by one, zero fill
    assert torch.all(y[0, :, :, 0] == 0)
    assert torch.equal(y[1, :, :-2, :], x[1, :, 2:, :])  # moved up by two
    assert torch.all(y[1, :, -2:, :] == 0)


def test_measured_step_memory_grows_with_batch():
    small = memory.measure_step_bytes(make_problem(batch=2, dtype=torch.float32))
    large = memory.measure_step_bytes(make_problem(batch=8, dtype=torch.float32))
    assert 0 < small < large

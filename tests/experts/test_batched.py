"""K students on stacked parameters follow the same trajectories as K separate ``train_regression`` runs."""

from __future__ import annotations

import pytest
import torch

from mkdt.errors import MkdtError
from mkdt.experts.batched import (BatchedState, StackedSGD, check_batchable, make_forward, stack_flat,
                                  train_students)
from mkdt.models import ModelConfig, build_model
from mkdt.models.functional import ParamLayout, flat_parameters
from mkdt.runtime import generator, seeded
from mkdt.training import RegressionSchedule, train_regression

SCHEDULE = RegressionSchedule(epochs=2, lr=0.1, momentum=0.9, weight_decay=1e-4, batch_size=32)


def student(seed: int, cfg: ModelConfig | None = None, resolution: int = 8, dim: int = 5) -> torch.nn.Module:
    cfg = cfg or ModelConfig(width=8, depth=2, norm="instancenorm", pool="avgpool")
    with seeded(seed):
        return build_model(cfg, in_channels=3, resolution=resolution, head_dim=dim)


def toy_data(n: int = 100, resolution: int = 8, dim: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = generator(123)
    return torch.randn(n, 3, resolution, resolution, generator=g), torch.randn(n, dim, generator=g)


def test_stacked_sgd_is_torch_sgd():
    g = generator(0)
    params = [torch.randn(3, 4, 5, generator=g), torch.randn(3, 7, generator=g)]
    ref = [p.clone().requires_grad_(True) for p in params]
    opt = torch.optim.SGD(ref, lr=0.05, momentum=0.9, weight_decay=1e-3)
    ours = StackedSGD([p.clone() for p in params], lr=0.05, momentum=0.9, weight_decay=1e-3)
    for _ in range(4):
        grads = [torch.randn(p.shape, generator=g) for p in params]
        for p, gr in zip(ref, grads):
            p.grad = gr.clone()
        opt.step()
        ours.step(grads)
    for a, b in zip(ours.params, ref):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=1e-7)


@pytest.mark.parametrize("impl", ["grouped", "vmap"])
@pytest.mark.parametrize("cfg", [ModelConfig(width=8, depth=2, norm="instancenorm", pool="avgpool"),
                                 ModelConfig(width=8, depth=1, norm="groupnorm", pool="maxpool"),
                                 ModelConfig(width=4, depth=1, norm="none", pool="none")])
def test_batched_forward_matches_each_student(impl: str, cfg: ModelConfig):
    models = [student(s, cfg) for s in range(3)]
    layout = ParamLayout.of(models[0])
    params = stack_flat(layout, [flat_parameters(m) for m in models])
    x = torch.randn(3, 6, 3, 8, 8, generator=generator(1))
    forward, used = make_forward(models[0], impl)
    assert used == impl
    out = forward(params, x)
    for k, m in enumerate(models):
        torch.testing.assert_close(out[k], m(x[k]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["grouped", "vmap"])
def test_batched_training_equals_sequential_train_regression(impl: str):
    """The acceptance check: same parameters after 2 epochs (7 steps each, short last batch)."""
    images, targets = toy_data()
    seeds = [11, 12, 13]
    sequential = []
    for s in seeds:
        model = student(s)
        train_regression(model, images, targets, SCHEDULE, generator(s + 100))
        sequential.append(flat_parameters(model))
    module = student(0)
    layout = ParamLayout.of(module)
    state = BatchedState.fresh(layout, [flat_parameters(student(s)) for s in seeds], torch.device("cpu"))
    state = train_students(module, layout, state, images, targets, SCHEDULE,
                           [generator(s + 100) for s in seeds], impl=impl)
    assert state.epoch == 2 and len(state.snapshots) == 3
    for k, ref in enumerate(sequential):
        torch.testing.assert_close(state.snapshots[-1][k], ref, rtol=0, atol=1e-5)
        assert not torch.equal(state.snapshots[1][k], state.snapshots[2][k])


def test_student_alone_equals_student_in_batch():
    images, targets = toy_data()
    module = student(0)
    layout = ParamLayout.of(module)
    seeds = [21, 22, 23, 24]

    def run(which: list[int]) -> torch.Tensor:
        state = BatchedState.fresh(layout, [flat_parameters(student(seeds[i])) for i in which], torch.device("cpu"))
        return train_students(module, layout, state, images, targets, SCHEDULE,
                              [generator(seeds[i] + 1) for i in which]).trajectories()

    together = run([0, 1, 2, 3])
    alone = run([2])
    torch.testing.assert_close(together[2], alone[0], rtol=0, atol=1e-5)


def test_resume_from_epoch_state_is_exact():
    """Stopping after epoch 1 and continuing from the saved state reproduces the uninterrupted run bit for bit."""
    images, targets = toy_data()
    module = student(0)
    layout = ParamLayout.of(module)
    inits = [flat_parameters(student(s)) for s in (1, 2)]
    full = train_students(module, layout, BatchedState.fresh(layout, inits, torch.device("cpu")), images, targets,
                          RegressionSchedule(epochs=3, batch_size=32), [generator(5), generator(6)])
    first = train_students(module, layout, BatchedState.fresh(layout, inits, torch.device("cpu")), images, targets,
                           RegressionSchedule(epochs=1, batch_size=32), [generator(5), generator(6)])
    resumed = BatchedState.fresh(layout, list(first.snapshots[-1]), torch.device("cpu"))
    resumed.epoch, resumed.snapshots, resumed.losses = 1, list(first.snapshots), list(first.losses)
    resumed.momentum = [m.clone() for m in first.momentum]
    resumed = train_students(module, layout, resumed, images, targets, RegressionSchedule(epochs=3, batch_size=32),
                             [generator(5), generator(6)])
    assert torch.equal(resumed.trajectories(), full.trajectories())
    assert resumed.losses == full.losses


def test_batchnorm_students_are_refused():
    bn = student(0, ModelConfig(width=8, depth=1, norm="batchnorm"))
    with pytest.raises(MkdtError, match="BatchNorm"):
        check_batchable(bn)
    with pytest.raises(MkdtError, match="batch_students"):
        make_forward(bn, "auto")


def test_divergence_is_reported():
    images, targets = toy_data()
    module = student(0)
    layout = ParamLayout.of(module)
    state = BatchedState.fresh(layout, [flat_parameters(student(1))], torch.device("cpu"))
    with pytest.raises(MkdtError, match="diverged"):
        train_students(module, layout, state, images, targets * 1e20,
                       RegressionSchedule(epochs=1, lr=10.0, batch_size=32), [generator(0)])

"""Trajectory matching: the unrolled student and the normalised parameter-distance loss.

A student starts at an expert's epoch-t parameters, takes ``syn_steps`` plain SGD steps (no momentum,
no weight decay) with the learned lr on minibatches of the synthetic set, MSE to the learned targets,
and is compared with the expert ``expert_epochs`` later:
    loss = ||theta_N - theta*||^2 / ||theta_0 - theta*||^2.
This module holds the "plain" path (autograd keeps every step's graph, as the authors' code does);
``memory.py`` computes the same gradients keeping one step alive at a time.

The inner objective is chosen once, when a run is set up: :data:`KD` (MSE of the student to the learned
targets, MKDT) or another :class:`InnerObjective` (MTT-SSL's SSL loss of two views of the minibatch,
:class:`mkdt.distill.ssl_inner.SSLInnerStudent`; targets then play no part). Only the plain path takes
other objectives: the memory-saving pass differentiates the KD objective by hand.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from mkdt.distill import augment as aug
from mkdt.models.functional import ParamLayout, functional_forward


@dataclass
class InnerStep:
    """Which synthetic images one inner step uses, and how they are augmented (None = not)."""

    indices: torch.Tensor
    augment: aug.AugmentParams | None = None


class InnerObjective(Protocol):
    """The loss one inner SGD step descends, at parameters ``theta``, on the step's minibatch."""

    def step_loss(self, problem: "Problem", theta: torch.Tensor, step: InnerStep) -> torch.Tensor: ...


class KDObjective:
    """MKDT's inner objective: MSE of the student to the learned targets of the (augmented) minibatch."""

    def step_loss(self, problem: "Problem", theta: torch.Tensor, step: InnerStep) -> torch.Tensor:
        x, y = step_batch(problem.images, problem.targets, step)
        return inner_loss(problem.student, problem.layout, theta, x, y)


KD = KDObjective()


@dataclass
class Problem:
    """Everything one outer iteration differentiates through.

    ``images``/``targets``/``lr`` are the learned leaves (``requires_grad`` set on those being learned);
    ``theta0``/``theta_star`` the expert's start and target parameters (on the student's device).
    """

    student: nn.Module
    layout: ParamLayout
    theta0: torch.Tensor
    theta_star: torch.Tensor
    images: torch.Tensor
    targets: torch.Tensor
    lr: torch.Tensor
    steps: list[InnerStep] = field(default_factory=list)
    objective: InnerObjective = KD

    def wants(self) -> list[torch.Tensor]:
        """The learned leaves gradients are needed for, in the order images, targets, lr."""
        return [t for t in (self.images, self.targets, self.lr) if t.requires_grad]


@dataclass
class MatchResult:
    """The matching loss and the gradients of the learned leaves (``None`` for leaves not learned)."""

    loss: torch.Tensor
    grad_images: torch.Tensor | None = None
    grad_targets: torch.Tensor | None = None
    grad_lr: torch.Tensor | None = None

    def grads(self) -> list[torch.Tensor]:
        return [g for g in (self.grad_images, self.grad_targets, self.grad_lr) if g is not None]

    def finite(self) -> bool:
        return bool(torch.isfinite(self.loss)) and all(bool(torch.isfinite(g).all()) for g in self.grads())


def plan_steps(n: int, batch: int, steps: int, generator: torch.Generator, *, augment_generator:
               torch.Generator | None = None, resolution: int = 0) -> list[InnerStep]:
    """Minibatches for ``steps`` inner steps: cycle through seeded permutations of the ``n`` images.

    As in the authors' loop, a permutation is cut into chunks of ``batch`` (the last may be shorter)
    and a new permutation is drawn when the chunks run out.
    """
    plan: list[InnerStep] = []
    chunks: list[torch.Tensor] = []
    for _ in range(steps):
        if not chunks:
            chunks = list(torch.randperm(n, generator=generator).split(batch))
        idx = chunks.pop(0)
        params = aug.sample_params(len(idx), resolution, augment_generator) if augment_generator else None
        plan.append(InnerStep(idx, params))
    return plan


def step_batch(images: torch.Tensor, targets: torch.Tensor, step: InnerStep) -> tuple[torch.Tensor, torch.Tensor]:
    """The (augmented) minibatch of one inner step, differentiable in ``images`` and ``targets``."""
    idx = step.indices.to(images.device)
    x = images[idx]
    if step.augment is not None:
        x = aug.apply(x, step.augment)
    return x, targets[idx]


def inner_loss(student: nn.Module, layout: ParamLayout, theta: torch.Tensor, x: torch.Tensor,
               y: torch.Tensor) -> torch.Tensor:
    """The student's KD objective on one minibatch: MSE(student(x), y), mean over all entries."""
    return F.mse_loss(functional_forward(student, layout, theta, x), y)


def step_loss(problem: Problem, theta: torch.Tensor, step: InnerStep) -> torch.Tensor:
    """The inner objective of one step (the run's :class:`InnerObjective`)."""
    return problem.objective.step_loss(problem, theta, step)


def matching_loss(theta_n: torch.Tensor, theta0: torch.Tensor, theta_star: torch.Tensor) -> torch.Tensor:
    """||theta_N - theta*||^2 / ||theta_0 - theta*||^2 over all stored parameters (KD head, or for
    MTT-SSL the projector, included)."""
    return (theta_n - theta_star).pow(2).sum() / (theta0 - theta_star).pow(2).sum()


def unroll(problem: Problem) -> torch.Tensor:
    """theta_N with the graph of every step kept (differentiable in images, targets and lr)."""
    theta = problem.theta0.detach().requires_grad_(True)
    for step in problem.steps:
        loss = step_loss(problem, theta, step)
        (grad,) = torch.autograd.grad(loss, theta, create_graph=True)
        theta = theta - problem.lr * grad
    return theta


def rollout(problem: Problem) -> list[torch.Tensor]:
    """theta_0 .. theta_N of the unrolled SGD with no graph kept between steps and none to the learned
    leaves: the forward pass of the memory-saving path, and the held-out validation loss."""
    fixed = dataclasses.replace(problem, images=problem.images.detach(), targets=problem.targets.detach(),
                                lr=problem.lr.detach())
    theta = problem.theta0.detach().clone()
    thetas = [theta]
    for step in problem.steps:
        with torch.enable_grad():
            leaf = theta.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(step_loss(fixed, leaf, step), leaf)
        theta = theta - fixed.lr * grad.detach()
        thetas.append(theta)
    return thetas


def match_plain(problem: Problem) -> MatchResult:
    """Loss and gradients by ordinary reverse-mode through the whole unrolled graph (memory ~ syn_steps)."""
    theta_n = unroll(problem)
    return gradients_of(matching_loss(theta_n, problem.theta0, problem.theta_star), problem)


def gradients_of(loss: torch.Tensor, problem: Problem) -> MatchResult:
    """The loss and, when finite, its gradients w.r.t. the learned leaves (one reverse pass through
    the graph that made it)."""
    wants = problem.wants()
    if not wants or not torch.isfinite(loss):
        return MatchResult(loss.detach())
    grads = iter(torch.autograd.grad(loss, wants, allow_unused=True))
    out = MatchResult(loss.detach())
    if problem.images.requires_grad:
        out.grad_images = _dense(next(grads), problem.images)
    if problem.targets.requires_grad:
        out.grad_targets = _dense(next(grads), problem.targets)
    if problem.lr.requires_grad:
        out.grad_lr = _dense(next(grads), problem.lr)
    return out


def _dense(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Unused leaves (e.g. images no step touched) get a zero gradient instead of ``None``."""
    return torch.zeros_like(like) if grad is None else grad

"""The opt-in fast inner loop (``distill.fast_inner``): the unrolled SGD, matching loss and gradients of
``matching.match_plain`` and ``memory.match_memory_saving``, computed with cheaper operations.

Why each change (issue 20; the reference path stays the default until the speed-up is measured):

- The ConvNet forward is written with tensor ops on a list of parameter tensors instead of
  ``functional_call`` on a flat vector: no module dispatch and no split of the flat vector (nor its
  concatenating backward) per step; the list is flattened once, for the matching loss.
- Candidates the benchmark switches on (``--hand-norm``, ``--channels-last``), off by default: instance
  norm with hand-written first and second derivatives (:class:`InstanceNorm`; GroupNorm's double
  backward, which the unroll differentiates, is ~30% of a width-32 plain iteration's CPU time in torch's
  profiler) and channels-last activations.
- The plain path gathers every step's minibatch (and augments it) with one index: the backward scatters
  once, instead of building one zero tensor of the whole set per step.
- The memory-saving backward differentiates the scalar <g_i, a_{i+1}> (which is also -dL/dlr's term)
  instead of the vector g_i with ``grad_outputs``.
- Optional autocast (``distill.precision``): the student's ops in bf16, parameters, updates and both
  losses in float32.

Students the hand-written forward does not cover (other models, batchnorm, strided convolutions) run
through ``functional_call``; they still get the other changes.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.func import functional_call

from mkdt.distill import augment as aug
from mkdt.distill.matching import InnerStep, MatchResult, Problem, gradients_of, matching_loss
from mkdt.models.convnet import ConvNet
from mkdt.models.functional import ParamLayout

Params = list[torch.Tensor]
Op = Callable[[Params, torch.Tensor], torch.Tensor]


class FastStudent:
    """A student's forward and KD loss on a list of parameter tensors (``layout`` order)."""

    def __init__(self, student: nn.Module, layout: ParamLayout, *, amp_dtype: torch.dtype | None = None,
                 channels_last: bool = False, hand_norm: bool = False):
        self.student, self.layout = student, layout
        self.amp_dtype, self.channels_last = amp_dtype, channels_last
        self.ops = convnet_ops(student, layout, hand_norm=hand_norm)
        self.buffers = dict(student.named_buffers())

    @property
    def hand_written(self) -> bool:
        """Whether the forward is the hand-written one (else ``functional_call``)."""
        return self.ops is not None

    def split(self, flat: torch.Tensor) -> Params:
        return [p.view(s) for p, s in zip(flat.split(self.layout.sizes), self.layout.shapes)]

    @staticmethod
    def join(params: Params) -> torch.Tensor:
        return torch.cat([p.reshape(-1) for p in params])

    def forward(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        if self.ops is None:
            named = dict(zip(self.layout.names, params))
            return functional_call(self.student, (named, self.buffers), (x,))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for op in self.ops:
            x = op(params, x)
        return x

    def loss(self, params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """MSE(student(x), y), mean over all entries (``matching.inner_loss``), the MSE in the targets' dtype
        (float32 under autocast)."""
        with self.autocast(x.device):
            out = self.forward(params, x)
        return F.mse_loss(out.to(y.dtype), y)

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.amp_dtype)


# ----------------------------------------------------------------------------------------------
# the hand-written ConvNet
# ----------------------------------------------------------------------------------------------
class InstanceNorm(torch.autograd.Function):
    """GroupNorm with one channel per group (biased variance, as torch's), its first and second derivatives
    written out.

    Why: the unroll differentiates the student's backward, and torch's GroupNorm double backward is a
    generic composite formula of many full-size passes. Per image and channel, over its L pixels, with xh
    the normalised input, r = 1/std, s = w r, A = mean(gy), B = mean(gy xh):
        dx = s (gy - A - xh B),   dw = sum_n L B,   db = sum_n L A;
    for cotangents u (of dx), p (of dw), q (of db), with U = mean(u), V = mean(u xh), C = mean(u gy),
    D = C - A U - B V and P = p - s V:
        d/dgy = s u + P xh + q - s U,       d/dw = sum_n L r D,
        d/dx  = r [P (gy - A) - s B (u - U) - xh (P B - s B V + s D)]
    (the xh path through the usual normalisation backward, plus the direct path through r = r(x)).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        var, mean = torch.var_mean(x, dim=(2, 3), correction=0, keepdim=True)
        r = torch.rsqrt(var + eps)
        xh = (x - mean) * r
        ctx.save_for_backward(x, weight, xh, r)
        return torch.addcmul(bias.view(1, -1, 1, 1), xh, weight.view(1, -1, 1, 1))

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        x, weight, xh, r = ctx.saved_tensors
        return (*_InstanceNormBackward.apply(gy, x, weight, xh, r), None)


class _InstanceNormBackward(torch.autograd.Function):
    """(dx, dw, db) of :class:`InstanceNorm` as a function of (gy, x, w), with its own backward; x is an
    input only so that the second derivative reaches x's graph (its values are in xh and r)."""

    @staticmethod
    def forward(ctx, gy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, xh: torch.Tensor, r: torch.Tensor):
        pixels = xh.shape[2] * xh.shape[3]
        s = r * weight.view(1, -1, 1, 1)
        a = gy.mean((2, 3), keepdim=True)
        b = (gy * xh).mean((2, 3), keepdim=True)
        dx = torch.addcmul(torch.addcmul(-s * a, gy, s), xh, s * b, value=-1)
        ctx.save_for_backward(gy, xh, r, s, a, b)
        return dx, (b * pixels).sum((0, 2, 3)), (a * pixels).sum((0, 2, 3))

    @staticmethod
    @once_differentiable
    def backward(ctx, u: torch.Tensor, p: torch.Tensor, q: torch.Tensor):
        gy, xh, r, s, a, b = ctx.saved_tensors
        pixels = xh.shape[2] * xh.shape[3]
        p, q = p.view(1, -1, 1, 1), q.view(1, -1, 1, 1)
        u_mean = u.mean((2, 3), keepdim=True)
        v = (u * xh).mean((2, 3), keepdim=True)
        d = (u * gy).mean((2, 3), keepdim=True) - a * u_mean - b * v
        big_p = p - s * v
        grad_gy = torch.addcmul(torch.addcmul(q - s * u_mean, u, s), xh, big_p)
        grad_w = (r * d * pixels).sum((0, 2, 3))
        k_xh = -r * (big_p * b - s * b * v + s * d)
        k_0 = r * (s * b * u_mean - big_p * a)
        grad_x = torch.addcmul(torch.addcmul(torch.addcmul(k_0, gy, r * big_p), u, r * s * b, value=-1), xh, k_xh)
        return grad_gy, grad_x, grad_w, None, None


def convnet_ops(student: nn.Module, layout: ParamLayout, *, hand_norm: bool = False) -> list[Op] | None:
    """The ConvNet's layers as ops on the parameter list, or ``None`` if any layer is not covered;
    instance norm by :class:`InstanceNorm` with ``hand_norm``, else (and other GroupNorms) by torch's kernel."""
    if type(student) is not ConvNet:  # a subclass may change the forward
        return None
    index = {name: i for i, name in enumerate(layout.names)}
    ops: list[Op] = []
    for name, layer in student.body.named_children():
        w, b = index.get(f"body.{name}.weight"), index.get(f"body.{name}.bias")
        if isinstance(layer, nn.Conv2d) and b is not None and _plain_conv(layer):
            padding = layer.padding
            ops.append(lambda p, x, w=w, b=b, padding=padding: F.conv2d(x, p[w], p[b], padding=padding))
        elif isinstance(layer, nn.GroupNorm) and layer.affine:
            groups, eps = layer.num_groups, layer.eps
            if hand_norm and groups == layer.num_channels:
                ops.append(lambda p, x, w=w, b=b, eps=eps: InstanceNorm.apply(x, p[w], p[b], eps))
            else:
                ops.append(lambda p, x, w=w, b=b, groups=groups, eps=eps: F.group_norm(x, groups, p[w], p[b], eps))
        elif isinstance(layer, nn.ReLU):
            ops.append(lambda p, x: F.relu(x))
        elif isinstance(layer, nn.AvgPool2d) and _pool_2x2(layer):
            ops.append(lambda p, x: F.avg_pool2d(x, 2))
        elif isinstance(layer, nn.MaxPool2d) and _pool_2x2(layer) and layer.dilation in (1, (1, 1)):
            ops.append(lambda p, x: F.max_pool2d(x, 2))
        elif not isinstance(layer, nn.Identity):
            return None
    ops.append(lambda p, x: x.flatten(1))
    if student.head is not None:
        w, b = index["head.weight"], index["head.bias"]
        ops.append(lambda p, x, w=w, b=b: F.linear(x, p[w], p[b]))
    return ops


def _plain_conv(layer: nn.Conv2d) -> bool:
    return (layer.stride == (1, 1) and layer.dilation == (1, 1) and layer.groups == 1
            and layer.padding_mode == "zeros" and not isinstance(layer.padding, str))


def _pool_2x2(layer: nn.Module) -> bool:
    two = (2, (2, 2))
    return (layer.kernel_size in two and layer.stride in two and layer.padding in (0, (0, 0))
            and not layer.ceil_mode and getattr(layer, "count_include_pad", True))


# ----------------------------------------------------------------------------------------------
# the two paths
# ----------------------------------------------------------------------------------------------
def match(problem: Problem, fast: FastStudent, *, memory_saving: bool) -> MatchResult:
    """Loss and gradients of ``problem`` (KD objective) by the fast plain or memory-saving path."""
    return match_memory_saving(problem, fast) if memory_saving else match_plain(problem, fast)


def match_plain(problem: Problem, fast: FastStudent) -> MatchResult:
    """``matching.match_plain``: reverse-mode through the whole unrolled graph."""
    xs, ys = gathered_batches(problem.images, problem.targets, problem.steps)
    params = [p.detach().requires_grad_(True) for p in fast.split(problem.theta0.detach())]
    for x, y in zip(xs, ys):
        grads = torch.autograd.grad(fast.loss(params, x, y), params, create_graph=True)
        params = [p - problem.lr * g for p, g in zip(params, grads)]
    loss = matching_loss(fast.join(params), problem.theta0, problem.theta_star)
    return gradients_of(loss, problem)


def gathered_batches(images: torch.Tensor, targets: torch.Tensor, steps: list[InnerStep]
                     ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Every step's (augmented) minibatch of images and targets, taken with one index and split per step.

    Augmenting the concatenation equals augmenting each minibatch: flips and shifts act per image (the
    zero padding the shift uses is wide enough for the largest shift of either)."""
    idx = torch.cat([s.indices for s in steps]).to(images.device)
    sizes = [len(s.indices) for s in steps]
    x = images[idx]
    augments = [s.augment for s in steps]
    if all(a is not None for a in augments):
        x = aug.apply(x, aug.AugmentParams(torch.cat([a.flip for a in augments]),
                                           torch.cat([a.shift for a in augments])))
    elif any(a is not None for a in augments):  # a mixed plan: augment step by step
        x = torch.cat([aug.apply(part, a) if a is not None else part for part, a in zip(x.split(sizes), augments)])
    return x.split(sizes), targets[idx].split(sizes)


def rollout(problem: Problem, fast: FastStudent) -> list[Params]:
    """theta_0 .. theta_N (as parameter lists) with no graph kept: the memory-saving forward."""
    images, targets, lr = problem.images.detach(), problem.targets.detach(), problem.lr.detach()
    theta = fast.split(problem.theta0.detach())
    thetas = [theta]
    for step in problem.steps:
        idx = step.indices.to(images.device)
        x = images[idx] if step.augment is None else aug.apply(images[idx], step.augment)
        with torch.enable_grad():
            leaves = [p.detach().requires_grad_(True) for p in theta]
            grads = torch.autograd.grad(fast.loss(leaves, x, targets[idx]), leaves)
        with torch.no_grad():
            theta = [p - lr * g for p, g in zip(theta, grads)]
        thetas.append(theta)
    return thetas


def match_memory_saving(problem: Problem, fast: FastStudent) -> MatchResult:
    """``memory.match_memory_saving``: one step's double-backward graph alive at a time (see memory.py
    for the adjoint recursion)."""
    thetas: list[Params | None] = list(rollout(problem, fast))
    theta_n = fast.join(thetas.pop())
    loss = matching_loss(theta_n, problem.theta0, problem.theta_star)
    out = MatchResult(loss.detach())
    if not problem.wants() or not torch.isfinite(loss):
        return out
    denom = (problem.theta0 - problem.theta_star).pow(2).sum()
    adjoint = fast.split(2.0 * (theta_n - problem.theta_star) / denom)
    lr = problem.lr.detach()
    need_x, need_y = problem.images.requires_grad, problem.targets.requires_grad
    grad_x = torch.zeros_like(problem.images) if need_x else None
    grad_y = torch.zeros_like(problem.targets) if need_y else None
    grad_lr = torch.zeros_like(problem.lr) if problem.lr.requires_grad else None
    images, targets = problem.images.detach(), problem.targets.detach()
    for i in range(len(problem.steps) - 1, -1, -1):
        step, need_theta = problem.steps[i], i > 0
        idx = step.indices.to(images.device)
        leaves = [p.detach().requires_grad_(True) for p in thetas[i]]
        thetas[i] = None  # free the stored parameters as soon as their step is done
        xb, yb = images[idx].requires_grad_(need_x), targets[idx].requires_grad_(need_y)
        with torch.enable_grad():
            x = xb if step.augment is None else aug.apply(xb, step.augment)
            grads = torch.autograd.grad(fast.loss(leaves, x, yb), leaves, create_graph=True)
            along = sum((g * a).sum() for g, a in zip(grads, adjoint))  # <g_i, a_{i+1}>
            wanted = [(need_theta, leaves), (need_x, [xb]), (need_y, [yb])]
            inputs = [t for flag, ts in wanted if flag for t in ts]
            vjps = list(torch.autograd.grad(along, inputs, allow_unused=True)) if inputs else []
        if grad_lr is not None:
            grad_lr -= along.detach().reshape(grad_lr.shape)
        if need_theta:
            v_theta, vjps = vjps[:len(leaves)], vjps[len(leaves):]
            adjoint = [a if v is None else a - lr * v for a, v in zip(adjoint, v_theta)]
        if need_x:
            v_x = vjps.pop(0)
            if v_x is not None:
                grad_x.index_add_(0, idx, v_x, alpha=-float(lr))
        if need_y:
            v_y = vjps.pop(0)
            if v_y is not None:
                grad_y.index_add_(0, idx, v_y, alpha=-float(lr))
    out.grad_images, out.grad_targets, out.grad_lr = grad_x, grad_y, grad_lr
    return out

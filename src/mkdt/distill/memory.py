"""Exact reverse-mode through the unrolled SGD steps with one step's activations alive at a time.

Forward: run the ``N`` steps without a graph, keeping only each step's parameter vector theta_i (and
the step's minibatch indices / augmentation, already in the plan). Backward: with the adjoint
a_N = dL/dtheta_N, walk the steps in reverse; for step i recompute g_i = grad_theta MSE(theta_i, batch_i)
with ``create_graph`` and take one vector-Jacobian product of g_i with a_{i+1}:
    theta_{i+1} = theta_i - lr * g_i
    dL/dtheta_i  = a_{i+1} - lr * (dg_i/dtheta_i)^T a_{i+1}
    dL/dbatch_i += -lr * (dg_i/dbatch_i)^T a_{i+1}      (images, targets of that minibatch)
    dL/dlr      += -<g_i, a_{i+1}>
Memory: N parameter vectors plus one step's double-backward graph, instead of N graphs; compute:
one extra forward+backward per step. The plain path (``matching.match_plain``) gives the same gradients.
"""

from __future__ import annotations

import os

import torch

from mkdt.distill import augment as aug
from mkdt.distill.matching import InnerStep, MatchResult, Problem, inner_loss, matching_loss, rollout, unroll


def match_memory_saving(problem: Problem) -> MatchResult:
    """Loss and gradients of :class:`Problem`, equal to ``match_plain`` up to float rounding."""
    thetas = rollout(problem)
    theta_n = thetas.pop()
    loss = matching_loss(theta_n, problem.theta0, problem.theta_star)
    out = MatchResult(loss.detach())
    if not problem.wants() or not torch.isfinite(loss):
        return out
    denom = (problem.theta0 - problem.theta_star).pow(2).sum()
    adjoint = 2.0 * (theta_n - problem.theta_star) / denom
    lr = problem.lr.detach()
    need_x, need_y = problem.images.requires_grad, problem.targets.requires_grad
    grad_x = torch.zeros_like(problem.images) if need_x else None
    grad_y = torch.zeros_like(problem.targets) if need_y else None
    grad_lr = torch.zeros_like(problem.lr) if problem.lr.requires_grad else None
    for i in range(len(problem.steps) - 1, -1, -1):
        # dL/dtheta_0 is not needed: skipping it saves one conv-backward per layer in the last recomputation
        g, v_theta, v_x, v_y = _step_vjp(problem, problem.steps[i], thetas[i], adjoint, need_theta=i > 0)
        thetas[i] = None  # free the stored vector as soon as its step is done
        idx = problem.steps[i].indices.to(problem.images.device)
        if grad_lr is not None:
            grad_lr -= (g * adjoint).sum().reshape(grad_lr.shape)
        if grad_x is not None and v_x is not None:
            grad_x.index_add_(0, idx, v_x, alpha=-float(lr))
        if grad_y is not None and v_y is not None:
            grad_y.index_add_(0, idx, v_y, alpha=-float(lr))
        if v_theta is not None:
            adjoint = adjoint - lr * v_theta
    out.grad_images, out.grad_targets, out.grad_lr = grad_x, grad_y, grad_lr
    return out


def _step_vjp(problem: Problem, step: InnerStep, theta_i: torch.Tensor, adjoint: torch.Tensor, *,
              need_theta: bool) -> tuple[torch.Tensor, ...]:
    """Recompute g_i with its graph and return (g_i, and the VJPs of ``adjoint`` through g_i w.r.t.
    theta_i, the step's images and its targets; ``None`` where not needed)."""
    need_x, need_y = problem.images.requires_grad, problem.targets.requires_grad
    idx = step.indices.to(problem.images.device)
    theta = theta_i.detach().requires_grad_(True)
    xb = problem.images.detach()[idx].requires_grad_(need_x)
    yb = problem.targets.detach()[idx].requires_grad_(need_y)
    with torch.enable_grad():
        x = xb if step.augment is None else aug.apply(xb, step.augment)
        loss = inner_loss(problem.student, problem.layout, theta, x, yb)
        g = torch.autograd.grad(loss, theta, create_graph=True)[0]
        wanted = [(need_theta, theta), (need_x, xb), (need_y, yb)]
        inputs = [t for flag, t in wanted if flag]
        vjps = iter(torch.autograd.grad(g, inputs, grad_outputs=adjoint, allow_unused=True) if inputs else ())
    v_theta, v_x, v_y = (next(vjps) if flag else None for flag, _ in wanted)
    return g.detach(), v_theta, v_x, v_y


# ----------------------------------------------------------------------------------------------
# choosing the path
# ----------------------------------------------------------------------------------------------
def measure_step_bytes(problem: Problem) -> int:
    """Bytes autograd keeps alive for ONE unrolled step of the plain path, measured on a real step.

    Counts the distinct tensors saved for backward (including those saved while differentiating
    with ``create_graph``) through ``saved_tensors_hooks``; the plain path keeps ``syn_steps`` of these.
    """
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            seen[key] = t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. wrappers)
            seen[(id(t), 0)] = t.numel() * t.element_size()
        return t

    single = Problem(problem.student, problem.layout, problem.theta0, problem.theta_star, problem.images,
                     problem.targets, problem.lr, problem.steps[:1])
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        theta_n = unroll(single)
        loss = matching_loss(theta_n, single.theta0, single.theta_star)
    del loss, theta_n
    param_bytes = problem.theta0.numel() * problem.theta0.element_size()
    return sum(seen.values()) + 2 * param_bytes


def memory_budget_bytes(device: torch.device, budget_gb: float | None) -> int:
    """The memory the plain path may use: ``budget_gb`` or half of the device's memory."""
    if budget_gb is not None:
        return int(budget_gb * 2**30)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 2
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def estimate_plain_bytes(problem: Problem, syn_steps: int) -> int:
    """Estimated extra memory of the plain path: ``syn_steps`` times the measured one-step cost.

    Checked against peak RSS (benchmarks/distill_speed.py): 7.3 GB estimated vs 7.6 GB measured at the
    paper's width 128, batch 256, syn_steps 10; 0.95 vs ~1.5 GB at width 32, batch 128 (allocator and
    backward temporaries). The default budget, half the machine's memory, leaves room for that gap.
    """
    return syn_steps * measure_step_bytes(problem)

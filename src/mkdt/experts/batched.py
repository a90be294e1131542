"""K students trained at once on stacked parameters: the same mathematics as K separate runs.

Why: an expert is a small network trained with SGD on its own minibatch sequence; K of them side by
side give K independent small convolutions per layer, which a single grouped convolution (or
``torch.func.vmap`` over ``functional_call``) computes in one larger kernel call that uses the cores
better. Nothing else changes: every student keeps its own parameters, its own minibatch order and
its own momentum buffer, and :class:`StackedSGD` applies exactly the update ``torch.optim.SGD``
applies (dampening 0, no Nesterov), so student ``k`` follows the trajectory it would follow alone,
up to float rounding.

Two forward implementations, chosen by ``impl``:

* ``vmap``: ``torch.func.vmap`` over ``torch.func.functional_call`` of the student module. Works for
  any student without buffers (no BatchNorm running statistics).
* ``grouped``: for Sequential bodies of Conv2d / GroupNorm / ReLU / pooling layers plus a linear head
  (the ConvNet student), the K students are folded into the channel dimension: one grouped
  convolution with ``groups=K``, one GroupNorm with ``K * groups`` groups, one batched matmul for the
  head, in channels-last memory on CPU (where grouped convolutions are fastest). This is what vmap
  does for a convolution, written out so that every layer keeps the fast memory layout.

Gradients come from ``torch.autograd`` through the batched forward (the summed loss of the K
students has student ``k``'s gradient in slice ``k`` of every stacked parameter).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from mkdt.errors import MkdtError
from mkdt.models.functional import ParamLayout
from mkdt.training import RegressionSchedule, batch_order

IMPLS = ("auto", "vmap", "grouped")

Params = dict[str, torch.Tensor]
Forward = Callable[[Params, torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------------------------
# checks and stacking
# ----------------------------------------------------------------------------------------------
def check_batchable(module: nn.Module, what: str = "student") -> None:
    """Refuse students with running statistics: vmap cannot update K sets of buffers in one module."""
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())
    buffers = [name for name, _ in module.named_buffers()]
    if has_bn or buffers:
        raise MkdtError(f"batch_students > 1 needs a {what} without BatchNorm or other buffers "
                        f"(found {buffers[:2] or 'BatchNorm'}); use model.norm=instancenorm or batch_students=1")


def stack_flat(layout: ParamLayout, flats: Sequence[torch.Tensor]) -> Params:
    """K flat parameter vectors -> {name: K x shape} (fresh tensors, never views of the inputs)."""
    stacked = torch.stack([f.detach() for f in flats]).clone()
    return {name: t.contiguous() for name, t in layout.unflatten(stacked).items()}


def flatten_stacked(layout: ParamLayout, params: Params) -> torch.Tensor:
    """{name: K x shape} -> K x P copy, in the layout's parameter order."""
    k = next(iter(params.values())).shape[0]
    return torch.cat([params[n].detach().reshape(k, -1) for n in layout.names], dim=1).clone()


# ----------------------------------------------------------------------------------------------
# SGD on stacked tensors
# ----------------------------------------------------------------------------------------------
class StackedSGD:
    """``torch.optim.SGD(lr, momentum, weight_decay)`` (dampening 0, no Nesterov) on stacked tensors.

    Per element the update is independent of the other students, so stacking changes nothing:
    ``d = g + wd * p``; ``buf = d`` on the first step, else ``buf = momentum * buf + d``; ``p -= lr * buf``.
    """

    def __init__(self, params: Sequence[torch.Tensor], lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0):
        if not lr > 0 or momentum < 0 or weight_decay < 0:
            raise MkdtError(f"SGD needs lr > 0, momentum >= 0 and weight_decay >= 0; got lr={lr}, "
                            f"momentum={momentum}, weight_decay={weight_decay}")
        self.params = list(params)
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        self.buffers: list[torch.Tensor | None] = [None] * len(self.params)

    @torch.no_grad()
    def step(self, grads: Sequence[torch.Tensor]) -> None:
        for i, (p, g) in enumerate(zip(self.params, grads)):
            d = g.add(p, alpha=self.weight_decay) if self.weight_decay else g
            if self.momentum:
                buf = self.buffers[i]
                if buf is None:
                    buf = torch.clone(d).detach()
                    self.buffers[i] = buf
                else:
                    buf.mul_(self.momentum).add_(d)
                d = buf
            p.add_(d, alpha=-self.lr)


# ----------------------------------------------------------------------------------------------
# batched forwards
# ----------------------------------------------------------------------------------------------
def vmap_forward(module: nn.Module) -> Forward:
    """``(params {name: K x ...}, x K x B x ...) -> K x B x D`` via vmap over functional_call."""

    def one(params: Params, x: torch.Tensor) -> torch.Tensor:
        return functional_call(module, params, (x,))

    batched = vmap(one)

    def forward(params: Params, x: torch.Tensor) -> torch.Tensor:
        return batched(params, x)

    return forward


_GROUPABLE = (nn.Conv2d, nn.GroupNorm, nn.ReLU, nn.AvgPool2d, nn.MaxPool2d, nn.Identity, nn.Flatten)


def supports_grouped(module: nn.Module) -> bool:
    """True for a ``body`` Sequential of conv/norm/activation/pool layers plus an optional Linear ``head``."""
    body = getattr(module, "body", None)
    head = getattr(module, "head", None)
    if not isinstance(body, nn.Sequential) or not (head is None or isinstance(head, nn.Linear)):
        return False
    own = {n for n, _ in module.named_children()}
    if own - {"body", "head"}:
        return False
    for layer in body:
        if not isinstance(layer, _GROUPABLE):
            return False
        if isinstance(layer, nn.Conv2d) and layer.padding_mode != "zeros":
            return False
        if isinstance(layer, nn.GroupNorm) and not layer.affine:
            return False
    return True


def grouped_forward(module: nn.Module, channels_last: bool = True) -> Forward:
    """The K students folded into channels: one grouped conv / group norm / pool per layer, bmm head."""
    if not supports_grouped(module):
        raise MkdtError(f"{type(module).__name__} is not a conv/norm/pool stack with a linear head; "
                        f"use impl=vmap for this student")
    layers = list(enumerate(module.body))
    has_head = module.head is not None

    def forward(params: Params, x: torch.Tensor) -> torch.Tensor:
        k, b = x.shape[0], x.shape[1]
        # K x B x C x H x W -> B x (K*C) x H x W, physically B x H x W x K x C when channels_last.
        if channels_last:
            h = x.permute(1, 3, 4, 0, 2).contiguous()
            h = h.view(b, h.shape[1], h.shape[2], -1).permute(0, 3, 1, 2)
        else:
            h = x.transpose(0, 1).reshape(b, -1, x.shape[3], x.shape[4])
        for i, layer in layers:
            h = _grouped_layer(layer, f"body.{i}", params, h, k)
        features = h.reshape(b, k, -1).transpose(0, 1)  # K x B x F, each student's C*H*W flatten order
        if not has_head:
            return features
        weight, bias = params["head.weight"], params.get("head.bias")
        out = torch.bmm(features, weight.transpose(1, 2))
        return out + bias.unsqueeze(1) if bias is not None else out

    return forward


def _grouped_layer(layer: nn.Module, prefix: str, params: Params, h: torch.Tensor, k: int) -> torch.Tensor:
    if isinstance(layer, nn.Conv2d):
        w = params[f"{prefix}.weight"]
        bias = params.get(f"{prefix}.bias")
        return F.conv2d(h, w.reshape(-1, *w.shape[2:]), None if bias is None else bias.reshape(-1),
                        layer.stride, layer.padding, layer.dilation, layer.groups * k)
    if isinstance(layer, nn.GroupNorm):
        return F.group_norm(h, layer.num_groups * k, params[f"{prefix}.weight"].reshape(-1),
                            params[f"{prefix}.bias"].reshape(-1), layer.eps)
    if isinstance(layer, nn.ReLU):
        return F.relu(h)
    if isinstance(layer, nn.AvgPool2d):
        return F.avg_pool2d(h, layer.kernel_size, layer.stride, layer.padding, layer.ceil_mode,
                            layer.count_include_pad, layer.divisor_override)
    if isinstance(layer, nn.MaxPool2d):
        return F.max_pool2d(h, layer.kernel_size, layer.stride, layer.padding, layer.dilation, layer.ceil_mode)
    return h  # Identity / Flatten (flattening happens after the body)


def make_forward(module: nn.Module, impl: str = "auto", device: torch.device | None = None) -> tuple[Forward, str]:
    """The batched forward for ``module`` and the name of the implementation used."""
    if impl not in IMPLS:
        raise MkdtError(f"batched impl must be one of {', '.join(IMPLS)}, got '{impl}'")
    check_batchable(module)
    if impl == "auto":
        impl = "grouped" if supports_grouped(module) else "vmap"
    if impl == "grouped":
        cpu = device is None or torch.device(device).type == "cpu"
        return grouped_forward(module, channels_last=cpu), impl
    return vmap_forward(module), impl


# ----------------------------------------------------------------------------------------------
# training loop
# ----------------------------------------------------------------------------------------------
@dataclass
class BatchedState:
    """Where a batch of K students is: completed epochs, parameters, momentum, snapshots, losses.

    ``snapshots[e]`` is the K x P parameters after ``e`` epochs (``snapshots[0]`` = init), so the
    state can be checkpointed after any epoch and resumed exactly (minibatch orders are replayed
    from the students' generators).
    """

    epoch: int
    params: Params
    momentum: list[torch.Tensor] | None
    snapshots: list[torch.Tensor]
    losses: list[list[float]] = field(default_factory=list)  # losses[e-1][k]

    @classmethod
    def fresh(cls, layout: ParamLayout, inits: Sequence[torch.Tensor], device: torch.device) -> "BatchedState":
        params = {n: t.to(device) for n, t in stack_flat(layout, inits).items()}
        return cls(0, params, None, [torch.stack([f.detach().cpu() for f in inits]).clone()])

    @property
    def size(self) -> int:
        return int(self.snapshots[0].shape[0])

    def trajectories(self) -> torch.Tensor:
        """K x (epochs+1) x P copies of every snapshot so far."""
        return torch.stack(self.snapshots, dim=1).clone()


def train_students(
    module: nn.Module,
    layout: ParamLayout,
    state: BatchedState,
    images: torch.Tensor,
    targets: torch.Tensor,
    schedule: RegressionSchedule,
    generators: Sequence[torch.Generator],
    *,
    impl: str = "auto",
    on_epoch_end: Callable[[BatchedState], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> BatchedState:
    """Train K students (state) to ``schedule.epochs`` with MSE; student k draws batches from ``generators[k]``.

    ``images`` (normalised, N x C x H x W) and ``targets`` (N x D) may live on the training device.
    Epochs already in ``state`` are skipped, their minibatch orders replayed so the generators are
    where an uninterrupted run would have them. ``on_epoch_end(state)`` gets the state after every
    epoch (for checkpoints); ``progress(step, steps)`` is called after every step.
    """
    k = state.size
    if len(generators) != k:
        raise MkdtError(f"{len(generators)} generators for {k} students; need one per student")
    device = next(iter(state.params.values())).device
    forward, _ = make_forward(module, impl, device)
    names = list(layout.names)
    opt = StackedSGD([state.params[n] for n in names], schedule.lr, schedule.momentum, schedule.weight_decay)
    if state.momentum is not None:
        opt.buffers = [b.to(device) for b in state.momentum]
    n = len(images)
    for _ in range(state.epoch):  # replay finished epochs' minibatch orders
        for g in generators:
            batch_order(n, schedule.batch_size, g)
    for epoch in range(state.epoch + 1, schedule.epochs + 1):
        orders = [batch_order(n, schedule.batch_size, g) for g in generators]
        totals = torch.zeros(k, dtype=torch.float64)
        for step in range(len(orders[0])):
            idx = torch.stack([o[step] for o in orders]).to(images.device)  # K x B
            x = images[idx].to(device, non_blocking=True)
            y = targets[idx].to(device, non_blocking=True)
            losses = _step(forward, state.params, names, opt, x, y, epoch, schedule.lr)
            totals += losses.double() * idx.shape[1]
            if progress is not None:
                progress(step + 1, len(orders[0]))
        state.epoch = epoch
        state.losses.append((totals / n).tolist())
        state.snapshots.append(flatten_stacked(layout, state.params).cpu())
        state.momentum = [b.detach().clone() if b is not None else torch.zeros_like(state.params[nm])
                          for b, nm in zip(opt.buffers, names)] if schedule.momentum else None
        if on_epoch_end is not None:
            on_epoch_end(state)
    return state


def _step(forward: Forward, params: Params, names: list[str], opt: StackedSGD, x: torch.Tensor,
          y: torch.Tensor, epoch: int, lr: float) -> torch.Tensor:
    """One SGD step of all K students; returns their K minibatch losses (CPU)."""
    live = {n: params[n].detach().requires_grad_(True) for n in names}
    out = forward(live, x)
    losses = (out - y).pow(2).mean(dim=tuple(range(1, out.dim())))
    if not torch.isfinite(losses).all():
        bad = [i for i, v in enumerate(losses.tolist()) if not math.isfinite(v)]
        raise MkdtError(f"training diverged at epoch {epoch} (students {bad} have loss "
                        f"{losses[bad[0]].item()}); lower the lr (currently {lr})")
    grads = torch.autograd.grad(losses.sum(), [live[n] for n in names])
    opt.step(grads)
    return losses.detach().cpu()

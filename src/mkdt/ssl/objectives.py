"""SSL objectives (Barlow Twins, SimCLR) and their projection heads.

Barlow Twins: ``sum_i (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2`` on the cross-correlation ``C`` of
the batch-standardised projections (mean 0, biased variance 1, eps 1e-5 as batch norm), so ``lambda`` is
exactly the off-diagonal weight of the paper's recipe (1/128, the mix-bt value). SimCLR: NT-Xent, the
cross-entropy of each of the 2N normalised projections against the other 2N - 1 at temperature ``t``,
its other view being the positive. Projectors follow the paper's recipe: Barlow Twins
Linear(no bias)-BN-ReLU-Linear to 1024 with a 512 hidden layer (mix-bt's CIFAR head); SimCLR
Linear-BN-ReLU-Linear-BN to 128. tests/ssl/test_objectives.py checks both losses against the formulas
written out element by element.

Why written here rather than taken from lightly: these two losses, the heads and LARS are about a
hundred lines, while lightly pulled pytorch-lightning, hydra-core, omegaconf, aiohttp and more into every
installation (measured in docs/install.md). The modules keep lightly's parameter names (a head's
``layers.<i>``, LARS's ``momentum_buffer``), so checkpoints and SSL experts written with it still load.

Losses are evaluated in float32 even under autocast: the Barlow Twins cross-correlation and the
NT-Xent softmax lose too much precision in bfloat16/float16.

Under torchrun (DDP) both the loss and every batch norm see the *global* batch, so training equals one
process with the whole batch. Standardising each rank's shard with that shard's statistics and
averaging the per-rank cross-correlations (lightly's ``gather_distributed``) would not. Instead
:func:`gather_batch` concatenates the projections of all ranks (gradients flow back) and every rank
evaluates the single-process loss on the whole batch, and every batch norm becomes torch's
``SyncBatchNorm`` on CUDA or :class:`GlobalBatchNorm` on the CPU, which normalise with statistics over
every rank's rows.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from torch import nn

from mkdt.config import require, validate

OBJECTIVES = ("barlow_twins", "simclr")
# (hidden, output) widths of the projector when the config leaves them unset.
DEFAULT_PROJECTOR = {"barlow_twins": (512, 1024), "simclr": (512, 128)}


@dataclass
class ObjectiveConfig:
    """Which SSL loss, its projector widths and its one hyperparameter."""

    name: str = "barlow_twins"
    projector_hidden: int | None = None
    projector_out: int | None = None
    lambda_offdiag: float = 1 / 128
    temperature: float = 0.5
    # Barlow Twins: linear layers of the projector (every one but the last with BN + ReLU); 2 is mix-bt's
    # 512-512-1024 head on a 512-d ResNet-18, 3 gives a narrow backbone the same 512-512-1024 layers
    projector_layers: int = 2

    def check(self) -> None:
        require(self.name in OBJECTIVES, "name", f"one of {', '.join(OBJECTIVES)}", self.name)
        require(self.temperature > 0, "temperature", "positive", self.temperature)
        require(self.lambda_offdiag >= 0, "lambda_offdiag", ">= 0", self.lambda_offdiag)
        require(isinstance(self.projector_layers, int) and self.projector_layers >= 1, "projector_layers",
                "an integer >= 1", self.projector_layers)

    def projector_dims(self) -> tuple[int, int]:
        hidden, out = DEFAULT_PROJECTOR[self.name]
        return self.projector_hidden or hidden, self.projector_out or out


class ProjectionHead(nn.Module):
    """Linear layers, each with optional batch norm and activation; a linear layer followed by batch norm
    has no bias (the norm's shift replaces it). Parameters are ``layers.<i>.*``."""

    def __init__(self, blocks: list[tuple[int, int, bool, bool]]):
        super().__init__()
        layers: list[nn.Module] = []
        for width_in, width_out, batch_norm, relu in blocks:
            layers.append(nn.Linear(width_in, width_out, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(width_out))
            if relu:
                layers.append(nn.ReLU())
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def build_projector(config: ObjectiveConfig, feature_dim: int) -> nn.Module:
    """The projection head that sits between the representation and the loss (discarded afterwards)."""
    validate(config, "objective.")
    hidden, out = config.projector_dims()
    if config.name == "barlow_twins":
        widths = [feature_dim] + [hidden] * (config.projector_layers - 1)
        blocks = [(a, b, True, True) for a, b in zip(widths[:-1], widths[1:])]
        return ProjectionHead([*blocks, (widths[-1], out, False, False)])
    return ProjectionHead([(feature_dim, hidden, True, True), (hidden, out, True, False)])


def standardise(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Each column to mean 0 and (biased) variance 1 over the batch, as a batch norm without parameters."""
    mean = z.mean(dim=0, keepdim=True)
    var = (z - mean).pow(2).mean(dim=0, keepdim=True)
    return (z - mean) * torch.rsqrt(var + eps)


def barlow_twins_loss(z_a: torch.Tensor, z_b: torch.Tensor, lambda_offdiag: float) -> torch.Tensor:
    """``sum_i (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2``, ``C`` the cross-correlation of the standardised views."""
    c = standardise(z_a).T @ standardise(z_b) / z_a.shape[0]
    diagonal = torch.diagonal(c)
    on = (diagonal - 1).pow(2).sum()
    off = c.pow(2).sum() - diagonal.pow(2).sum()
    return on + lambda_offdiag * off


def nt_xent_loss(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent: mean over the 2N projections of ``-log softmax`` of the similarity to the other view among
    the other 2N - 1 (cosine similarities divided by ``temperature``)."""
    n = z_a.shape[0]
    z = F.normalize(torch.cat([z_a, z_b]), dim=1)
    logits = z @ z.T / temperature
    self_pairs = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_pairs, float("-inf"))
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, positives)


class BarlowTwinsLoss(nn.Module):
    def __init__(self, lambda_offdiag: float):
        super().__init__()
        self.lambda_offdiag = lambda_offdiag

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        return barlow_twins_loss(z_a, z_b, self.lambda_offdiag)


class NTXentLoss(nn.Module):
    def __init__(self, temperature: float):
        super().__init__()
        self.temperature = temperature

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        return nt_xent_loss(z_a, z_b, self.temperature)


class SSLLoss(nn.Module):
    """Two-view loss ``loss(z_a, z_b)`` evaluated in float32; with ``global_batch`` (under DDP) on the
    projections of every rank's shard together (see :func:`gather_batch`)."""

    def __init__(self, config: ObjectiveConfig, global_batch: bool = False):
        super().__init__()
        validate(config, "objective.")
        self.name = config.name
        self.global_batch = global_batch
        if config.name == "barlow_twins":
            self.loss: nn.Module = BarlowTwinsLoss(config.lambda_offdiag)
        else:
            self.loss = NTXentLoss(config.temperature)

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        if self.global_batch:
            z_a, z_b = gather_batch(z_a), gather_batch(z_b)
        with torch.autocast(device_type=z_a.device.type, enabled=False):
            return self.loss(z_a.float(), z_b.float())


def build_loss(config: ObjectiveConfig, global_batch: bool = False) -> SSLLoss:
    return SSLLoss(config, global_batch)


# ----------------------------------------------------------------------------------------------
# the global batch under DDP
# ----------------------------------------------------------------------------------------------
def gather_batch(z: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of ``z``, concatenated in rank order, on every rank (needs equal shard sizes).

    Why no loss scaling is needed: every rank evaluates the same global loss ``L``, and the backward of
    ``all_gather`` sums the gradients all ranks computed for a rank's own rows, so each rank's
    parameter gradient is ``W`` times its shard's share of ``dL/dtheta``; DDP's average over the ``W``
    ranks then sums the shares, which is exactly the single-process gradient of ``L``.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return z
    with warnings.catch_warnings():
        # recent torch (2.14 here) marks the autograd collectives deprecated, with no public replacement
        warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated",
                                category=FutureWarning)
        out = torch.cat(dist_nn.all_gather(z))
    if out.requires_grad:
        # torch's gloo backward of all_gather receives into buffers laid out like the incoming gradients;
        # with a transposed gradient (NT-Xent's similarity matmul gives one) the result came back
        # scrambled (measured: SimCLR gradients ~100% off), so hand it a contiguous gradient
        out.register_hook(lambda grad: grad.contiguous())
    return out


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm with training statistics over the global batch (all ranks) for CPU (gloo) training.

    torch's :class:`~torch.nn.SyncBatchNorm` does that on GPUs only (it and DDP refuse CPU modules), so
    here the per-rank counts, means and centred sums of squares are gathered with :func:`gather_batch`
    (one small collective per layer, gradients included) and combined exactly (Chan's parallel
    variance), which keeps float32 precision where ``E[x^2] - E[x]^2`` would not. The state dict keys
    equal ``BatchNorm*d``'s, so checkpoints move freely between world sizes.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized() or dist.get_world_size() == 1:
            return super().forward(x)
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        mean, var, count = _global_moments(xf, shape)
        self._track(mean.detach(), var.detach(), count)
        y = (xf - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.weight is not None:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)

    @torch.no_grad()
    def _track(self, mean: torch.Tensor, var: torch.Tensor, count: float) -> None:
        """Running statistics exactly as ``BatchNorm`` updates them (unbiased variance, momentum or average)."""
        if not self.track_running_stats or self.running_mean is None:
            return
        self.num_batches_tracked.add_(1)
        factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        self.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
        self.running_var.mul_(1 - factor).add_(var * (count / max(count - 1, 1)), alpha=factor)


def _global_moments(x: torch.Tensor, shape: list[int]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Per-channel mean and biased variance over every rank's batch, and the global count."""
    dims = [d for d in range(x.dim()) if d != 1]
    n = x.numel() // x.shape[1]
    mean = x.mean(dims)
    m2 = (x - mean.view(shape)).pow(2).sum(dims)
    local = torch.stack([torch.full_like(mean, n), mean, m2]).unsqueeze(0)
    counts, means, m2s = gather_batch(local).unbind(1)  # each (W, C)
    total = counts.sum(0)
    g_mean = (counts * means).sum(0) / total
    g_m2 = (m2s + counts * (means - g_mean).pow(2)).sum(0)
    return g_mean, g_m2 / total, float(total[0].detach())


def to_global_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` with every ``BatchNorm*d`` computing its statistics over the global batch: torch's
    ``SyncBatchNorm`` (fused kernels) on CUDA, :class:`GlobalBatchNorm` elsewhere. The new layers share
    the old ones' parameters and buffers, so the state dict and an optimiser's tensors stay the same."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _to_global(module)


def _to_global(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        if module.track_running_stats:
            new.running_mean, new.running_var = module.running_mean, module.running_var
            new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, _to_global(child))
    return module

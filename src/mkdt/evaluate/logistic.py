"""L2-regularised multinomial logistic regression fitted with LBFGS in torch (the linear probe's core).

Objective (both protocols), for ``n`` labelled examples, weights ``W`` (classes x features), bias ``b``::

    J(W, b) = (1/n) * sum_i CE(W x_i + b, y_i) + reg * ||W||_F^2        (bias not penalised)

i.e. the mean cross-entropy plus ``reg`` (1e-3 in the paper's evaluation) times the squared Frobenius norm of
the weights, the form "regularisation weight" takes in the linear-probe scripts the paper builds on.
scikit-learn's ``LogisticRegression`` minimises ``C * sum_i CE + 0.5 * ||W||^2`` (intercept not
penalised with lbfgs); multiplying J by ``n / (2 reg)`` gives that form, so the equivalent setting is

    C = 1 / (2 * n * reg).

Why torch: the features of a downstream set are already torch tensors (possibly on the GPU) and the
problem is small (features x classes parameters), so full-batch LBFGS is fast and deterministic
(zero initialisation, no randomness).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mkdt.errors import MkdtError


def sklearn_equivalent_c(n: int, reg: float) -> float:
    """scikit-learn's ``C`` that gives the same minimiser as :func:`fit_logistic` with ``reg``."""
    return 1.0 / (2.0 * n * reg)


@dataclass
class LogisticFit:
    """A fitted linear classifier and how the optimisation ended."""

    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor | None
    std: torch.Tensor | None
    iterations: int
    evaluations: int
    loss: float
    grad_max: float

    @property
    def finite(self) -> bool:
        return bool(torch.isfinite(self.weight).all() and torch.isfinite(self.bias).all())

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.weight.device, self.weight.dtype)
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return x @ self.weight.T + self.bias

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x).argmax(1)


def standardise_stats(x: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and std of the labelled training features (constant features get std 1)."""
    mean = x.mean(0)
    std = x.std(0, unbiased=False)
    return mean, torch.where(std > eps, std, torch.ones_like(std))


def objective(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
              reg: float) -> torch.Tensor:
    """Mean cross-entropy plus ``reg * ||W||^2`` (see the module docstring for the scaling)."""
    return F.cross_entropy(x @ weight.T + bias, y) + reg * weight.pow(2).sum()


def fit_logistic(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    *,
    reg: float = 1e-3,
    max_iter: int = 20,
    line_search: str | None = None,
    standardise: bool = False,
    tolerance_grad: float = 1e-7,
    tolerance_change: float = 1e-9,
    history_size: int = 100,
) -> LogisticFit:
    """Fit W, b by full-batch LBFGS from zeros.

    ``max_iter`` bounds the LBFGS iterations (the authors' protocol stops at 20); with
    ``line_search="strong_wolfe"`` and a large ``max_iter`` it runs until the gradient's largest
    entry is below ``tolerance_grad`` or the loss/step change below ``tolerance_change``.
    """
    if x.dim() != 2 or y.dim() != 1 or len(x) != len(y) or len(x) == 0:
        raise MkdtError(f"probe: need N x D features and N labels (N > 0), got {tuple(x.shape)} and {tuple(y.shape)}")
    if reg < 0:
        raise MkdtError(f"probe: reg must be >= 0, got {reg}")
    if int(y.max()) >= num_classes or int(y.min()) < 0:
        raise MkdtError(f"probe: labels must lie in 0..{num_classes - 1}, got {int(y.min())}..{int(y.max())}")
    x = x.detach().float()
    y = y.detach().long().to(x.device)
    mean = std = None
    if standardise:
        mean, std = standardise_stats(x)
        x = (x - mean) / std
    weight = torch.zeros(num_classes, x.shape[1], device=x.device, requires_grad=True)
    bias = torch.zeros(num_classes, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, max_eval=max_iter * 5 // 4 + 1,
                            tolerance_grad=tolerance_grad, tolerance_change=tolerance_change,
                            history_size=history_size, line_search_fn=line_search)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = objective(x, y, weight, bias, reg)
        loss.backward()
        return loss

    opt.step(closure)
    state = opt.state[weight]
    with torch.no_grad():
        final = objective(x, y, weight, bias, reg)
    weight.grad = None
    bias.grad = None
    with torch.enable_grad():
        w = weight.detach().requires_grad_(True)
        b = bias.detach().requires_grad_(True)
        loss = objective(x, y, w, b, reg)
        gw, gb = torch.autograd.grad(loss, (w, b))
    grad_max = float(torch.cat([gw.flatten(), gb]).abs().max())
    return LogisticFit(weight.detach(), bias.detach(), mean, std, int(state.get("n_iter", 0)),
                       int(state.get("func_evals", 0)), float(final), grad_max)

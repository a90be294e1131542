"""The probe's logistic regression: separable data, and agreement with scikit-learn at C = 1/(2 n reg)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from mkdt.errors import MkdtError
from mkdt.evaluate.logistic import fit_logistic, objective, sklearn_equivalent_c


def separable(n_per_class: int = 40, classes: int = 4, dim: int = 16, noise_seed: int = 0):
    """Gaussian blobs (fixed centres) with means far apart relative to their spread: linearly separable."""
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123)) * 10
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = centres[y] + 0.5 * torch.randn(len(y), dim, generator=torch.Generator().manual_seed(noise_seed))
    return x, y


@pytest.mark.parametrize("protocol", ["paper", "converged"])
def test_separable_features_reach_100_percent(protocol):
    x, y = separable()
    xt, yt = separable(noise_seed=1)  # fresh test points from the same blobs
    if protocol == "paper":
        fit = fit_logistic(x, y, 4, reg=1e-3, max_iter=20)
    else:
        fit = fit_logistic(x, y, 4, reg=1e-3, max_iter=500, line_search="strong_wolfe", standardise=True,
                           tolerance_grad=1e-6)
    assert fit.finite
    assert (fit.predict(x) == y).all()
    assert (fit.predict(xt) == yt).all()


def digits_split(n_train: int = 300):
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, te = order[:n_train], order[n_train:]
    return x[tr], y[tr], x[te], y[te]


@pytest.mark.parametrize("reg", [1e-3, 1e-2])
def test_matches_sklearn_with_equivalent_c(reg):
    """mean CE + reg ||W||^2  ==  (1 / (2 n reg)) * [C sum CE + 0.5 ||W||^2]  with C = 1 / (2 n reg)."""
    xtr, ytr, xte, yte = digits_split()
    fit = fit_logistic(xtr, ytr, 10, reg=reg, max_iter=2000, line_search="strong_wolfe", tolerance_grad=1e-6,
                       tolerance_change=1e-12)
    c = sklearn_equivalent_c(len(xtr), reg)
    assert c == pytest.approx(1.0 / (2 * len(xtr) * reg))
    sk = LogisticRegression(C=c, max_iter=5000, tol=1e-8).fit(xtr.numpy(), ytr.numpy())
    ours = 100.0 * float((fit.predict(xte) == yte).float().mean())
    theirs = 100.0 * sk.score(xte.numpy(), yte.numpy())
    assert abs(ours - theirs) <= 1.0
    # Same minimiser: our objective at sklearn's solution equals our optimum, and the weights agree.
    w_sk = torch.tensor(sk.coef_, dtype=torch.float32)
    b_sk = torch.tensor(sk.intercept_, dtype=torch.float32)
    at_sklearn = float(objective(xtr, ytr, w_sk, b_sk, reg))
    assert fit.loss == pytest.approx(at_sklearn, rel=1e-4, abs=1e-5)
    assert np.abs(fit.weight.numpy() - sk.coef_).max() < 0.05 * np.abs(sk.coef_).max()


def test_wrong_scaling_would_be_detected():
    """C = 1/(n reg) (a factor 2 off) gives a measurably different optimum: the check above has teeth."""
    xtr, ytr, _, _ = digits_split()
    reg = 1e-2
    fit = fit_logistic(xtr, ytr, 10, reg=reg, max_iter=2000, line_search="strong_wolfe", tolerance_grad=1e-6,
                       tolerance_change=1e-12)
    sk = LogisticRegression(C=1.0 / (len(xtr) * reg), max_iter=5000, tol=1e-8).fit(xtr.numpy(), ytr.numpy())
    wrong = float(objective(xtr, ytr, torch.tensor(sk.coef_, dtype=torch.float32),
                            torch.tensor(sk.intercept_, dtype=torch.float32), reg))
    assert wrong > fit.loss * (1 + 1e-3)


def test_paper_protocol_stops_after_its_iterations():
    xtr, ytr, _, _ = digits_split()
    fit = fit_logistic(xtr, ytr, 10, reg=1e-3, max_iter=20)
    assert fit.iterations <= 20
    converged = fit_logistic(xtr, ytr, 10, reg=1e-3, max_iter=2000, line_search="strong_wolfe",
                             tolerance_grad=1e-6, tolerance_change=1e-12)
    assert converged.iterations > 20
    assert converged.loss < fit.loss


def test_bad_inputs_are_errors():
    x, y = separable()
    with pytest.raises(MkdtError, match="labels must lie"):
        fit_logistic(x, y, 3)
    with pytest.raises(MkdtError, match="N x D"):
        fit_logistic(x[:0], y[:0], 4)

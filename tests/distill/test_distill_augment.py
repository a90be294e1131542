"""Differentiable flip + whole-pixel shift of synthetic batches: geometry, gradients, and (when kornia is
installed) the same tensors as kornia's hflip / translate with nearest sampling, which it replaced."""

import pytest
import torch

from mkdt.distill.augment import AugmentParams, apply, sample_params, shift


def test_shift_moves_right_and_down_with_zero_fill():
    x = torch.arange(1, 26, dtype=torch.float32).view(1, 1, 5, 5)
    out = shift(x, torch.tensor([[1, -2]]))
    expected = torch.zeros_like(x)
    expected[0, 0, :3, 1:] = x[0, 0, 2:, :4]
    assert torch.equal(out, expected)
    assert torch.equal(shift(x, torch.zeros(1, 2, dtype=torch.long)), x)


def test_apply_flips_then_shifts_each_image_and_passes_gradients():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 8, 8, generator=g, requires_grad=True)
    shifts = torch.tensor([[1, 0], [0, 0], [-1, 1], [2, 2], [0, -1], [0, 0]])
    params = AugmentParams(torch.tensor([True, False] * 3), shifts)
    out = apply(x, params)
    assert torch.equal(out[1], x[1]) and torch.equal(out[5], x[5].flip(-1) if params.flip[5] else x[5])
    assert torch.equal(out[0, :, :, 1:], x[0].flip(-1)[:, :, :-1]) and (out[0, :, :, 0] == 0).all()
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_same_tensors_as_kornia():
    kornia = pytest.importorskip("kornia.geometry.transform")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 3, 16, 16, generator=g)
    params = sample_params(32, 16, g)
    flip = params.flip.view(-1, 1, 1, 1)
    theirs = kornia.translate(torch.where(flip, kornia.hflip(x), x), params.shift.float(), mode="nearest",
                              padding_mode="zeros", align_corners=True)
    assert torch.equal(apply(x, params), theirs)

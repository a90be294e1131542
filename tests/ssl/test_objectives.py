"""The SSL losses against hand-written formulas, and the projector shapes the paper's recipe asks for."""

import math

import pytest
import torch
from torch import nn

from mkdt.errors import MkdtError
from mkdt.ssl import ObjectiveConfig, build_loss, build_projector


def barlow_twins_by_hand(z_a: torch.Tensor, z_b: torch.Tensor, lam: float) -> torch.Tensor:
    n = z_a.shape[0]

    def standardise(z):
        mean = z.mean(0)
        var = ((z - mean) ** 2).mean(0)  # biased, as batch norm
        return (z - mean) / torch.sqrt(var + 1e-5)

    c = standardise(z_a).T @ standardise(z_b) / n
    on = sum((1 - c[i, i]) ** 2 for i in range(c.shape[0]))
    off = sum(c[i, j] ** 2 for i in range(c.shape[0]) for j in range(c.shape[1]) if i != j)
    return on + lam * off


def nt_xent_by_hand(z_a: torch.Tensor, z_b: torch.Tensor, t: float) -> torch.Tensor:
    z = torch.cat([z_a, z_b])
    z = z / z.norm(dim=1, keepdim=True)
    n2 = z.shape[0]
    half = n2 // 2
    total = 0.0
    for i in range(n2):
        j = (i + half) % n2
        logits = [float(z[i] @ z[k]) / t for k in range(n2) if k != i]
        positive = float(z[i] @ z[j]) / t
        total += -(positive - math.log(sum(math.exp(v) for v in logits)))
    return torch.tensor(total / n2)


def test_barlow_twins_matches_formula():
    g = torch.Generator().manual_seed(0)
    z_a, z_b = torch.randn(24, 10, generator=g), torch.randn(24, 10, generator=g)
    loss = build_loss(ObjectiveConfig(name="barlow_twins", lambda_offdiag=1 / 128))
    assert torch.allclose(loss(z_a, z_b), barlow_twins_by_hand(z_a, z_b, 1 / 128), rtol=1e-5)
    # the off-diagonal weight really is the configured lambda
    heavy = build_loss(ObjectiveConfig(name="barlow_twins", lambda_offdiag=0.5))
    assert torch.allclose(heavy(z_a, z_b), barlow_twins_by_hand(z_a, z_b, 0.5), rtol=1e-5)
    assert not torch.allclose(heavy(z_a, z_b), loss(z_a, z_b))


def test_barlow_twins_is_zero_for_identical_whitened_views():
    # perfectly correlated, decorrelated dimensions: C = I -> loss 0
    z = torch.linalg.qr(torch.randn(64, 8, generator=torch.Generator().manual_seed(1)))[0] * 8.0
    z = z - z.mean(0)
    loss = build_loss(ObjectiveConfig())(z, z)
    assert float(loss) < 1e-3


def test_nt_xent_matches_formula():
    g = torch.Generator().manual_seed(2)
    z_a, z_b = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    for t in (0.5, 0.1):
        loss = build_loss(ObjectiveConfig(name="simclr", temperature=t))
        assert torch.allclose(loss(z_a, z_b), nt_xent_by_hand(z_a, z_b, t).float(), rtol=1e-4)


def test_projectors_follow_reference():
    bt = build_projector(ObjectiveConfig(), feature_dim=512)
    layers = list(bt.modules())
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 512), (512, 1024)]
    assert linears[0].bias is None and linears[1].bias is not None
    assert sum(isinstance(m, nn.BatchNorm1d) for m in layers) == 1
    simclr = build_projector(ObjectiveConfig(name="simclr"), feature_dim=512)
    seq = [m for m in simclr.modules() if isinstance(m, (nn.Linear, nn.BatchNorm1d, nn.ReLU))]
    assert [type(m).__name__ for m in seq] == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert seq[-1].num_features == 128
    wide = build_projector(ObjectiveConfig(projector_out=2048), feature_dim=128)
    assert wide(torch.randn(4, 128)).shape == (4, 2048)
    deep = build_projector(ObjectiveConfig(projector_layers=3), feature_dim=128)
    shapes = [(m.in_features, m.out_features) for m in deep.modules() if isinstance(m, nn.Linear)]
    assert shapes == [(128, 512), (512, 512), (512, 1024)]
    assert sum(isinstance(m, nn.BatchNorm1d) for m in deep.modules()) == 2
    with pytest.raises(MkdtError, match="projector_layers"):
        build_projector(ObjectiveConfig(projector_layers=0), feature_dim=128)


def test_loss_is_float32_and_rejects_bad_config():
    z = torch.randn(8, 6).to(torch.bfloat16)
    assert build_loss(ObjectiveConfig())(z, z).dtype == torch.float32
    with pytest.raises(MkdtError, match="objective.name"):
        build_loss(ObjectiveConfig(name="byol"))
    with pytest.raises(MkdtError, match="temperature"):
        build_loss(ObjectiveConfig(name="simclr", temperature=0))


def test_lars_step_matches_the_formula():
    from mkdt.ssl.train import LARS

    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))  # |w| = 5
    b = torch.nn.Parameter(torch.tensor([1.0]))
    opt = LARS([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}], lr=0.5, momentum=0.9)
    grads = [torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0])]
    velocity, expected_w = torch.zeros(2), w.detach().clone()
    for step, g in enumerate(grads):
        w.grad, b.grad = g.clone(), torch.tensor([2.0])
        scale = 1e-3 * expected_w.norm() / (g.norm() + 0.1 * expected_w.norm() + 1e-8)
        direction = (g + 0.1 * expected_w) * scale
        velocity = direction if step == 0 else 0.9 * velocity + direction
        expected_w = expected_w - 0.5 * velocity
        opt.step()
        assert torch.allclose(w.detach(), expected_w, atol=1e-7)
    assert torch.allclose(b.detach(), torch.tensor([1.0 - 0.5 * 2.0 - 0.5 * (0.9 * 2.0 + 2.0)]))  # plain SGD + momentum
    assert set(opt.state[w]) == {"momentum_buffer"}


def test_same_numbers_and_parameter_names_as_lightly_when_installed():
    lightly_loss = pytest.importorskip("lightly.loss")
    from lightly.models.modules.heads import ProjectionHead as LightlyHead
    from lightly.utils.lars import LARS as LightlyLARS

    from mkdt.ssl.train import LARS

    g = torch.Generator().manual_seed(3)
    z_a, z_b = torch.randn(32, 16, generator=g), torch.randn(32, 16, generator=g)
    ours = build_loss(ObjectiveConfig(lambda_offdiag=1 / 128))(z_a, z_b)
    assert torch.allclose(ours, lightly_loss.BarlowTwinsLoss(lambda_param=1 / 128)(z_a, z_b), rtol=1e-5)
    ours = build_loss(ObjectiveConfig(name="simclr", temperature=0.2))(z_a, z_b)
    assert torch.allclose(ours, lightly_loss.NTXentLoss(temperature=0.2)(z_a, z_b), rtol=1e-5)
    head = LightlyHead([(16, 8, nn.BatchNorm1d(8), nn.ReLU()), (8, 4, None, None)])
    assert set(build_projector(ObjectiveConfig(projector_hidden=8, projector_out=4), 16).state_dict()) == \
        set(head.state_dict())
    params = [torch.nn.Parameter(torch.randn(5, 3, generator=g)) for _ in range(2)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    a, b = LARS([params[0]], lr=0.3, momentum=0.9, weight_decay=1e-4), LightlyLARS([twins[0]], lr=0.3, momentum=0.9,
                                                                                 weight_decay=1e-4)
    for _ in range(3):
        grad = torch.randn(5, 3, generator=g)
        params[0].grad, twins[0].grad = grad.clone(), grad.clone()
        a.step()
        b.step()
    assert torch.allclose(params[0], twins[0], atol=1e-7)

import torch

from mkdt.models import build_model
from mkdt.models.functional import ParamLayout, flat_parameters, functional_forward, load_flat_parameters
from mkdt.runtime import seeded


def _model(seed=0):
    with seeded(seed):
        return build_model("convnet", depth=2, width=8, in_channels=1, resolution=8, head_dim=3)


def test_functional_forward_equals_module_forward():
    model = _model()
    layout = ParamLayout.of(model)
    flat = flat_parameters(model)
    x = torch.randn(5, 1, 8, 8)
    assert layout.numel == sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(functional_forward(model, layout, flat, x), model(x))


def test_flat_parameters_are_copies_and_load_back():
    a, b = _model(0), _model(1)
    flat_a = flat_parameters(a)
    with torch.no_grad():
        next(a.parameters()).add_(1.0)
    assert not torch.equal(flat_parameters(a), flat_a)
    load_flat_parameters(b, flat_a)
    assert torch.equal(flat_parameters(b), flat_a)


def test_gradients_flow_to_flat_vector_and_inputs():
    model = _model()
    layout = ParamLayout.of(model)
    flat = flat_parameters(model).requires_grad_(True)
    x = torch.randn(4, 1, 8, 8, requires_grad=True)
    functional_forward(model, layout, flat, x).sum().backward()
    assert flat.grad is not None and flat.grad.abs().sum() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_layout_json_round_trip_and_mismatch():
    layout = ParamLayout.of(_model())
    assert ParamLayout.from_json(layout.to_json()) == layout
    other = ParamLayout.of(build_model("convnet", depth=2, width=16, in_channels=1, resolution=8, head_dim=3))
    assert "shape" in layout.describe_mismatch(other)
    assert layout.describe_mismatch(layout) == ""


def test_unflatten_supports_batch_dimension():
    layout = ParamLayout.of(_model())
    flat = torch.randn(4, layout.numel)
    parts = layout.unflatten(flat)
    assert all(v.shape[0] == 4 and tuple(v.shape[1:]) == s for v, s in zip(parts.values(), layout.shapes))

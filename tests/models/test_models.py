import pytest
import torch
import torchvision

from mkdt.errors import MkdtError
from mkdt.models import ConvNet, ModelConfig, available_models, build_model, count_parameters


def test_reference_parameter_counts():
    assert count_parameters(build_model("convnet", depth=3, width=128, resolution=32, head_dim=512)) == 1_348_608
    assert count_parameters(build_model("convnet", depth=4, width=128, resolution=64, head_dim=512)) == 1_496_448
    assert count_parameters(build_model("convnet_d4", resolution=64, head_dim=512)) == 1_496_448


def test_convnet_structure_is_instance_norm_as_groupnorm():
    model = ConvNet(depth=3, width=128)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == 3 and all(n.num_groups == n.num_channels == 128 and n.affine for n in norms)
    assert not list(model.buffers())


@pytest.mark.parametrize("name, res, feat", [("convnet", 32, 2048), ("convnet_d4", 64, 2048),
                                             ("resnet10", 32, 512), ("resnet18", 32, 512)])
def test_feature_and_head_shapes(name, res, feat):
    model = build_model(name, resolution=res, head_dim=7)
    x = torch.randn(2, 3, res, res)
    assert model.feature_dim == feat
    assert model.features(x).shape == (2, feat)
    assert model(x).shape == (2, 7)
    assert build_model(name, resolution=res)(x).shape == (2, feat)


def test_resnet_width_and_cifar_stem():
    model = build_model("resnet18", width=16)
    assert model.feature_dim == 128
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    # Same blocks and parameter count as torchvision's resnet18 minus the ImageNet stem and fc.
    tv = torchvision.models.resnet18()
    stem_diff = tv.conv1.weight.numel() - 64 * 3 * 9
    assert count_parameters(build_model("resnet18")) == count_parameters(tv) - stem_diff - 1000 * 512 - 1000


def test_grayscale_and_small_inputs():
    model = build_model(ModelConfig(name="convnet", depth=2, width=8), in_channels=1, resolution=8, head_dim=4)
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 4)


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="convnet", resolution=12), "divisible by 8"),
    (dict(name="convnet", resolution=4), "resolution"),
    (dict(name="resnet18", resolution=4), "at least 8"),
    (dict(name="vgg", resolution=32), "unknown model 'vgg'"),
    (dict(name="convnet", resolution=32, norm="layernorm"), "unknown norm"),
])
def test_bad_model_requests_are_clear(kwargs, message):
    name = kwargs.pop("name")
    res = kwargs.pop("resolution")
    with pytest.raises(MkdtError, match=message):
        build_model(name, resolution=res, **kwargs)


def test_registry_lists_models():
    assert {"convnet", "convnet_d3", "convnet_d4", "resnet10", "resnet18"} <= set(available_models())

"""Importing foreign teacher state dicts: torchvision names, wrapper prefixes, numbered Sequentials."""

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from mkdt.artifacts import read_metadata
from mkdt.cli import main
from mkdt.errors import MkdtError
from mkdt.models import ModelConfig
from mkdt.teacher import import_teacher, load_teacher

RESNET18 = ModelConfig(name="resnet18", width=64, norm="batchnorm")


def cifar_torchvision_resnet18(seed=0, stem=3):
    """torchvision's resnet18 turned into the CIFAR variant (3x3 stride-1 stem, no max-pool)."""
    torch.manual_seed(seed)
    net = torchvision.models.resnet18(num_classes=10)
    if stem == 3:
        net.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    # give batch norm non-trivial statistics so that they are checked too
    net.train()
    with torch.no_grad():
        net(torch.randn(8, 3, 32, 32))
    return net.eval()


def torchvision_features(net, x):
    head, net.fc = net.fc, nn.Identity()
    try:
        with torch.no_grad():
            return net(x)
    finally:
        net.fc = head


@pytest.fixture(scope="module")
def reference():
    net = cifar_torchvision_resnet18()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return net, x, torchvision_features(net, x)


@pytest.fixture(scope="module")
def imagenet_file(tmp_path_factory):
    """An ImageNet-stem torchvision resnet18 (7x7 conv1): does not fit our CIFAR-stem resnet18."""
    path = tmp_path_factory.mktemp("imagenet") / "imagenet.pt"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def features_of(model, x):
    with torch.no_grad():
        return model.features(x)


def test_torchvision_cifar_resnet18_imports(reference, tmp_path):
    net, x, want = reference
    path = tmp_path / "tv.pt"
    torch.save(net.state_dict(), path)  # includes fc.*: dropped
    model, meta = import_teacher(path, RESNET18, dest=tmp_path / "teacher.safetensors", mean=(0.5,) * 3,
                                 std=(0.25,) * 3)
    assert torch.allclose(features_of(model, x), want, atol=1e-5)
    assert meta["feature_dim"] == 512 and meta["source"] == "imported"
    loaded, stored = load_teacher(tmp_path / "teacher.safetensors")
    assert stored["model"] == RESNET18.to_dict() and stored["mean"] == [0.5] * 3
    assert torch.allclose(features_of(loaded, x), want, atol=1e-5)


@pytest.mark.parametrize("layout", ["module.backbone.", "encoder.", "model.", "lightly", "mixbt", "solo"])
def test_wrapped_layouts_import(reference, tmp_path, layout):
    net, x, want = reference
    state = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    if layout == "lightly":  # nn.Sequential(*list(resnet.children())[:-1]) inside a module called backbone
        names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
        index = {n: i for i, n in enumerate(names)}
        state = {f"backbone.{index[k.split('.', 1)[0]]}.{k.split('.', 1)[1]}": v for k, v in state.items()}
        state.update({"projection_head.layers.0.weight": torch.randn(16, 512)})
    elif layout == "mixbt":  # mix-bt: self.f = Sequential(conv1, bn1, relu, layer1..4, avgpool); self.g projector
        index = {"conv1": 0, "bn1": 1, "layer1": 3, "layer2": 4, "layer3": 5, "layer4": 6}
        state = {f"f.{index[k.split('.', 1)[0]]}.{k.split('.', 1)[1]}": v for k, v in state.items()}
        state.update({"g.0.weight": torch.randn(512, 512), "g.3.bias": torch.randn(1024)})
    elif layout == "solo":  # solo-learn: backbone.*, projector.*, classifier.*, momentum_backbone.*
        state = {f"backbone.{k}": v for k, v in state.items()}
        state.update({"projector.0.weight": torch.randn(8, 512), "classifier.weight": torch.randn(10, 512),
                      "momentum_backbone.conv1.weight": torch.randn(64, 3, 3, 3)})
    else:
        state = {layout + k: v for k, v in state.items()}
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    model, _ = import_teacher(path, RESNET18)
    assert torch.allclose(features_of(model, x), want, atol=1e-5)


def test_imagenet_stem_is_a_named_shape_mismatch(imagenet_file, tmp_path):
    with pytest.raises(MkdtError) as err:
        import_teacher(imagenet_file, RESNET18, dest=tmp_path / "teacher.safetensors")
    message = str(err.value)
    assert "conv1.weight [64, 3, 7, 7] vs expected [64, 3, 3, 3]" in message and "\n" not in message
    assert not (tmp_path / "teacher.safetensors").exists()


def test_wrong_architecture_names_missing_and_unexpected_keys(reference, tmp_path):
    net, _, _ = reference
    path = tmp_path / "r18.pt"
    torch.save(net.state_dict(), path)
    with pytest.raises(MkdtError, match=r"unexpected keys: layer1\.1\.conv1\.weight"):
        import_teacher(path, ModelConfig(name="resnet10", width=64))
    partial = {k: v for k, v in net.state_dict().items() if not k.startswith("layer4.1.")}
    torch.save(partial, path)
    with pytest.raises(MkdtError, match=r"missing keys: layer4\.1\.conv1\.weight"):
        import_teacher(path, RESNET18)
    with pytest.raises(MkdtError, match="width"):
        import_teacher(tmp_path / "r18.pt", ModelConfig(name="resnet18", width=32))


def test_cli_import_then_targets(reference, imagenet_file, tmp_path):
    net, _, _ = reference
    path = tmp_path / "tv.pt"
    torch.save(net.state_dict(), path)
    out = tmp_path / "run"
    common = ["--out", str(out), "--device", "cpu", "--set", "data.resolution=32", "--set", "data.channels=3",
              "--set", "data.indices=[0,1,2,3,4,5,6,7]"]
    assert main(["teacher", "--import", str(path), *common]) == 0
    meta = read_metadata(out / "teacher" / "teacher.safetensors")
    assert meta["resolution"] == 32 and meta["data_name"] and meta["imported_from"] == str(path)
    assert main(["targets", *common]) == 0
    assert (out / "targets" / "targets.safetensors").is_file()
    assert main(["teacher", "--import", str(imagenet_file), "--out", str(tmp_path / "run2"), "--device", "cpu"]) == 1


def test_import_checks_the_sha256_beside_the_file(reference, tmp_path):
    from mkdt.teacher.io import write_sha256

    net, _, _ = reference
    path = tmp_path / "asset.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    write_sha256(path)
    import_teacher(path, RESNET18)  # matching checksum: imports
    side = path.with_name(path.name + ".sha256")
    side.write_text("0" * 64 + "  asset.safetensors\n")
    with pytest.raises(MkdtError, match="sha256.*does not match"):
        import_teacher(path, RESNET18, dest=tmp_path / "teacher.safetensors")
    assert not (tmp_path / "teacher.safetensors").exists()

"""Models by name: a user's registered model, torchvision:<name> and timm:<name> as teacher and encoders."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mkdt.cli import main
from mkdt.config import resolve
from mkdt.data import DataConfig
from mkdt.errors import ConfigError, MkdtError
from mkdt.evaluate import PretrainConfig, pretrain
from mkdt.evaluate.features import load_encoder
from mkdt.evaluate.pretraining import PretrainSchedule
from mkdt.formats import SyntheticSet, save_synthetic
from mkdt.models import ModelConfig, build_model, register_model
from mkdt.models.registry import MODELS
from mkdt.ssl import ObjectiveConfig, SSLSchedule
from mkdt.teacher import TeacherConfig, load_teacher, train_teacher


def toy_set(path, channels=1, size=8, n=16, dim=4):
    g = torch.Generator().manual_seed(0)
    save_synthetic(path, SyntheticSet(torch.randn(n, channels, size, size, generator=g),
                                      torch.randn(n, dim, generator=g), (0.3,) * channels, (0.2,) * channels,
                                      lr=0.05, meta={"data_name": "toy"}))
    return path


class Tiny(nn.Module):
    def __init__(self, in_channels, head_dim):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.feature_dim = 6
        self.head = nn.Linear(6, head_dim) if head_dim else None
        self.out_dim = head_dim or 6

    def features(self, x):
        return self.body(x).flatten(1)

    def forward(self, x):
        f = self.features(x)
        return self.head(f) if self.head is not None else f


def test_a_registered_user_model_pretrains_and_loads_back(tmp_path):
    @register_model("user_tiny")
    def build(cfg, in_channels, resolution, head_dim):
        return Tiny(in_channels, head_dim)

    try:
        toy_set(tmp_path / "distill" / "distilled.safetensors")
        assert main(["pretrain", "--out", str(tmp_path), "--device", "cpu", "--set", "model.name=user_tiny",
                     "--set", "schedule.epochs=1"]) == 0
        encoder = load_encoder(tmp_path / "pretrain" / "distilled" / "encoder.safetensors")
        assert isinstance(encoder.model, Tiny) and encoder.model.feature_dim == 6
    finally:
        MODELS.pop("user_tiny", None)


@pytest.mark.parametrize("name, channels, feature_dim", [("torchvision:resnet18", 1, 512),
                                                         ("torchvision:mobilenet_v3_small", 3, 1024)])
def test_torchvision_backbones_take_any_channels_and_lose_their_classifier(name, channels, feature_dim):
    model = build_model(ModelConfig(name=name), in_channels=channels, resolution=32, head_dim=7)
    x = torch.randn(2, channels, 32, 32)
    model.eval()
    assert model.feature_dim == feature_dim and model.features(x).shape == (2, feature_dim)
    assert model(x).shape == (2, 7) and model.out_dim == 7
    plain = build_model(ModelConfig(name=name), in_channels=channels, resolution=32)
    assert plain.head is None and plain.out_dim == feature_dim


def test_model_names_are_checked_with_the_fix():
    resolve(PretrainConfig, overrides=["model.name=torchvision:resnet18"])
    with pytest.raises(ConfigError, match="model.name must be a torchvision classification model name"):
        resolve(PretrainConfig, overrides=["model.name=torchvision:resnet19"])
    with pytest.raises(ConfigError, match="or torchvision:<name>, timm:<name>, or register your own"):
        resolve(PretrainConfig, overrides=["model.name=resnet19"])
    with pytest.raises(MkdtError, match="did you mean 'resnet18'"):
        build_model("torchvision:resnet19")


def test_a_torchvision_teacher_trains_on_digits_and_loads_back(tmp_path):
    data = DataConfig(name="digits", resolution=8, indices=list(range(64)))
    model = ModelConfig(name="torchvision:resnet18")
    result = train_teacher(TeacherConfig(device="cpu", out=str(tmp_path), data=data, monitor=None, model=model,
                                         objective=ObjectiveConfig(projector_hidden=16, projector_out=16),
                                         schedule=SSLSchedule(epochs=1, batch_size=32, warmup_epochs=0)))
    teacher, meta = load_teacher(tmp_path / "teacher" / "teacher.safetensors")
    assert meta["model"]["name"] == "torchvision:resnet18" and meta["feature_dim"] == 512
    assert teacher.features(torch.zeros(2, 1, 8, 8)).shape == (2, 512) and result.status == "ran"


def test_timm_models_when_installed(tmp_path):
    pytest.importorskip("timm")
    model = build_model("timm:resnet18", in_channels=1, resolution=16, head_dim=3)
    assert model.feature_dim == 512 and model(torch.randn(2, 1, 16, 16)).shape == (2, 3)
    toy_set(tmp_path / "distill" / "distilled.safetensors", size=16)
    result = pretrain(PretrainConfig(out=str(tmp_path), device="cpu", model=ModelConfig(name="timm:resnet18"),
                                     schedule=PretrainSchedule(epochs=1)))
    assert result.summary["epochs"] == 1

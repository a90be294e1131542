"""``pretrain`` with ``recipe``: the schedule recorded in a set file (e.g. KRR-ST's own) replaces the config's."""

from __future__ import annotations

import pytest
import torch

from mkdt.training import RegressionSchedule
from mkdt.errors import MkdtError
from mkdt.evaluate import PretrainConfig, pretrain
from mkdt.formats import SyntheticSet, save_synthetic
from mkdt.models import ModelConfig

TINY = ModelConfig(name="convnet", depth=2, width=8)


def set_with_recipes(path, recipes):
    g = torch.Generator().manual_seed(0)
    syn = SyntheticSet(torch.randn(12, 1, 8, 8, generator=g), torch.randn(12, 4, generator=g), (0.3,), (0.2,),
                       lr=None, indices=torch.arange(12), meta={"data_name": "toy", "recipes": recipes})
    save_synthetic(path, syn)
    return path


def test_recorded_recipe_sets_epochs_lr_and_batch(tmp_path):
    src = set_with_recipes(tmp_path / "krr.safetensors",
                           {"krr_st": {"epochs": 3, "lr": 0.05, "momentum": 0.5, "weight_decay": 0.0, "batch_size": 4}})
    base = dict(kind="subset", source=str(src), out=str(tmp_path), model=TINY,
                schedule=RegressionSchedule(epochs=1, lr=None), device="cpu")
    own = pretrain(PretrainConfig(name="own", recipe="krr_st", **base))
    plain = pretrain(PretrainConfig(name="plain", **base))
    assert own.summary["epochs"] == 3 and own.summary["lr"] == pytest.approx(0.05)
    assert plain.summary["epochs"] == 1 and plain.summary["lr"] == pytest.approx(0.1)
    saved = (tmp_path / "pretrain" / "own" / "config.yaml").read_text()
    assert "recipe: krr_st" in saved and "epochs: 1" in saved  # the config as given, recipe named


def test_unknown_recipe_names_the_recorded_ones(tmp_path):
    src = set_with_recipes(tmp_path / "krr.safetensors", {"mkdt": {"epochs": 2}})
    with pytest.raises(MkdtError, match="records no pre-training recipe 'krr_st' \\(recorded: mkdt\\)"):
        pretrain(PretrainConfig(kind="subset", source=str(src), recipe="krr_st", out=str(tmp_path), model=TINY,
                                device="cpu"))
    assert not (tmp_path / "pretrain").exists()
    with pytest.raises(MkdtError, match="recipe must be null unless kind is distilled or subset"):
        pretrain(PretrainConfig(kind="none", recipe="krr_st", out=str(tmp_path), model=TINY, device="cpu"))

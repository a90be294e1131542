"""Registry, DataConfig validation and the order of operations in load_dataset."""

from __future__ import annotations

import pytest
import torch

import mkdt.data as data
from mkdt.data import registry
from mkdt.data.sources.base import Decoded
from mkdt.errors import ConfigError, MkdtError

BUILTINS = {"cifar10", "cifar100", "tinyimagenet", "imagefolder", "idx", "digits", "flowers102", "aircraft",
            "cub200", "dogs"}


def test_public_api_exports():
    for name in ["ImageSet", "DataConfig", "load_dataset", "register_source", "available_sources",
                 "labelled_split", "save_split", "load_split", "normalize", "denormalize"]:
        assert hasattr(data, name), name


def test_available_sources_lists_builtins():
    assert BUILTINS <= set(data.available_sources())
    assert data.available_sources() == sorted(data.available_sources())


def test_unknown_source_lists_available_names():
    with pytest.raises(MkdtError) as err:
        data.load_dataset("cifar11")
    msg = str(err.value)
    assert "cifar11" in msg and "cifar10" in msg and "imagefolder" in msg and "\n" not in msg


@pytest.mark.parametrize("field, value", [("resolution", 0), ("resolution", "big"), ("channels", 2),
                                          ("channels", 4), ("download", "yes"), ("indices", "1,2"),
                                          ("indices", [1.5]), ("split", "")])
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=f"data.{field} must be"):
        data.load_dataset(data.DataConfig(name="digits", **{field: value}))


def test_config_accepts_integral_floats_and_tensor_indices():
    cfg = data.DataConfig(resolution=16.0, indices=torch.tensor([3, 1]))
    assert cfg.resolution == 16 and cfg.indices == [3, 1]


def test_unknown_override_names_the_setting():
    with pytest.raises(MkdtError, match="resolutoin"):
        data.load_dataset("digits", resolutoin=16)


def test_mapping_config_and_overrides():
    ds = data.load_dataset({"name": "digits", "split": "test"}, indices=[0, 1, 2])
    assert ds.name == "digits:test" and len(ds) == 3


def test_order_resize_then_channels_then_subset():
    full = data.load_dataset("digits")
    ds = data.load_dataset(data.DataConfig(name="digits", resolution=16, channels=3, indices=[5, 0, 7]))
    assert ds.images.shape == (3, 3, 16, 16)
    expected = full.resized(16).with_channels(3).subset([5, 0, 7])
    assert torch.equal(ds.images, expected.images) and torch.equal(ds.labels, expected.labels)
    assert ds.mean == full.mean * 3 and ds.std == full.std * 3


def test_indices_out_of_range_is_a_clear_error():
    with pytest.raises(MkdtError, match="out of range"):
        data.load_dataset("digits", split="test", indices=[360])


def test_unknown_split_lists_valid_ones():
    with pytest.raises(MkdtError) as err:
        data.load_dataset("digits", split="validation")
    assert "validation" in str(err.value) and "train" in str(err.value) and "all" in str(err.value)


@pytest.fixture
def scratch_registry(monkeypatch):
    """A copy of the registry that is thrown away after the test."""
    registry.available_sources()  # make sure the built-ins are in the copy
    monkeypatch.setattr(registry, "_SOURCES", dict(registry._SOURCES))


def test_register_function_source(scratch_registry):
    calls = []

    @data.register_source("Toy")
    def toy(cfg, split):
        calls.append(split)
        value = 0 if split == "train" else 255
        return Decoded(torch.full((4, 1, 2, 2), value, dtype=torch.uint8), torch.tensor([0, 1, 0, 1]), ["a", "b"])

    assert "toy" in data.available_sources()
    ds = data.load_dataset("toy", split="eval")
    assert ds.name == "toy:eval" and ds.images.float().mean() == 255
    # statistics come from the train split (all zeros), not from the split loaded
    assert ds.mean == pytest.approx((0.0,)) and calls == ["eval", "train"]


def test_register_conflicting_name_is_refused(scratch_registry):
    with pytest.raises(ValueError, match="digits"):
        @data.register_source("digits")
        def other(cfg, split):  # pragma: no cover - never called
            raise AssertionError


def test_register_rejects_non_callables(scratch_registry):
    with pytest.raises(TypeError):
        data.register_source("thing")(42)

import dataclasses

import pytest

from mkdt.config import (StageConfig, describe, dump_yaml, field_docs, from_dict, parse_override, require, resolve,
                         to_dict)
from mkdt.data import DataConfig
from mkdt.errors import ConfigError, MkdtError
from mkdt.models import ModelConfig


@dataclasses.dataclass
class ToyConfig(StageConfig):
    """A config for the tests."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    epochs: int = 3  # passes over the data
    # the learning rate,
    # positive
    lr: float = 0.1
    fractions: list[float] = dataclasses.field(default_factory=lambda: [1.0, 5.0])
    flag: bool = False
    init: str | None = None

    def check(self) -> None:
        require(self.lr > 0, "lr", "positive", self.lr)


def test_defaults_then_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 5\nmodel:\n  width: 32\ntoy:\n  lr: 0.5\nother_stage:\n  x: 1\n")
    cfg = resolve(ToyConfig, section="toy", files=[path], overrides=["epochs=7", "data.name=cifar10",
                                                                      "toy.flag=true", "fractions=1,5,10"])
    assert cfg.epochs == 7 and cfg.lr == 0.5 and cfg.model.width == 32 and cfg.model.depth == 3
    assert cfg.data.name == "cifar10" and cfg.flag is True and cfg.fractions == [1.0, 5.0, 10.0]


def test_values_from_cli_flags_win_over_files(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 3\nout: a\n")
    cfg = resolve(ToyConfig, files=[path], values={"seed": 9, "out": None})
    assert cfg.seed == 9 and cfg.out == "a"


@pytest.mark.parametrize("override, message", [
    ("epoch=3", "unknown config key 'toy.epoch' \\(did you mean 'epochs'\\?\\)"),
    ("model.widht=3", "unknown config key 'toy.model.widht' \\(did you mean 'width'\\?\\)"),
    ("epochs=abc", "epochs must be an integer, got 'abc'"),
    ("flag=maybe", "flag must be true or false"),
    ("noequals", "key=value"),
    ("lr=-1", "toy.lr must be positive, got -1.0"),
    ("data.channels=2", "toy.data.channels must be"),
])
def test_bad_overrides_name_the_key_as_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        resolve(ToyConfig, section="toy", overrides=[override])


def test_round_trip_through_yaml():
    cfg = ToyConfig(epochs=11, init="high_loss")
    import yaml

    again = from_dict(ToyConfig, yaml.safe_load(dump_yaml(cfg)))
    assert again == cfg
    assert to_dict(again)["model"]["name"] == "convnet"


def test_parse_override_types():
    assert parse_override("a.b=1e-3") == ("a.b", 1e-3)
    assert parse_override("x=null") == ("x", None)
    assert parse_override("p=/tmp/a b") == ("p", "/tmp/a b")


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(MkdtError, match="bad.yaml"):
        resolve(ToyConfig, files=[bad])
    with pytest.raises(MkdtError, match="missing.yaml"):
        resolve(ToyConfig, files=[tmp_path / "missing.yaml"])


def test_unknown_preset_lists_available():
    with pytest.raises(MkdtError, match="unknown preset 'nope'"):
        resolve(ToyConfig, preset="nope", section="toy")


def test_settings_are_documented_from_their_comments():
    docs = field_docs(ToyConfig)
    assert docs["epochs"] == "passes over the data"
    assert docs["lr"] == "the learning rate, positive"
    assert docs["seed"].startswith("the one seed")  # inherited from StageConfig
    rows = {key: (tp, default, text) for key, tp, default, text in describe(ToyConfig)}
    assert rows["epochs"] == ("int", 3, "passes over the data")
    assert rows["data.name"][:2] == ("str", "digits") and rows["model.width"][0] == "int"


def test_out_at_a_file_and_bad_device_are_refused(tmp_path):
    afile = tmp_path / "f.txt"
    afile.write_text("x")
    with pytest.raises(ConfigError, match="out must be a folder"):
        resolve(ToyConfig, values={"out": str(afile)})
    with pytest.raises(ConfigError, match="device must be auto, cpu, cuda or cuda:N"):
        resolve(ToyConfig, values={"device": "gpu"})


def test_a_partial_nested_section_changes_only_what_it_names():
    """A mapping for a nested config updates the field's default (what --help shows), not the class defaults."""
    from mkdt.evaluate import PretrainConfig
    from mkdt.teacher import TeacherConfig

    teacher = resolve(TeacherConfig, values={"model": {"width": 32}})
    assert (teacher.model.name, teacher.model.width, teacher.model.norm) == ("resnet18", 32, "batchnorm")
    pre = resolve(PretrainConfig, values={"schedule": {"epochs": 3}})
    assert pre.schedule.epochs == 3 and pre.schedule.lr is None  # still the set's learned lr

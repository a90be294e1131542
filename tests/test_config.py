import dataclasses

import pytest

from mkdt.config import StageConfig, dump_yaml, from_dict, parse_override, resolve, to_dict
from mkdt.data import DataConfig
from mkdt.errors import MkdtError
from mkdt.models import ModelConfig


@dataclasses.dataclass
class ToyConfig(StageConfig):
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    epochs: int = 3
    lr: float = 0.1
    fractions: list[float] = dataclasses.field(default_factory=lambda: [1.0, 5.0])
    flag: bool = False
    init: str | None = None


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
    ("epoch=3", "unknown config key 'epoch'"),
    ("model.widht=3", "unknown config key 'model.widht'"),
    ("epochs=abc", "'epochs' must be an integer"),
    ("flag=maybe", "'flag' must be true/false"),
    ("noequals", "key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(MkdtError, match=message):
        resolve(ToyConfig, overrides=[override])


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

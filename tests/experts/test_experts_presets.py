"""Presets resolve to the paper / CPU settings, and `mkdt experts` / `mkdt init` run end to end."""

from __future__ import annotations

import pytest

from mkdt.cli import main
from mkdt.config import resolve
from mkdt.experts import ExpertsConfig, InitConfig
from mkdt.formats import load_synthetic, load_trajectory

PRESETS = ["cifar10-2pct", "cifar100-2pct", "tinyimagenet-2pct", "cifar10-5pct", "cifar10-cpu"]


@pytest.mark.parametrize("name", PRESETS)
def test_presets_resolve(name):
    experts = resolve(ExpertsConfig, preset=name, section="experts")
    init = resolve(InitConfig, preset=name, section="init")
    # keep_epochs = max_start_epoch + expert_epochs of the distill preset: 2 + 2 (2%), 5 + 2 (5%), 1 + 1 (cpu)
    paper = name.endswith("pct")
    assert experts.keep_epochs == {"2pct": 4, "5pct": 7, "cpu": 1}[name.split("-")[-1]]
    assert experts.schedule.epochs == 20
    s = experts.schedule
    assert (s.lr, s.momentum, s.weight_decay, s.batch_size) == (0.1, 0.9, 1e-4, 256)
    assert experts.model.norm == "instancenorm" and experts.model.pool == "avgpool"
    assert init.model == experts.model and init.data == experts.data and init.epoch == 1
    assert init.size == (0.05 if name.endswith("5pct") else 0.02)
    if paper:
        assert experts.num_experts == 100 and experts.model.width == 128
        assert experts.model.depth == (4 if name.startswith("tiny") else 3)
    else:
        assert experts.model.width == 32 and experts.model.depth == 3
        assert experts.num_experts == 32 and init.num_experts == 8
        # the whole-run presets/cifar10-cpu.yaml gives every cifar10-cpu stage the same data root
        assert experts.data.root == "../shared/data/cifar10-jpeg.tar.gz"
        assert experts.data.name == "imagefolder"


def test_cli_experts_then_init_on_digits(capsys, cli_run):
    out = cli_run
    common = ["--out", str(out), "--device", "cpu", "--set", "data.name=digits", "--set", "data.resolution=8",
              "--set", "model.width=8", "--set", "model.depth=1"]
    assert main(["experts", *common, "--set", "num_experts=2", "--set", "schedule.epochs=1",
                 "--set", "schedule.batch_size=256"]) == 0
    assert load_trajectory(out / "experts" / "expert_0001.safetensors").epochs == [0, 1]
    assert main(["init", *common, "--set", "size=10"]) == 0
    assert len(load_synthetic(out / "init" / "high_loss.safetensors")) == 10
    assert '"count": 10' in capsys.readouterr().out


def test_cli_reports_one_line_errors(capsys, cli_run):
    out = cli_run
    code = main(["init", "--out", str(out), "--device", "cpu", "--set", "data.name=digits",
                 "--set", "data.resolution=8"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "mkdt experts" in err

"""Experiment loggers: the setting, CSV and TensorBoard files of a tiny pre-training run read back, W&B
calls through a stand-in module, and logging settings that change no stage's identity."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types

import pytest
import torch

from mkdt import metrics
from mkdt.cli import main
from mkdt.errors import ConfigError
from mkdt.evaluate import PretrainConfig, pretrain
from mkdt.formats import SyntheticSet, save_synthetic
from mkdt.metrics import Metrics, parse_loggers, read_csv
from mkdt.models import ModelConfig
from mkdt.progress import Progress
from mkdt.training import RegressionSchedule

TINY = ModelConfig(name="convnet", depth=1, width=4)


def toy_run(tmp_path, epochs=3):
    g = torch.Generator().manual_seed(0)
    syn = SyntheticSet(torch.randn(16, 1, 8, 8, generator=g), torch.randn(16, 4, generator=g), (0.3,), (0.2,),
                       lr=0.05, meta={"data_name": "toy"})
    save_synthetic(tmp_path / "distill" / "distilled.safetensors", syn)
    return PretrainConfig(kind="distilled", out=str(tmp_path), model=TINY, device="cpu",
                          schedule=RegressionSchedule(epochs=epochs, batch_size=8))


def test_the_setting_parses_and_refuses_unknown_or_missing_loggers(monkeypatch):
    assert parse_loggers(None) == ("csv",)
    assert parse_loggers("none") == () and parse_loggers("") == ()
    assert parse_loggers(" CSV , csv") == ("csv",)
    with pytest.raises(ConfigError, match="unknown logger 'tensorbord' \\(did you mean 'tensorboard'\\?\\)"):
        parse_loggers("csv,tensorbord")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match="needs the wandb package.*pip install wandb"):
        parse_loggers("wandb")
    monkeypatch.setenv(metrics.ENV_LOG, "bogus")
    with pytest.raises(ConfigError, match="MKDT_LOG: unknown logger 'bogus'"):
        metrics.configured_loggers()


def test_cli_refuses_a_bad_logger_with_one_line_and_exit_2(tmp_path, capsys):
    assert main(["pretrain", "--out", str(tmp_path / "r"), "--log", "csv,nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--log: unknown logger 'nope'" in err
    assert not (tmp_path / "r").exists()


def test_csv_of_a_pretraining_run_and_a_logger_change_redoes_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv(metrics.ENV_LOG, raising=False)
    config = toy_run(tmp_path)
    result = pretrain(config)
    rows = read_csv(tmp_path / "pretrain" / "distilled" / "metrics.csv")
    losses = [r for r in rows if r["name"] == "loss"]
    assert [r["step"] for r in losses] == [1, 2, 3] and {r["series"] for r in losses} == {"pretrain distilled"}
    assert [r["value"] for r in losses] == pytest.approx(result.summary["losses"])
    monkeypatch.setenv(metrics.ENV_LOG, "none")  # a runtime setting: the finished stage is reused
    assert pretrain(config).status == "reused"


def test_no_logger_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv(metrics.ENV_LOG, "none")
    pretrain(toy_run(tmp_path, epochs=1))
    folder = tmp_path / "pretrain" / "distilled"
    assert not (folder / "metrics.csv").exists() and not (folder / "tensorboard").exists()


def test_tensorboard_events_read_back(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv(metrics.ENV_LOG, "csv,tensorboard")
    result = pretrain(toy_run(tmp_path))
    folder = tmp_path / "pretrain" / "distilled" / "tensorboard"
    events = EventAccumulator(str(folder))
    events.Reload()
    assert "pretrain_distilled/loss" in events.Tags()["scalars"]
    scalars = events.Scalars("pretrain_distilled/loss")
    assert [s.step for s in scalars] == [1, 2, 3]
    assert [s.value for s in scalars] == pytest.approx(result.summary["losses"], rel=1e-6)


def test_progress_forwards_only_numbers_and_only_inside_a_stage(tmp_path):
    with Progress(3, "loop x", heartbeat=0) as bar:  # outside a stage: nothing to log to, no error
        bar.update(1, loss=1.0)
    with metrics.activate(Metrics(tmp_path, ("csv",))):
        with Progress(3, "loop x", heartbeat=0) as bar:
            bar.update(1, loss=torch.tensor(0.5), note="text", vector=torch.ones(3), lr=None)
            bar.set(val=0.25)
            bar.record(knn=0.75)
    rows = read_csv(tmp_path / "metrics.csv")
    assert [(r["series"], r["step"], r["name"], r["value"]) for r in rows] == [
        ("loop x", 1, "loss", 0.5), ("loop x", 1, "val", 0.25), ("loop x", 1, "knn", 0.75)]


def test_a_torn_last_line_is_cut_when_the_csv_is_continued(tmp_path):
    with Metrics(tmp_path) as m:
        m.log("s", 1, loss=1.0)
    path = tmp_path / "metrics.csv"
    with Metrics(tmp_path / "names") as m:  # fields may be called step or series too
        m.log("s", 1, step=5, series=2.0)
    assert [(r["name"], r["value"]) for r in read_csv(tmp_path / "names" / "metrics.csv")] == [("step", 5.0),
                                                                                              ("series", 2.0)]
    path.write_text(path.read_text() + "123.0,s,2,lo")  # a kill in the middle of a row
    with Metrics(tmp_path) as m:
        m.log("s", 2, loss=2.0)
    assert [(r["step"], r["value"]) for r in read_csv(path)] == [(1, 1.0), (2, 2.0)]


def test_wandb_gets_one_offline_run_with_a_step_axis_per_series(tmp_path, monkeypatch):
    calls: list[tuple] = []

    class FakeRun:
        def define_metric(self, name, step_metric=None):
            calls.append(("define", name, step_metric))

        def log(self, values):
            calls.append(("log", values))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kw: calls.append(("init", kw)) or FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert parse_loggers("wandb") == ("wandb",)
    with Metrics(tmp_path, ("wandb",), name="run/pretrain", config={"seed": 0}) as m:
        m.log("pretrain x", 1, loss=0.5)
        m.log("pretrain x", 2, loss=0.25)
    init = calls[0][1]
    assert init["mode"] == "offline" and init["name"] == "run/pretrain" and init["config"] == {"seed": 0}
    assert ("define", "pretrain_x/*", "pretrain_x/step") in calls
    assert ("log", {"pretrain_x/step": 2, "pretrain_x/loss": 0.25}) in calls and calls[-1] == ("finish",)

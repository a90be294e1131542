"""Run documents with stage presets and per-step sections; the baselines sas / krr_st / full and MKDT from a
random init wired through ``mkdt run`` on tiny digits."""

import json

import pytest
import torch

from mkdt.errors import MkdtError
from mkdt.pipeline import METHODS, load_run_document, plan, run_pipeline, step_config
from test_pipeline import tiny_document


def step_named(doc, name):
    return next(s for s in plan(doc)[2] if s.name == name)


def test_cifar10_cpu_run_preset_reads_each_stage_preset_and_plans_every_method():
    doc = load_run_document("cifar10-cpu", [], [], {"out": "runs/x"})
    settings, _out, steps = plan(doc)
    assert settings.methods == list(METHODS[:8])
    assert settings.eval_seeds == [0, 1, 2] and settings.processes == 2
    assert "mtt_ssl" in METHODS and "krr_st_own_recipe" in METHODS  # optional extras
    names = [s.name for s in steps]
    for method in settings.methods:
        for seed in settings.eval_seeds:
            assert f"pretrain/{method}_seed{seed}" in names and f"probe/{method}_seed{seed}" in names
    experts = step_config(step_named(doc, "experts"), doc, resolve_files=False)
    assert experts.num_experts == 32 and experts.model.width == 32  # from presets/experts/cifar10-cpu.yaml
    teacher = step_config(step_named(doc, "teacher"), doc, resolve_files=False)
    assert teacher.model.name == "resnet18" and teacher.model.width == 16
    full = step_config(step_named(doc, "pretrain/full_seed0"), doc, resolve_files=False)
    random = step_config(step_named(doc, "pretrain/random_seed1"), doc, resolve_files=False)
    # the pretrain/full section applies to that method's steps (every evaluation seed) only
    assert full.epochs == 5 and random.epochs == 20
    assert step_config(step_named(doc, "pretrain/full_seed2"), doc, resolve_files=False).epochs == 5
    probe = step_config(step_named(doc, "probe/mkdt_seed2"), doc, resolve_files=False)
    assert [d.name for d in probe.downstream] == ["imagefolder", "idx", "digits"]
    assert probe.percents == [1.0, 5.0] and probe.seeds == [2]  # one probe seed per pre-trained encoder


def test_bad_preset_key_and_step_section_are_named():
    doc = {"preset": ["cifar10-cpu"], "run": {"methods": ["none"]}}
    with pytest.raises(MkdtError, match="'preset' must be a preset name"):
        step_config(step_named(doc, "teacher"), doc)
    doc = {"run": {"methods": ["none"]}, "pretrain/none": 3}
    with pytest.raises(MkdtError, match="'pretrain/none' must be a mapping"):
        step_config(step_named(doc, "pretrain/none"), doc)


@pytest.fixture(scope="module")
def baselines_run(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("pipeline-methods") / "run"
    doc = tiny_document(out)
    doc["run"]["methods"] = ["sas", "krr_st", "krr_st_own_recipe", "mkdt_random_init", "full"]
    doc["subset"] = {"size": 20, "clusters": 4}
    doc["krr_st"] = {"size": 20, "widths": [8], "pool_size": 2, "max_online_steps": 3, "iterations": 3,
                     "real_batch": 64, "online_batch_size": 10, "checkpoint_every": 2, "log_every": 1,
                     "krr_recipe": {"epochs": 3, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 8}}
    doc["pretrain/full"] = {"epochs": 1}
    return out, doc, run_pipeline(doc, log=lambda _line: None)


def test_baseline_methods_run_end_to_end(baselines_run):
    out, doc, state = baselines_run
    assert all(state["steps"][s.name]["finished"] for s in plan(doc)[2])
    for method in ("sas", "krr_st", "krr_st_own_recipe", "mkdt_random_init", "full"):
        results = json.loads((out / "probe" / method / "results.json").read_text())
        cell = results["summary"]["digits"]["converged"]["10"]
        assert 0.0 <= cell["mean"] <= 100.0
    assert state["steps"]["pretrain/full"]["summary"]["epochs"] == 1
    own = state["steps"]["pretrain/krr_st_own_recipe"]["summary"]
    assert own["epochs"] == 3 and own["lr"] == pytest.approx(0.05)  # KRR-ST's recorded recipe
    assert state["steps"]["pretrain/krr_st"]["summary"]["epochs"] == 2  # MKDT's recipe (the pretrain section)
    assert (out / "mkdt_random_init" / "distill" / "stage.json").is_file()
    encoder_meta = json.loads((out / "probe" / "mkdt_random_init" / "results.json").read_text())["encoder_meta"]
    assert encoder_meta["kind"] == "distilled"

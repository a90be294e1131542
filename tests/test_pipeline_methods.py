"""Run documents with stage presets and per-step sections; the baselines sas / krr_st / full and MKDT from a
random init wired through ``mkdt run`` on tiny digits."""

import json

import pytest
import torch

from mkdt.errors import ConfigError
from mkdt.pipeline import load_run_document, plan, run_pipeline
from test_pipeline import tiny_document


def step_named(run, name):
    return next(s for s in run.steps if s.name == name).config


def test_cifar10_cpu_run_preset_reads_each_stage_preset_and_plans_every_method():
    doc = load_run_document("cifar10-cpu", [], [], {"out": "runs/x"})
    run = plan(doc)
    settings = run.settings
    assert settings.methods == ["none", "random", "high_loss", "sas", "krr_st", "mkdt_random_init", "mkdt",
                                "balanced_lowres", "full"]
    assert settings.eval_seeds == [0, 1, 2] and settings.processes == 2
    names = [s.name for s in run.steps]
    for method in settings.methods:
        for seed in settings.eval_seeds:
            assert f"pretrain/{method}_seed{seed}" in names and f"probe/{method}_seed{seed}" in names
    experts = step_named(run, "experts")
    assert experts.num_experts == 32 and experts.model.width == 32  # from presets/experts/cifar10-cpu.yaml
    teacher = step_named(run, "teacher")
    assert teacher.model.name == "resnet18" and teacher.model.width == 16
    # the pretrain/full section applies to that method's steps (every evaluation seed) only
    assert step_named(run, "pretrain/full_seed0").schedule.epochs == 5
    assert step_named(run, "pretrain/random_seed1").schedule.epochs == 20
    assert step_named(run, "pretrain/full_seed2").schedule.epochs == 5
    probe = step_named(run, "probe/mkdt_seed2")
    assert [d.name for d in probe.downstream] == ["imagefolder", "idx", "digits"]
    assert probe.percents == [1.0, 5.0] and probe.seeds == [2]  # one probe seed per pre-trained encoder
    assert step_named(run, "distill").trajectories == 2  # what the two-process benchmark matched, in one key


def test_bad_preset_key_and_step_section_are_named():
    with pytest.raises(ConfigError, match="preset must be a preset name"):
        plan({"preset": ["cifar10-cpu"], "run": {"methods": ["none"]}})
    with pytest.raises(ConfigError, match="'pretrain/none' must be a mapping"):
        plan({"run": {"methods": ["none"]}, "pretrain/none": 3})


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
    doc["pretrain/full"] = {"schedule": {"epochs": 1}}
    return out, doc, run_pipeline(doc)


def test_baseline_methods_run_end_to_end(baselines_run):
    out, doc, state = baselines_run
    assert all(state["steps"][s.name]["status"] == "ran" for s in plan(doc).steps)
    for method in ("sas", "krr_st", "krr_st_own_recipe", "mkdt_random_init", "full"):
        results = json.loads((out / "probe" / method / "results.json").read_text())
        cell = results["summary"]["digits"]["converged"]["10"]
        assert 0.0 <= cell["mean"] <= 100.0
    assert state["steps"]["pretrain/full"]["summary"]["epochs"] == 1
    own = state["steps"]["pretrain/krr_st_own_recipe"]["summary"]
    assert own["epochs"] == 3 and own["lr"] == pytest.approx(0.05)  # KRR-ST's recorded recipe
    assert state["steps"]["pretrain/krr_st"]["summary"]["epochs"] == 2  # MKDT's recipe (the pretrain section)
    assert (out / "distill-random_init" / "distilled.safetensors").is_file()
    encoder_meta = json.loads((out / "probe" / "mkdt_random_init" / "results.json").read_text())["encoder_meta"]
    assert encoder_meta["kind"] == "distilled"


def test_balanced_lowres_gets_the_distilled_sets_budget_and_its_validated_defaults():
    doc = load_run_document("cifar10-cpu", [], ["run.methods=[mkdt,balanced_lowres,random_lowres]"], {"out": "runs/x"})
    run = plan(doc)
    variant, control = step_named(run, "subset/balanced_lowres"), step_named(run, "subset/random_lowres")
    init = step_named(run, "init")
    assert variant.size == control.size == init.size  # the pixel budget of MKDT's set
    assert (variant.method, variant.image_scale, variant.clusters, variant.within) == ("balanced", 2, 40, "high_loss")
    assert (control.method, control.image_scale) == ("random", 2)
    # a document's own section overrides the pipeline's defaults; a typo there is named
    doc["subset/balanced_lowres"] = {"clusters": 20}
    assert step_named(plan(doc), "subset/balanced_lowres").clusters == 20
    doc["subset/balanced_lowres"] = {"cluster": 20}
    with pytest.raises(ConfigError, match="clusters"):
        plan(doc)


def test_balanced_lowres_runs_end_to_end_with_the_validation_probe(tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "run"
    doc = tiny_document(out)
    doc["run"] = {"methods": ["random", "balanced_lowres"], "eval_seeds": [0, 1]}
    doc["subset/balanced_lowres"] = {"clusters": 4}
    doc["probe"]["evaluation"] = "validation"
    state = run_pipeline(doc)
    subset = state["steps"]["subset/balanced_lowres"]["summary"]
    assert subset["images"] == 80 and subset["stored_resolution"] == 4  # init size 20 at image_scale 2
    assert state["results"]["balanced_lowres"] == "probe/balanced_lowres-validation/results.json"
    merged = json.loads((out / state["results"]["balanced_lowres"]).read_text())
    assert merged["evaluation"]["mode"] == "validation" and merged["seeds"] == [0, 1]
    assert "balanced_lowres" in (out / "report.md").read_text() and not (out / "probe" / "random").exists()

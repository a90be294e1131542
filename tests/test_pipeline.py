"""The whole pipeline on a tiny digits run: every step, the report, skipping and redoing on change."""

import json

import pytest
import torch
import yaml

from mkdt.cli import main
from mkdt.errors import MkdtError
from mkdt.pipeline import load_run_document, plan, run_pipeline


def tiny_document(out):
    student = {"name": "convnet", "depth": 1, "width": 8}
    return {
        "out": str(out), "seed": 0, "device": "cpu",
        "data": {"name": "digits", "split": "train", "resolution": 8},
        "run": {"methods": ["none", "random", "high_loss", "mkdt"]},
        "teacher": {"model": student, "monitor": None,
                    "objective": {"projector_hidden": 32, "projector_out": 32},
                    "schedule": {"epochs": 1, "batch_size": 128, "warmup_epochs": 0}},
        "experts": {"model": student, "num_experts": 2, "epochs": 3, "batch_size": 128},
        "init": {"model": student, "size": 20},
        "distill": {"model": student, "iterations": 3, "syn_steps": 2, "batch_syn": 10, "expert_epochs": 1,
                    "max_start_epoch": 1, "lr_img": 10.0, "checkpoint_every": 2},
        "pretrain": {"model": student, "epochs": 2, "batch_size": 64},
        "probe": {"downstream": [{"name": "digits", "resolution": 8}], "protocols": ["converged"],
                  "percents": [10], "seeds": [0]},
    }


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("pipeline") / "run"
    doc = tiny_document(out)
    logs = []
    state = run_pipeline(doc, log=logs.append)
    return out, doc, state, logs


def test_every_step_runs_and_the_report_is_written(finished_run):
    out, _doc, state, logs = finished_run
    _settings, _out, steps = plan(tiny_document(out))
    assert [s.name for s in steps] == state["order"]
    assert all(state["steps"][s.name]["finished"] for s in steps)
    for method in ("none", "random", "high_loss", "mkdt"):
        results = json.loads((out / "probe" / method / "results.json").read_text())
        assert "digits" in json.dumps(results["summary"])
    html = (out / "report.html").read_text()
    assert "data:image/png;base64" in html and "mkdt" in html
    md = (out / "report.md").read_text()
    assert "| digits |" in md and "peak RSS" in md and "learned inner lr: 0." in md


def test_rerun_skips_finished_steps(finished_run):
    out, doc, state, _ = finished_run
    logs = []
    again = run_pipeline(doc, log=logs.append)
    assert all("done before" in line for line in logs if line.startswith("["))
    assert again["steps"]["distill"]["summary"] == state["steps"]["distill"]["summary"]


def test_changed_stage_config_redoes_it_and_later_steps_only(finished_run):
    out, doc, _, _ = finished_run
    teacher_before = (out / "teacher" / "teacher.safetensors").stat().st_mtime_ns
    changed = json.loads(json.dumps(doc))
    changed["distill"]["iterations"] = 4
    logs = []
    state = run_pipeline(changed, log=logs.append)
    text = "\n".join(logs)
    assert "distill: its configuration changed" in text
    assert "teacher: done before" in text and "experts: done before" in text
    assert "pretrain/mkdt: running" in text and "pretrain/none: done before" in text
    assert state["steps"]["distill"]["summary"]["updates_applied"] == 4
    assert (out / "distill.stale").is_dir()
    assert (out / "teacher" / "teacher.safetensors").stat().st_mtime_ns == teacher_before


def test_run_command_reads_a_document_and_rejects_unknown_methods(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    doc = tiny_document(tmp_path / "r")
    doc["run"]["methods"] = ["none", "magic"]
    path.write_text(yaml.safe_dump(doc))
    assert main(["run", "--config", str(path)]) == 1
    assert "unknown method 'magic'" in capsys.readouterr().err


def test_overrides_reach_their_sections():
    doc = load_run_document("demo", [], ["distill.iterations=7", "data.resolution=8"], {"out": "x"})
    assert doc["distill"]["iterations"] == 7 and doc["data"]["resolution"] == 8 and doc["out"] == "x"


def seeded_document(out, processes: int) -> dict:
    doc = tiny_document(out)
    doc["run"] = {"methods": ["none"], "eval_seeds": [0, 1], "processes": processes}
    doc["probe"]["percents"] = [5, 10]
    return doc


def test_eval_seeds_pretrain_one_encoder_per_seed_and_merge_the_probes(tmp_path):
    """With run.eval_seeds each seed pre-trains its own encoder and probes it on that seed's labelled
    subsets; probe/<method>/results.json holds every seed's runs; torchrun launches (run.processes 2)
    give the numbers one process gives."""
    torch.set_num_threads(1)
    one = run_pipeline(seeded_document(tmp_path / "one", processes=1), log=lambda line: None)
    two = run_pipeline(seeded_document(tmp_path / "two", processes=2), log=lambda line: None)
    names = ["teacher", "targets", "pretrain/none_seed0", "probe/none_seed0", "pretrain/none_seed1", "probe/none_seed1"]
    assert one["order"] == names and two["order"] == names
    assert [n for n in names if two["steps"][n].get("processes") == 2] == ["teacher", "probe/none_seed0",
                                                                            "probe/none_seed1"]
    for root in (tmp_path / "one", tmp_path / "two"):
        merged = json.loads((root / "probe" / "none" / "results.json").read_text())
        per_seed = [json.loads((root / "probe" / f"none_seed{s}" / "results.json").read_text()) for s in (0, 1)]
        assert len(set(merged["encoders"])) == 2 and merged["seeds"] == [0, 1]
        for pct in ("5", "10"):
            cell = merged["summary"]["digits"]["converged"][pct]
            assert cell["n"] == 2 and cell["seeds"] == [0, 1]
            assert cell["accuracies"] == [p["summary"]["digits"]["converged"][pct]["accuracies"][0] for p in per_seed]
    merged_one = json.loads((tmp_path / "one" / "probe" / "none" / "results.json").read_text())["summary"]
    merged_two = json.loads((tmp_path / "two" / "probe" / "none" / "results.json").read_text())["summary"]
    assert merged_one == merged_two
    assert (tmp_path / "two" / "launch" / "probe__none_seed1.yaml").is_file()


def test_bad_run_settings_are_refused(tmp_path):
    doc = seeded_document(tmp_path, processes=0)
    with pytest.raises(MkdtError, match="run.processes"):
        plan(doc)
    doc = seeded_document(tmp_path, processes=1)
    doc["run"]["eval_seeds"] = [1, 1]
    with pytest.raises(MkdtError, match="eval_seeds"):
        plan(doc)

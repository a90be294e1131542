"""The whole pipeline on a tiny digits run: every step, the report, skipping and redoing on change."""

import json

import pytest
import torch
import yaml

from mkdt.cli import main
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

"""The whole pipeline on a tiny digits run: every step, the report, skipping and redoing on change."""

import json
import logging
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
import yaml

from mkdt.cli import main
from mkdt.errors import ConfigError
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
        "experts": {"model": student, "num_experts": 2, "schedule": {"epochs": 3, "batch_size": 128}},
        "init": {"model": student, "size": 20},
        "distill": {"model": student, "iterations": 3, "syn_steps": 2, "batch_syn": 10, "expert_epochs": 1,
                    "max_start_epoch": 1, "lr_img": 10.0, "checkpoint_every": 2},
        "pretrain": {"model": student, "schedule": {"epochs": 2, "batch_size": 64}},
        "probe": {"downstream": [{"name": "digits", "resolution": 8}], "protocols": ["converged"],
                  "percents": [10], "seeds": [0]},
    }


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("pipeline") / "run"
    doc = tiny_document(out)
    state = run_pipeline(doc)
    return out, doc, state


def statuses(state: dict) -> dict[str, str]:
    return {name: step["status"] for name, step in state["steps"].items()}


def records(out) -> dict[str, int]:
    """Every stage record in a run folder and its modification time."""
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("stage.json")}


def copy_of(finished, tmp_path, name="copy"):
    out, doc, _ = finished
    dest = tmp_path / name
    shutil.copytree(out, dest)
    return dest, {**json.loads(json.dumps(doc)), "out": str(dest)}


def test_every_step_runs_and_the_report_is_written(finished_run):
    out, doc, state = finished_run
    steps = plan(doc).steps
    assert [s.name for s in steps] == state["order"]
    assert set(statuses(state).values()) == {"ran"}
    for method in ("none", "random", "high_loss", "mkdt"):
        results = json.loads((out / "probe" / method / "results.json").read_text())
        assert "digits" in json.dumps(results["summary"])
    html = (out / "report.html").read_text()
    assert "data:image/png;base64" in html and "mkdt" in html
    for piece in ("mean ± std over seeds; the axis starts near the lowest result",  # the results chart
                  "matching loss per update, its moving average",  # loss + held-out loss + learned lr curves
                  "initial set, distilled set and their difference",  # the images
                  "How to read this demo", "cannot</em> show"):  # digits: what the run can and cannot show
        assert piece in html and f"{piece}: not available" not in html, piece
    assert html.count("data:image/png;base64") == 3
    for name in ("results.png", "distill_curves.png", "distill_images.png"):
        assert (out / "report_files" / name).stat().st_size > 5000


def test_a_report_writer_killed_midway_leaves_no_temporary_file(finished_run, tmp_path):
    from mkdt.report import write_report

    out, doc = copy_of(finished_run, tmp_path)
    orphan = out / "report_files" / ".results.png.abc123.tmp"  # what a SIGKILL during a figure's write leaves
    orphan.write_bytes(b"partial")
    write_report(out, json.loads((out / "pipeline.json").read_text()) | {"methods": doc["run"]["methods"]})
    assert not orphan.exists() and (out / "report_files" / "results.png").is_file()
    md = (out / "report.md").read_text()
    assert "| digits |" in md and "peak RSS" in md and "learned inner lr: 0." in md
    assert "distill" in (out / "mkdt.log").read_text()  # the run's log file holds its progress


def test_every_training_stage_logs_its_scalars_to_csv(finished_run):
    from mkdt.metrics import read_csv

    out, _, _ = finished_run
    for folder, name in [("teacher", "loss"), ("experts", "loss"), ("distill", "loss"), ("distill", "lr"),
                         ("pretrain/mkdt", "loss")]:
        rows = read_csv(out / folder / "metrics.csv")
        assert any(r["name"] == name for r in rows), (folder, name)


def test_rerun_reuses_every_step(finished_run):
    out, doc, state = finished_run
    before = records(out)
    again = run_pipeline(doc)
    assert set(statuses(again).values()) == {"reused"}
    assert again["steps"]["distill"]["summary"] == state["steps"]["distill"]["summary"]
    assert records(out) == before


def test_a_moved_run_folder_and_settings_that_change_no_result_redo_nothing(finished_run, tmp_path, monkeypatch):
    moved, doc = copy_of(finished_run, tmp_path)
    before = records(moved)
    assert set(statuses(run_pipeline(doc)).values()) == {"reused"}  # a copy elsewhere, absolute path
    monkeypatch.chdir(tmp_path)
    relative = {**doc, "out": "copy", "device": "auto"}  # relative --out; auto resolves to this CPU
    relative["distill"] = {**doc["distill"], "threads": 1, "checkpoint_every": 1}
    assert set(statuses(run_pipeline(relative)).values()) == {"reused"}
    assert records(moved) == before


def test_changed_setting_redoes_that_step_and_its_dependents_only(finished_run, tmp_path, caplog):
    out, doc = copy_of(finished_run, tmp_path)
    changed = json.loads(json.dumps(doc))
    changed["distill"]["lr_img"] = 20.0
    with caplog.at_level(logging.INFO, logger="mkdt"):
        state = run_pipeline(changed)
    assert "distill: settings changed (config.lr_img: 10.0 -> 20.0)" in caplog.text
    done = statuses(state)
    assert done["distill"] == "ran" and done["pretrain/mkdt"] == "ran" and done["probe/mkdt"] == "ran"
    assert {done[n] for n in done if not n.endswith("mkdt") and n != "distill"} == {"reused"}
    assert (out / "distill.stale.1" / "distilled.safetensors").is_file()  # the earlier set is kept
    back = run_pipeline(doc)  # the first settings again: restored, not recomputed
    assert statuses(back)["distill"] == "restored" and statuses(back)["probe/mkdt"] == "restored"


def test_more_iterations_extend_distillation_with_progress_lines_in_a_pipe(finished_run, tmp_path):
    out, doc = copy_of(finished_run, tmp_path)
    doc["distill"]["iterations"] = 6
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(doc))
    env = {**os.environ, "MKDT_PROGRESS_INTERVAL": "0", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdt", "run", "--config", str(path)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("distill ") and "/6" in ln]
    assert len(lines) >= 3 and "loss" in lines[0]  # one line per iteration at interval 0, not a single bar
    assert "distill: resumed from the checkpoint at iteration 3 of 6" in done.stderr
    state = json.loads((out / "pipeline.json").read_text())
    assert statuses(state)["distill"] == "extended" and statuses(state)["teacher"] == "reused"


def test_more_experts_train_only_the_new_ones(finished_run, tmp_path):
    out, doc = copy_of(finished_run, tmp_path)
    doc["experts"]["num_experts"] = 3
    state = run_pipeline(doc)
    experts = state["steps"]["experts"]
    assert experts["status"] == "extended" and experts["summary"]["trained_now"] == 1
    assert experts["summary"]["resumed_finished"] == 2 and not list(out.glob("experts.stale.*"))


@pytest.mark.parametrize("override, message", [
    ("distil.iterations=5", "unknown section 'distil' (did you mean 'distill'?)"),
    ("distill.lr_imgg=1", "unknown config key 'distill.lr_imgg' (did you mean 'lr_img'?)"),
    ("distill.iterations=abc", "distill.iterations must be an integer, got 'abc'"),
    ("distill.iterations=0", "distill.iterations must be at least 1"),
    ("teacher.schedule.lr=-1", "teacher.schedule.lr must be positive"),
    ("data.root=/no/such/data.tar", "/no/such/data.tar"),
])
def test_demo_typos_fail_at_once_with_exit_2_and_nothing_written(tmp_path, capsys, override, message):
    out = tmp_path / "demo"
    t0 = time.perf_counter()
    assert main(["demo", "--out", str(out), "--set", override]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists() and time.perf_counter() - t0 < 30


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_failing_command_on_a_finished_run_costs_nothing(finished_run, tmp_path, capsys):
    out, doc = copy_of(finished_run, tmp_path)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(doc))
    before = records(out)
    assert main(["run", "--config", str(path), "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert records(out) == before and not list(out.rglob("*.stale.*"))
    assert set(statuses(run_pipeline(doc)).values()) == {"reused"}


def test_dry_run_prints_the_plan_and_runs_nothing(finished_run, tmp_path, capsys):
    out, doc = copy_of(finished_run, tmp_path)
    doc["distill"]["lr_img"] = 30.0
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(doc))
    before = records(out)
    assert main(["run", "--config", str(path), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "[1/13] teacher: reuse" in text and "distill: run (settings changed (config.lr_img" in text
    assert records(out) == before


def test_print_config_shows_every_step_with_defaults(capsys):
    assert main(["demo", "--print-config"]) == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    assert doc["steps"]["distill"]["lr_img"] == 100.0 and doc["steps"]["distill"]["momentum"] == 0.5
    assert doc["steps"]["experts"]["schedule"]["weight_decay"] == 1e-4 and doc["run"]["processes"] == 1


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
    one = run_pipeline(seeded_document(tmp_path / "one", processes=1))
    two = run_pipeline(seeded_document(tmp_path / "two", processes=2))
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
    with pytest.raises(ConfigError, match="run.processes must be an integer >= 1"):
        plan(doc)
    doc = seeded_document(tmp_path, processes=1)
    doc["run"]["eval_seeds"] = [1, 1]
    with pytest.raises(ConfigError, match="run.eval_seeds"):
        plan(doc)
    doc["run"] = {"methods": ["none", "mkdtt"]}
    with pytest.raises(ConfigError, match="run.methods must be a list of .*did you mean 'mkdt'"):
        plan(doc)

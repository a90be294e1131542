"""The command line: one registry of stages, per-stage help, one-line errors with exit codes, progress."""

import json
import os
import signal
import subprocess
import sys

import pytest
from helpers import stage_status

from mkdt.cli import build_parser, main
from mkdt.stages import STAGES


def test_smoke_command_writes_a_done_stage(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["smoke", "--out", str(out), "--device", "cpu", "--set", "model.width=8"]) == 0
    record = json.loads((out / "smoke" / "stage.json").read_text())
    assert record["summary"]["data"].startswith("digits") and record["status"] == "done"
    assert record["summary"]["features"][0] == 64
    assert (out / "smoke" / "config.yaml").read_text().count("width: 8") == 1
    assert "fingerprint" in capsys.readouterr().out


def test_print_config_applies_overrides(capsys):
    assert main(["smoke", "--print-config", "--set", "model.depth=2", "data.resolution=16", "--seed", "4"]) == 0
    text = capsys.readouterr().out
    assert "depth: 2" in text and "resolution: 16" in text and "seed: 4" in text


@pytest.mark.parametrize("args, message, code", [
    (["smoke", "--set", "data.name=nosuchset"], "smoke.data.name must be a data source name", 2),
    (["smoke", "--set", "model.name=vgg"], "smoke.model.name must be one of", 2),
    (["smoke", "--set", "bogus=1"], "unknown config key 'smoke.bogus'", 2),
    (["smoke", "--config", "/no/such/file.yaml"], "/no/such/file.yaml", 2),
    (["smoke", "--device", "cuda:7"], "cuda", 2),
    (["smoke", "--set", "data.resolution=12", "--set", "model.depth=3"], "divisible by 8", 1),  # found at work
])
def test_bad_input_is_one_line_with_its_exit_code(tmp_path, capsys, args, message, code):
    assert main([*args, "--out", str(tmp_path / "r")]) == code
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if line.startswith("mkdt smoke: error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err
    if code == 2:  # found before the stage started: nothing else was printed
        assert len(err.splitlines()) == 1
    assert stage_status(tmp_path / "r" / "smoke") != "done"


def test_out_at_a_file_is_one_line_not_a_traceback(tmp_path, capsys):
    afile = tmp_path / "a.txt"
    afile.write_text("x")
    for command in (["smoke"], ["demo"]):
        assert main([*command, "--out", str(afile)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "a.txt" in err and "Traceback" not in err


def test_console_entry_point_runs_as_module():
    proc = subprocess.run([sys.executable, "-m", "mkdt", "list"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "digits" in proc.stdout and "convnet" in proc.stdout and "distill" in proc.stdout


def test_the_cli_and_the_pipeline_share_one_registry():
    from mkdt.pipeline import _set_steps, _evaluation_steps
    from mkdt.layout import RunLayout

    commands = build_parser()._subparsers._group_actions[0].choices
    assert set(STAGES) <= set(commands) and {"run", "demo", "list"} <= set(commands)
    for name, stage in STAGES.items():
        assert stage.name == name and stage.section == name.replace("-", "_") and callable(stage.body)
    layout = RunLayout("x")
    steps = _set_steps(["mkdt", "sas", "krr_st", "mtt_ssl", "mkdt_random_init"], layout, budget=100)
    steps += _evaluation_steps("mkdt", layout, [0])
    assert all(step.stage is STAGES[step.stage.name] for step in steps)  # the very same objects


def test_each_stage_help_lists_its_own_settings(capsys):
    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    text = capsys.readouterr().out
    assert "lr_img" in text and "syn_steps" in text and "unrolled per trajectory" in text
    assert "[float, default 1000.0]" in text and "trajectories" in text
    with pytest.raises(SystemExit):
        main(["experts", "--help"])
    text = capsys.readouterr().out
    assert "schedule.lr" in text and "num_experts" in text and "lr_img" not in text


def test_stage_lines_reach_stderr_and_the_run_log_and_quiet_silences_them(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mkdt", "smoke", "--out", str(tmp_path), "--device", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "smoke: always runs" in done.stderr
    assert (tmp_path / "mkdt.log").read_text().count("smoke: always runs") == 1
    quiet = subprocess.run([*cmd, "--quiet"], capture_output=True, text=True, env=env, timeout=120)
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_sigterm_stops_cleanly_with_one_line(tmp_path):
    """SIGTERM is handled like Ctrl-C: one line, exit 143, the stage left resumable."""
    script = (
        "import time, sys\n"
        "import mkdt.evaluate.pretraining as p\n"
        "real = p.train_regression\n"
        "def slow(*a, **k):\n"
        "    print('training', flush=True)\n"
        "    time.sleep(60)\n"
        "p.train_regression = slow\n"
        "from mkdt.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    cmd = [sys.executable, "-c", script, "pretrain", "--out", str(tmp_path), "--device", "cpu", "--set", "kind=full",
           "--set", "data.name=digits", "--set", f"targets={tmp_path / 't.safetensors'}"]
    _digits_targets(tmp_path / "t.safetensors")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "training"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert "terminated (SIGTERM)" in err and "Traceback" not in err
    assert stage_status(tmp_path / "pretrain" / "full") != "done"  # nothing was finished: nothing recorded


def _digits_targets(path):
    import torch

    from mkdt.data import load_dataset
    from mkdt.formats import save_targets

    data = load_dataset("digits")
    save_targets(path, torch.randn(len(data), 4, generator=torch.Generator().manual_seed(0)), data.fingerprint())

import json
import subprocess
import sys

import pytest

from mkdt.cli import COMMANDS, main


def test_smoke_command_writes_a_done_stage(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["smoke", "--out", str(out), "--device", "cpu", "--set", "model.width=8"]) == 0
    record = json.loads((out / "smoke" / "stage.json").read_text())
    assert record["summary"]["data"].startswith("digits")
    assert record["summary"]["features"][0] == 64
    assert (out / "smoke" / "config.yaml").read_text().count("width: 8") == 1
    assert "fingerprint" in capsys.readouterr().out


def test_print_config_applies_overrides(capsys):
    assert main(["smoke", "--print-config", "--set", "model.depth=2", "data.resolution=16", "--seed", "4"]) == 0
    text = capsys.readouterr().out
    assert "depth: 2" in text and "resolution: 16" in text and "seed: 4" in text


@pytest.mark.parametrize("args, message", [
    (["smoke", "--set", "data.name=nosuchset"], "nosuchset"),
    (["smoke", "--set", "model.name=vgg"], "unknown model 'vgg'"),
    (["smoke", "--set", "data.resolution=12", "--set", "model.depth=3"], "divisible by 8"),
    (["smoke", "--set", "bogus=1"], "unknown config key 'bogus'"),
    (["smoke", "--config", "/no/such/file.yaml"], "/no/such/file.yaml"),
])
def test_bad_input_is_one_line_and_nonzero(tmp_path, capsys, args, message):
    assert main([*args, "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r" / "smoke" / "stage.json").exists()


def test_console_entry_point_runs_as_module():
    proc = subprocess.run([sys.executable, "-m", "mkdt", "list"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "digits" in proc.stdout and "convnet" in proc.stdout


def test_every_command_points_at_an_existing_function():
    import importlib

    for name, cmd in COMMANDS.items():
        module = importlib.import_module(cmd.module)
        assert hasattr(module, cmd.config), f"{name}: {cmd.module}.{cmd.config} missing"
        assert callable(getattr(module, cmd.function)), f"{name}: {cmd.module}.{cmd.function} missing"

"""Fault injection: kills at arbitrary points of a small pipeline, and bad inputs a hostile user might give.

A run killed with SIGKILL (no chance to clean up) and started again must end with every tensor equal to an
uninterrupted run's; every bad input must give one line naming the file or key and the fix, a non-zero
exit, and cost no finished work. CI kills at a few points; ``MKDT_FAULT_KILLS=N`` kills N times (spread
over the whole run) for the full audit whose figures are in docs/RESULTS.md.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from mkdt.artifacts import load_tensors
from test_pipeline import tiny_document

KILLS = int(os.environ.get("MKDT_FAULT_KILLS", "3"))
# Kill points: the moment a file appears in the run folder (so every stage is reached whatever the machine's
# speed), plus a random delay; CI takes every few-th of them, the full audit all of them (and more, with
# other delays).
KILL_POINTS = ["teacher/stage.json", "teacher/log.jsonl", "targets/stage.json", "experts/expert_0000.safetensors",
               "init/stage.json", "init/losses_partial.safetensors", "distill/stage.json",
               "distill/checkpoint.safetensors", "pretrain/none/stage.json", "probe/none/stage.json",
               "pretrain/random/stage.json", "probe/high_loss/stage.json", "pretrain/mkdt/stage.json",
               "probe/mkdt/stage.json"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TRANSIENT = ("checkpoint", "partial", "cache/")  # resume helpers, not results


def mkdt(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdt", *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout)


def tensors_of(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    found = {}
    for path in sorted(out.rglob("*.safetensors")):
        rel = path.relative_to(out).as_posix()
        if ".stale." in rel or any(t in rel for t in TRANSIENT):
            continue
        found[rel] = load_tensors(path)
    return found


def write_document(tmp_path: Path, out: Path) -> Path:
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(tiny_document(out)))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, float]:
    """The uninterrupted run and how long it took."""
    tmp = tmp_path_factory.mktemp("reference")
    out = tmp / "run"
    t0 = time.perf_counter()
    done = mkdt("run", "--config", str(write_document(tmp, out)))
    assert done.returncode == 0, done.stderr
    return out, time.perf_counter() - t0


def kill_when(doc: Path, out: Path, point: str, delay: float, timeout: float) -> bool:
    """Start a run, SIGKILL it (and its children) ``delay`` s after ``out/point`` appears; False if it ended first."""
    proc = subprocess.Popen([sys.executable, "-m", "mkdt", "run", "--config", str(doc)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.perf_counter() + timeout
    while proc.poll() is None and not (out / point).exists() and time.perf_counter() < deadline:
        time.sleep(0.01)
    time.sleep(delay)
    killed = proc.poll() is None
    if killed:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return killed


def test_killed_runs_resume_to_identical_tensors(reference, tmp_path):
    """Each kill point on its own run folder: killed there, then run again to the end, every result tensor equals
    the uninterrupted run's. The full audit (MKDT_FAULT_KILLS=N) takes N points with random delays."""
    ref_out, seconds = reference
    want = tensors_of(ref_out)
    rng = random.Random(0)
    step = max(1, len(KILL_POINTS) // KILLS)
    points = (KILL_POINTS[::step] * (1 + KILLS // len(KILL_POINTS)))[:KILLS]
    kills = orphans = 0
    for i, point in enumerate(points):
        out = tmp_path / f"run{i}"
        doc = write_document(tmp_path, out)
        kills += kill_when(doc, out, point, rng.uniform(0.0, 0.5) if i else 0.0, timeout=4 * seconds)
        final = mkdt("run", "--config", str(doc))
        assert final.returncode == 0, final.stderr
        got = tensors_of(out)
        assert sorted(got) == sorted(want), point
        for name, tensors in want.items():
            assert tensors.keys() == got[name].keys(), name
            for key, value in tensors.items():
                assert torch.equal(value, got[name][key]), f"{name}: {key} differs after a kill at {point}"
        orphans += len(list(out.rglob(".*.tmp")))
    report = os.environ.get("MKDT_FAULT_REPORT")  # benchmarks/faults.py collects the figures
    if report:
        Path(report).write_text(json.dumps({"kills": kills, "kill_points": points, "files_compared": len(want),
                                            "tensors_compared": sum(len(t) for t in want.values()),
                                            "orphan_temp_files": orphans}))
    assert orphans == 0  # no orphan temp files survive the runs that follow a kill
    assert kills >= len(points) - 1  # (a point reached in the run's last instant may see it end first)


def test_sigterm_in_the_middle_of_a_run_stops_cleanly_and_resumes(reference, tmp_path):
    ref_out, seconds = reference
    out = tmp_path / "run"
    doc = write_document(tmp_path, out)
    proc = subprocess.Popen([sys.executable, "-m", "mkdt", "run", "--config", str(doc)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.perf_counter() + seconds
    while not (out / "experts" / "stage.json").is_file() and time.perf_counter() < deadline:
        time.sleep(0.05)  # the run is under way (in the experts stage)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before SIGTERM arrived")
    assert proc.returncode == 143 and "terminated (SIGTERM)" in err and "Traceback" not in err
    assert mkdt("run", "--config", str(doc)).returncode == 0
    assert tensors_of(out).keys() == tensors_of(ref_out).keys()


# ----------------------------------------------------------------------------------------------
# bad inputs on a finished run: one line, a non-zero exit, no finished work lost
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def finished(reference, tmp_path) -> Path:
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference[0], out)
    return out


def records(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("stage.json")}


def one_line_error(done: subprocess.CompletedProcess, *needles: str) -> str:
    errors = [line for line in done.stderr.splitlines() if ": error: " in line]
    assert done.returncode != 0 and len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def test_a_stage_record_of_the_wrong_type(finished):
    (finished / "init" / "stage.json").write_text("[]")
    done = mkdt("init", "--out", str(finished), "--device", "cpu", "--set", "data.name=digits",
                "--set", "data.resolution=8", "--set", "model.depth=1", "--set", "model.width=8", "--set", "size=20")
    one_line_error(done, "init/stage.json: not a stage record", "delete")


def test_a_deleted_expert_is_trained_again_never_silently_skipped(finished):
    victim = finished / "experts" / "expert_0001.safetensors"
    victim.unlink()
    distill = mkdt("distill", "--out", str(finished), "--device", "cpu", "--set", "model.depth=1",
                   "--set", "model.width=8")
    one_line_error(distill, "expert_0001.safetensors", "mkdt experts")
    done = mkdt("run", "--config", str(write_document(finished.parent, finished)))
    assert done.returncode == 0 and victim.is_file()
    state = json.loads((finished / "pipeline.json").read_text())
    experts = state["steps"]["experts"]
    assert experts["status"] == "repaired" and experts["summary"]["trained_now"] == 1


def test_a_deleted_distilled_set_is_made_again(finished):
    (finished / "distill" / "distilled.safetensors").unlink()
    done = mkdt("run", "--config", str(write_document(finished.parent, finished)))
    assert done.returncode == 0 and (finished / "distill" / "distilled.safetensors").is_file()
    state = json.loads((finished / "pipeline.json").read_text())
    assert state["steps"]["distill"]["status"] == "repaired"


def test_a_set_whose_normalisation_was_edited_is_refused(finished):
    path = finished / "distill" / "distilled.safetensors"
    raw = path.read_bytes()
    start = raw.index(b'\\"mean\\": [') + len(b'\\"mean\\": [')
    digit = start + raw[start:].index(b".") + 1  # first decimal of the stored mean
    edited = raw[:digit] + (b"1" if raw[digit:digit + 1] != b"1" else b"2") + raw[digit + 1:]
    path.write_bytes(edited)
    done = mkdt("pretrain", "--out", str(finished / "x"), "--device", "cpu", "--set", "kind=distilled",
                "--set", f"source={path}", "--set", "model.depth=1", "--set", "model.width=8")
    one_line_error(done, "distilled.safetensors", "do not match the digest")


@pytest.mark.parametrize("override, needle", [
    ("distill.lr_img=-1", "distill.lr_img must be >= 0"),
    ("teacher.schedule.lr=-1", "teacher.schedule.lr must be positive"),
    ("distill.iterations=0", "distill.iterations must be at least 1"),
])
def test_invalid_values_are_refused_before_anything_moves(finished, override, needle):
    before = records(finished)
    done = mkdt("run", "--config", str(write_document(finished.parent, finished)), "--set", override)
    assert done.returncode == 2
    one_line_error(done, needle)
    assert records(finished) == before and not list(finished.rglob("*.stale.*"))


def test_out_on_a_full_or_limited_file_system_is_one_line(tmp_path):
    """EFBIG for real: a 64 KB file-size limit (SIGXFSZ ignored, as under `ulimit -f`)."""
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))\n"
        "from mkdt.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    done = subprocess.run([sys.executable, "-c", script, "teacher", "--out", str(tmp_path / "run"), "--device", "cpu",
                           "--set", "data.name=digits", "--set", "monitor=null", "--set", "model.name=convnet",
                           "--set", "model.width=64", "--set", "schedule.epochs=1"],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 1
    one_line_error(done, "file too large", "--out")
    assert not list((tmp_path / "run").rglob(".*.tmp"))


def test_a_malicious_teacher_import_is_refused_in_one_line(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    bad = tmp_path / "teacher.pt"
    torch.save({"w": Evil()}, bad)
    done = mkdt("teacher", "--out", str(tmp_path / "run"), "--device", "cpu", "--import", str(bad),
                "--set", "data.name=digits", "--set", "monitor=null")
    line = one_line_error(done, "teacher.pt", "weights-only")
    assert "weights_only=False" not in line and not (tmp_path / "pwned").exists()

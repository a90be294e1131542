"""The stage contract (``mkdt.engine``) on a toy stage: identity, reuse, versions kept and restored, repair,
extension, refusal of broken records, and what a real kill leaves behind."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import stage_status

from mkdt.artifacts import save_json
from mkdt.config import StageConfig, require
from mkdt.engine import Stage, decide, run_stage
from mkdt.errors import ConfigError, MkdtError


@dataclasses.dataclass
class ToyConfig(StageConfig):
    value: int = 1  # what the toy writes
    count: int = 2  # units: files value_<i>.json
    threads: int = 0  # cannot change the result
    source: str | None = None  # an input file

    def check(self) -> None:
        require(self.count >= 1, "count", "at least 1", self.count)


def toy_body(config: ToyConfig, run, fail_after: int | None = None) -> dict:
    made = []
    for i in range(config.count):
        if fail_after is not None and len(made) >= fail_after:
            raise RuntimeError("boom")
        path = run.output(f"unit_{i}", f"value_{i}.json")
        if not path.is_file():
            save_json(path, {"value": config.value, "unit": i})
            made.append(i)
    return {"made": made}


TOY = Stage("toy", ToyConfig, toy_body, "a toy stage", folder=lambda config, layout: layout.root / "toy",
            inputs=lambda config, layout: {"source": Path(config.source)} if config.source else {},
            input_fields=("source",), units=("count",), extends=lambda old, new: True)


def toy(tmp_path: Path, **kw) -> ToyConfig:
    return ToyConfig(out=str(tmp_path / "run"), device="cpu", **kw)


def test_reuse_and_settings_that_change_no_result(tmp_path):
    first = run_stage(TOY, toy(tmp_path))
    assert first.status == "ran" and first.summary == {"made": [0, 1]}
    assert run_stage(TOY, toy(tmp_path)).status == "reused"
    assert run_stage(TOY, dataclasses.replace(toy(tmp_path), device="auto", threads=3)).status == "reused"
    moved = tmp_path / "moved"
    (tmp_path / "run").rename(moved)
    again = run_stage(TOY, ToyConfig(out=os.path.relpath(moved), device="cpu"))
    assert again.status == "reused" and again.folder.resolve() == (moved / "toy").resolve()


def test_other_settings_keep_the_previous_output_and_bring_it_back(tmp_path):
    run_stage(TOY, toy(tmp_path, value=1))
    other = run_stage(TOY, toy(tmp_path, value=2))
    assert other.status == "ran"
    assert json.loads((tmp_path / "run" / "toy.stale.1" / "value_0.json").read_text())["value"] == 1
    back = run_stage(TOY, toy(tmp_path, value=1))
    assert back.status == "restored"
    assert json.loads((tmp_path / "run" / "toy" / "value_0.json").read_text())["value"] == 1
    assert json.loads((tmp_path / "run" / "toy.stale.2" / "value_0.json").read_text())["value"] == 2


def test_a_failed_replacement_puts_the_finished_output_back(tmp_path):
    run_stage(TOY, toy(tmp_path, value=1))
    before = (tmp_path / "run" / "toy" / "stage.json").read_bytes()
    with pytest.raises(RuntimeError, match="boom"):
        run_stage(TOY, toy(tmp_path, value=2), fail_after=1)
    assert (tmp_path / "run" / "toy" / "stage.json").read_bytes() == before  # the finished record untouched
    assert json.loads((tmp_path / "run" / "toy" / "value_0.json").read_text())["value"] == 1
    kept = list((tmp_path / "run").glob("toy.stale.*"))  # the interrupted replacement's work is kept...
    assert len(kept) == 1 and stage_status(kept[0]) == "running"
    resumed = run_stage(TOY, toy(tmp_path, value=2))  # ...and resumes when those settings come back
    assert resumed.status == "resumed" and resumed.summary == {"made": [1]}


def test_a_killed_replacement_is_undone_by_the_next_command(tmp_path):
    """kill -9 gives no chance to clean up: the next command for the finished settings restores them."""
    run_stage(TOY, toy(tmp_path, value=1))
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import test_engine as t
        from mkdt.engine import Stage, run_stage

        def slow(config, run):
            (run.folder / "partial.txt").write_text("half")
            print("working", flush=True)
            time.sleep(60)

        stage = Stage("toy", t.ToyConfig, slow, "", folder=t.TOY.folder, units=t.TOY.units, extends=t.TOY.extends)
        run_stage(stage, t.ToyConfig(out={str(tmp_path / "run")!r}, device="cpu", value=2))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "working"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert (tmp_path / "run" / "toy" / "partial.txt").is_file()  # the killed run's folder is in place
    back = run_stage(TOY, toy(tmp_path, value=1))
    assert back.status == "restored"
    assert json.loads((tmp_path / "run" / "toy" / "value_0.json").read_text())["value"] == 1
    assert (tmp_path / "run" / "toy.stale.2" / "partial.txt").is_file()  # and the killed run's work kept


def test_only_the_newest_versions_are_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("MKDT_KEEP_VERSIONS", "1")
    for value in (1, 2, 3):
        run_stage(TOY, toy(tmp_path, value=value))
    kept = sorted(p.name for p in (tmp_path / "run").glob("toy.stale.*"))
    assert kept == ["toy.stale.2"]
    monkeypatch.setenv("MKDT_KEEP_VERSIONS", "-1")
    with pytest.raises(ConfigError, match="MKDT_KEEP_VERSIONS"):
        run_stage(TOY, toy(tmp_path, value=4))


def test_units_extend_in_place_and_missing_outputs_are_made_again(tmp_path):
    run_stage(TOY, toy(tmp_path, count=2))
    more = run_stage(TOY, toy(tmp_path, count=3))
    assert more.status == "extended" and more.summary == {"made": [2]}
    (tmp_path / "run" / "toy" / "value_1.json").unlink()
    repaired = run_stage(TOY, toy(tmp_path, count=3))
    assert repaired.status == "repaired" and repaired.summary == {"made": [1]}


def test_inputs_count_by_identity_not_by_path(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("one")
    run_stage(TOY, toy(tmp_path, source=str(src)))
    copy = tmp_path / "b.txt"
    copy.write_text("one")
    assert run_stage(TOY, toy(tmp_path, source=str(copy))).status == "reused"  # same bytes, other path
    copy.write_text("two")
    assert run_stage(TOY, toy(tmp_path, source=str(copy))).status == "ran"


def test_orphan_temp_files_are_removed_when_a_stage_starts(tmp_path):
    folder = tmp_path / "run" / "toy"
    folder.mkdir(parents=True)
    orphan = folder / ".value_0.json.abc123.tmp"
    orphan.write_text("half written by a killed process")
    run_stage(TOY, toy(tmp_path))
    assert not orphan.exists()


def test_a_record_of_the_wrong_type_is_one_line(tmp_path):
    run_stage(TOY, toy(tmp_path))
    (tmp_path / "run" / "toy" / "stage.json").write_text("[]")
    with pytest.raises(MkdtError) as err:
        run_stage(TOY, toy(tmp_path))
    assert "stage.json: not a stage record" in str(err.value) and "\n" not in str(err.value)


def test_a_failure_before_any_work_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        run_stage(TOY, toy(tmp_path), fail_after=0)
    assert not (tmp_path / "run" / "toy").exists()


def test_an_input_whose_recorded_output_is_gone_is_refused(tmp_path):
    run_stage(TOY, toy(tmp_path))
    consumer = toy(tmp_path / "other", source=str(tmp_path / "run" / "toy" / "value_0.json"))
    (tmp_path / "run" / "toy" / "value_1.json").unlink()
    with pytest.raises(MkdtError, match="value_1.json: an output recorded by stage toy is missing"):
        decide(TOY, consumer)

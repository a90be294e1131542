"""``mkdt distill`` under ``torchrun --nproc_per_node=2`` (gloo, CPU): data-parallel over trajectories.

The two ranks' synthetic sets stay identical after every update, a non-finite trajectory on one rank
makes both skip, only rank 0 writes, and the result equals one process that matches the same two
trajectories per update and averages their gradients (``trajectories: 2``, a setting of the config).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch

from mkdt.artifacts import load_json
from mkdt.config import to_dict
from mkdt.distill import DistillConfig, distill, matching
from mkdt.errors import MkdtError
from mkdt.formats import load_synthetic

# Every rank: digest of (images, targets, lr) after each applied update, the files it writes, and a NaN
# injected into rank 1's third trajectory (iteration 3), which rank 0 never sees directly.
WRAPPER = textwrap.dedent("""
    import hashlib, json, os, sys
    from pathlib import Path
    import torch
    import mkdt.engine as engine
    import mkdt.distill.loop as loop
    from mkdt.distill import matching
    from mkdt.distill.state import DistillState
    from mkdt.cli import main

    rank = int(os.environ["RANK"])
    log = Path(sys.argv[1]) / f"rank{rank}.jsonl"

    def note(**row):
        with open(log, "a") as fh:
            fh.write(json.dumps(row) + "\\n")

    def digest(state):
        h = hashlib.sha256()
        for name in ("images", "targets", "lr"):
            h.update(state.leaf(name).detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    real_apply = loop._apply

    def apply(state, result, lr_min):
        real_apply(state, result, lr_min)
        note(update=state.iteration, digest=digest(state))

    def spying(real, to_name):
        def spy(*args, **kwargs):
            note(wrote=to_name(*args))
            return real(*args, **kwargs)
        return spy

    real_match, calls = matching.match_plain, {"n": 0}

    def match(problem):
        calls["n"] += 1
        result = real_match(problem)
        if rank == 1 and calls["n"] == 3:
            result.loss = torch.tensor(float("nan"))
            result.grad_images = None
        return result

    loop._apply = apply
    matching.match_plain = match
    engine.save_json = spying(engine.save_json, lambda path, *a: Path(path).name)
    loop.save_synthetic = spying(loop.save_synthetic, lambda path, *a: Path(path).name)
    loop._rewrite_log = spying(loop._rewrite_log, lambda path, *a: Path(path).name)
    DistillState.save = spying(DistillState.save, lambda self, path, *a: Path(path).name)
    raise SystemExit(main(sys.argv[2:]))
""")


def launch(torchrun, tmp_path: Path, config: Path, out: Path) -> subprocess.CompletedProcess:
    return torchrun(WRAPPER, tmp_path, ["distill", "--config", str(config), "--out", str(out), "--device", "cpu"])


def notes(tmp_path: Path, rank: int, key: str) -> list:
    rows = [json.loads(line) for line in (tmp_path / f"rank{rank}.jsonl").read_text().splitlines()]
    return [r for r in rows if key in r]


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "distill" / "log.jsonl").read_text().splitlines()]


def nan_on_call(monkeypatch, poisoned: int) -> None:
    """The one-process twin of the wrapper's NaN: rank 1's third draw is the sixth match here."""
    real, calls = matching.match_plain, {"n": 0}

    def match(problem):
        calls["n"] += 1
        result = real(problem)
        if calls["n"] == poisoned:
            result.loss = torch.tensor(float("nan"))
            result.grad_images = None
        return result

    monkeypatch.setattr(matching, "match_plain", match)


def test_two_processes_stay_in_sync_and_equal_one_process_averaging_two_trajectories(torchrun, 
        config: DistillConfig, tmp_path: Path, monkeypatch):
    config = dataclasses.replace(config, iterations=6, checkpoint_every=3, trajectories=2)
    one, two = tmp_path / "one", tmp_path / "two"
    nan_on_call(monkeypatch, poisoned=6)
    reference = distill(dataclasses.replace(config, out=str(one)))
    monkeypatch.undo()

    config_file = tmp_path / "distill.yaml"
    config_file.write_text(json.dumps({"distill": to_dict(dataclasses.replace(config, out=str(two)))}))
    launch(torchrun, tmp_path, config_file, two)

    # (a) identical replicas after every applied update; iteration 3 skipped on both ranks
    updates = [notes(tmp_path, rank, "digest") for rank in (0, 1)]
    assert [u["update"] for u in updates[0]] == [1, 2, 4, 5, 6]
    assert updates[0] == updates[1]

    # (b) the same run as one process averaging the same two trajectories per update
    a = load_synthetic(one / "distill" / "distilled.safetensors")
    b = load_synthetic(two / "distill" / "distilled.safetensors")
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets) and a.lr == b.lr
    rows_one, rows_two = read_log(one), read_log(two)
    assert rows_one[2]["skipped"] and rows_two[2]["skipped"]
    keys = ("iteration", "loss", "lr", "expert", "start_epoch", "skipped")
    assert [[r[k] for k in keys] for r in rows_one] == [[r[k] for k in keys] for r in rows_two]
    assert all(len(r["expert"]) == 2 and len(r["start_epoch"]) == 2 for r in rows_two)
    record = load_json(two / "distill" / "stage.json")
    summary = record["summary"]
    assert record["world_size"] == 2 and summary["trajectories_per_update"] == 2
    assert load_json(one / "distill" / "stage.json")["world_size"] == 1
    assert reference.summary["trajectories_per_update"] == 2
    assert summary["skipped"] == reference.summary["skipped"] == 1
    # the same settings with 1 or 2 processes are the same stage: the two-process run is reused as is
    again = distill(dataclasses.replace(config, out=str(two)))
    assert again.status == "reused"

    # only rank 0 writes: its record (running, then done), log, two checkpoints and the distilled set
    written = [n["wrote"] for n in notes(tmp_path, 0, "wrote")]
    assert written == ["stage.json", "log.jsonl", "checkpoint.safetensors", "checkpoint.safetensors",
                       "distilled.safetensors", "stage.json"]
    assert notes(tmp_path, 1, "wrote") == []


def test_trajectories_per_update_must_be_positive(config: DistillConfig, tmp_path: Path):
    with pytest.raises(MkdtError, match="distill.trajectories must be at least 1"):
        distill(dataclasses.replace(config, out=str(tmp_path / "zero"), trajectories=0))

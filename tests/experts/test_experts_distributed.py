"""``mkdt experts`` under ``torchrun --nproc_per_node=2`` (gloo, CPU): the unfinished experts are split
between the ranks, every expert file equals a one-process run's bit for bit, two ranks never write the
same file, and only rank 0 writes ``stage.json``."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import torch

from mkdt.artifacts import load_json
from mkdt.config import resolve
from mkdt.experts import ExpertsConfig, train_expert_range, train_experts
from mkdt.formats import load_trajectory

# Runs `mkdt experts` through the CLI on every rank and logs which rank wrote which file.
WRAPPER = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    import mkdt.engine as engine
    import mkdt.experts.trajectories as trajectories
    from mkdt.cli import main

    log = Path(sys.argv[1]) / f"writes-rank{os.environ['RANK']}.jsonl"

    def spying(real):
        def spy(path, *args, **kwargs):
            with open(log, "a") as fh:
                fh.write(json.dumps(Path(path).name) + "\\n")
            return real(path, *args, **kwargs)
        return spy

    engine.save_json = spying(engine.save_json)  # the stage contract writes stage.json through it
    trajectories.save_trajectory = spying(trajectories.save_trajectory)  # every expert file
    raise SystemExit(main(sys.argv[2:]))
""")

CONFIG = textwrap.dedent("""
    experts:
      data: {name: digits, resolution: 8}
      model: {name: convnet, width: 8, depth: 1, norm: instancenorm, pool: avgpool}
      num_experts: 3
      schedule: {epochs: 2, batch_size: 128}
""")


def experts_config(config: Path, out: Path) -> ExpertsConfig:
    return resolve(ExpertsConfig, section="experts", files=[str(config)], values={"out": str(out), "device": "cpu"})


def launch(torchrun, tmp_path: Path, config: Path, out: Path) -> subprocess.CompletedProcess:
    return torchrun(WRAPPER, tmp_path, ["experts", "--config", str(config), "--out", str(out), "--device", "cpu"])


def writes(tmp_path: Path, rank: int) -> list[str]:
    path = tmp_path / f"writes-rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def test_two_process_experts_equal_one_process_and_only_rank0_writes(torchrun, tmp_path, run):
    config = tmp_path / "experts.yaml"
    config.write_text(CONFIG)
    single = train_experts(experts_config(config, run.out))

    two = run.clone("two")
    # An interrupted earlier run left expert 0 finished: the ranks share the other two (1 -> rank 0, 2 -> rank 1).
    train_expert_range(experts_config(config, two), [0])
    launch(torchrun, tmp_path, config, two)

    for i in range(3):
        a = load_trajectory(run.out / "experts" / f"expert_{i:04d}.safetensors")
        b = load_trajectory(two / "experts" / f"expert_{i:04d}.safetensors")
        assert torch.equal(a.params, b.params) and a.epochs == b.epochs, f"expert {i} differs"
        assert a.meta["losses"] == b.meta["losses"] and a.meta["settings_digest"] == b.meta["settings_digest"]

    record = load_json(two / "experts" / "stage.json")
    summary = record["summary"]
    assert record["world_size"] == 2 and load_json(run.out / "experts" / "stage.json")["world_size"] == 1
    assert summary["trained_now"] == 2 and summary["resumed_finished"] == 1
    assert summary["final_loss_mean"] == single.summary["final_loss_mean"]

    # the record says "running" before the work and "done" after it; only rank 0 writes it
    assert writes(tmp_path, 0) == ["stage.json", "expert_0001.safetensors", "stage.json"]
    assert writes(tmp_path, 1) == ["expert_0002.safetensors"]
    assert (two / "experts" / "log-rank0.jsonl").is_file() and (two / "experts" / "log-rank1.jsonl").is_file()
    assert not list((two / "experts").glob("partial_*"))


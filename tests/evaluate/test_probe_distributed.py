"""``mkdt probe`` under ``torchrun --nproc_per_node=2`` (gloo, CPU): the jobs are split between the ranks,
the numbers equal a one-process run's exactly, and only rank 0 writes results/stage files."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

from mkdt.evaluate import probe_results
from mkdt.artifacts import load_json
from mkdt.config import resolve
from mkdt.evaluate import ProbeConfig, probe

# Runs `mkdt probe` through the CLI entry point on every rank and logs which rank wrote which JSON file.
WRAPPER = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    import mkdt.engine as engine
    import mkdt.evaluate.probing as probing
    from mkdt.cli import main

    log = Path(sys.argv[1]) / f"writes-rank{os.environ['RANK']}.jsonl"
    real = engine.save_json

    def spy(path, obj):
        with open(log, "a") as fh:
            fh.write(json.dumps(Path(path).name) + "\\n")
        return real(path, obj)

    real_extract = probing.extract_features

    def extract(*args, **kwargs):
        with open(log, "a") as fh:
            fh.write(json.dumps("extract") + "\\n")
        return real_extract(*args, **kwargs)

    engine.save_json = spy  # the stage contract writes stage.json through it
    probing.save_json = spy  # results.json and partial files
    probing.extract_features = extract
    raise SystemExit(main(sys.argv[2:]))
""")

CONFIG = textwrap.dedent("""
    probe:
      downstream: [{{name: digits, resolution: 8}}]
      protocols: [paper]
      percents: [10.0]
      seeds: [0, 1, 2]
      encoder: {encoder}
      name: tiny
""")

def probed(config):
    """Run the probe stage and return the results.json it recorded."""
    return probe_results(probe(config))



def launch(torchrun, tmp_path: Path, config: Path, out: Path) -> subprocess.CompletedProcess:
    return torchrun(WRAPPER, tmp_path, ["probe", "--config", str(config), "--out", str(out), "--device", "cpu", "--seed", "3"])


def test_two_process_probe_equals_one_process_and_only_rank0_writes(torchrun, tmp_path, random_encoder):
    enc = random_encoder(out=tmp_path / "enc")
    config = tmp_path / "probe.yaml"
    config.write_text(CONFIG.format(encoder=enc))
    single = probed(resolve(ProbeConfig, section="probe", files=[str(config)],
                           values={"out": str(tmp_path / "one"), "device": "cpu", "seed": 3}))

    launch(torchrun, tmp_path, config, tmp_path / "two")
    stage = tmp_path / "two" / "probe" / "tiny"
    double = load_json(stage / "results.json")
    assert load_json(tmp_path / "one" / "probe" / "tiny" / "stage.json")["world_size"] == 1
    assert double == single  # every accuracy, split digest, loss, summary
    assert len(double["runs"]) == 3 and all(r["accuracy"] > 10 for r in double["runs"])
    assert load_json(stage / "stage.json")["world_size"] == 2
    assert not list(stage.glob("partial*.json"))  # per-rank resume files are removed once results exist

    rank0 = [json.loads(line) for line in (tmp_path / "writes-rank0.jsonl").read_text().splitlines()]
    rank1 = [json.loads(line) for line in (tmp_path / "writes-rank1.jsonl").read_text().splitlines()]
    assert "results.json" in rank0 and "stage.json" in rank0
    assert "results.json" not in rank1 and "stage.json" not in rank1
    # Jobs were split: 3 jobs round-robin -> 2 on rank 0, 1 on rank 1 (one resume-file write per job).
    assert rank0.count("partial-rank0.json") == 2 and rank1 == ["partial-rank1.json"]
    # Features (train and test split) were extracted once, by rank 0; rank 1 read rank 0's cache files.
    assert rank0.count("extract") == 2 and "extract" not in rank1
    assert len(list((tmp_path / "two" / "cache" / "probe-features" / "tiny").glob("*.safetensors"))) == 2


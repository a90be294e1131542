"""``mkdt teacher`` under ``torchrun --nproc_per_node=2`` (gloo, CPU): DDP on shards of the global batch,
with the loss and batch norms over the whole batch, trains the teacher a one-process run trains (up to
float32 summation order; Barlow Twins and SimCLR), resumes a one-process checkpoint, and only rank 0
writes files."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch

from mkdt.artifacts import load_json, load_tensors
from mkdt.config import resolve
from mkdt.distributed import DistContext
from mkdt.errors import MkdtError
from mkdt.models import build_model
from mkdt.ssl import AugmentConfig, BatchAugment, ObjectiveConfig, SSLSchedule, SSLTrainer
from mkdt.teacher import TeacherConfig, train_teacher

# Runs `mkdt teacher` through the CLI on every rank and logs the name of every file that rank writes.
WRAPPER = textwrap.dedent("""
    import contextlib, json, os, sys
    from pathlib import Path
    import mkdt.artifacts as artifacts
    from mkdt.cli import main

    log = Path(sys.argv[1]) / f"writes-rank{os.environ['RANK']}.jsonl"
    real = artifacts.atomic_path

    @contextlib.contextmanager
    def spy(path):
        with open(log, "a") as fh:
            fh.write(json.dumps(Path(path).name) + "\\n")
        with real(path) as tmp:
            yield tmp

    artifacts.atomic_path = spy  # every artifact write (tensors, JSON, text) goes through it
    raise SystemExit(main(sys.argv[2:]))
""")

# The tiny digits setup of test_teacher.py, with batch norm in the backbone too (so its statistics must
# be synchronised) and the kNN monitor on (rank 0 only). Two settings keep the one-process reference
# itself accurate to float32, so that the comparison means something:
# - SGD, not Adam: the conv biases in front of batch norm have an exactly zero gradient, and Adam turns
#   the float noise in it into full-size steps (in one process as much as in two);
# - contiguous layout: torch's CPU batch-norm backward in channels-last layout was measured ~1e-3 off
#   (relative, against float64) in one process, while the DDP path is ~1e-6 off in either layout;
# - no colour jitter (grey digits have no colour to jitter): with torchvision's jitter (random order of
#   brightness/contrast/saturation per image) one process's first conv came out 2.7e-5 apart between 1 and
#   2 torch threads (2026-12-02), as far as two processes from one, against 1.2e-6 without it.
CONFIG = textwrap.dedent("""
    teacher:
      data: {{name: digits, resolution: 16, channels: 3, indices: {indices}}}
      monitor: {monitor}
      model: {{name: convnet, depth: 2, width: 8, norm: batchnorm}}
      objective: {{name: {objective}, projector_hidden: 16, projector_out: 32}}
      schedule: {{epochs: 2, batch_size: 64, optimizer: sgd, lr: {lr}, lr_schedule: onecycle,
                 channels_last: false}}
      augment: {{jitter_p: 0.0}}
      knn_k: 20
""")


def launch(torchrun, tmp_path: Path, config: Path, out: Path) -> subprocess.CompletedProcess:
    return torchrun(WRAPPER, tmp_path, ["teacher", "--config", str(config), "--out", str(out), "--device", "cpu", "--seed", "0"])


def writes(tmp_path: Path, rank: int) -> list[str]:
    path = tmp_path / f"writes-rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def log_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "teacher" / "log.jsonl").read_text().splitlines()]


def assert_same_teacher(a: Path, b: Path) -> None:
    ta, tb = load_tensors(a / "teacher" / "teacher.safetensors"), load_tensors(b / "teacher" / "teacher.safetensors")
    assert ta.keys() == tb.keys()
    for name in ta:
        assert torch.allclose(ta[name].double(), tb[name].double(), rtol=1e-4, atol=1e-5), name


def config_file(tmp_path: Path, monitor: bool = True, objective: str = "barlow_twins") -> Path:
    """Barlow Twins, or SimCLR (whose gradients are ~30x smaller here, hence the larger lr)."""
    path = tmp_path / "teacher.yaml"
    path.write_text(CONFIG.format(indices=list(range(128)), objective=objective,
                                  lr=5e-3 if objective == "barlow_twins" else 0.1,
                                  monitor="{name: digits, split: test}" if monitor else "null"))
    return path


def one_process(config: Path, out: Path) -> TeacherConfig:
    """The config `mkdt teacher --config FILE --out OUT --device cpu --seed 0` resolves to."""
    return resolve(TeacherConfig, section="teacher", files=[str(config)],
                   values={"out": str(out), "device": "cpu", "seed": 0})


def test_two_processes_train_the_one_process_teacher_and_only_rank0_writes(torchrun, tmp_path):
    config = config_file(tmp_path)
    single = train_teacher(one_process(config, tmp_path / "one"))

    launch(torchrun, tmp_path, config, tmp_path / "two")
    stage = tmp_path / "two" / "teacher"
    assert_same_teacher(tmp_path / "one", tmp_path / "two")
    record = load_json(stage / "stage.json")
    assert record["world_size"] == 2
    other = load_json(tmp_path / "one" / "teacher" / "stage.json")
    assert {**record["config"], "out": None} == {**other["config"], "out": None}  # the CLI resolved the same config
    one, two = log_of(tmp_path / "one"), log_of(tmp_path / "two")
    assert [r["epoch"] for r in two] == [0, 1, 2]
    for a, b in zip(one[1:], two[1:]):  # global-batch losses of every epoch
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    assert abs(two[-1]["knn"] - one[-1]["knn"]) <= 0.01 and two[0]["knn"] == one[0]["knn"]
    assert not (stage / "checkpoint.safetensors").exists()
    assert single.summary["knn"] == one[-1]["knn"]

    rank0, rank1 = writes(tmp_path, 0), writes(tmp_path, 1)
    assert rank1 == []
    for name in ("config.yaml", "checkpoint.safetensors", "log.jsonl", "teacher.safetensors", "stage.json"):
        assert name in rank0, name


def test_two_processes_resume_a_one_process_checkpoint_simclr(torchrun, tmp_path):
    config = config_file(tmp_path, monitor=False, objective="simclr")
    train_teacher(one_process(config, tmp_path / "one"))

    def stop_after_first(epoch, record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_teacher(one_process(config, tmp_path / "two"), on_epoch_end=stop_after_first)
    assert (tmp_path / "two" / "teacher" / "checkpoint.safetensors").is_file()
    launch(torchrun, tmp_path, config, tmp_path / "two")  # epoch 2 under DDP, from the one-process checkpoint
    assert_same_teacher(tmp_path / "one", tmp_path / "two")
    assert [r["epoch"] for r in log_of(tmp_path / "two")] == [1, 2]


def test_each_rank_takes_a_contiguous_block_of_every_batch():
    model = build_model("convnet", depth=1, width=4, in_channels=3, resolution=8)
    trainer = SSLTrainer(model, ObjectiveConfig(projector_hidden=8, projector_out=8), SSLSchedule(batch_size=64),
                         BatchAugment(AugmentConfig(), (0.5,) * 3, (0.25,) * 3), seed=0, device=torch.device("cpu"))
    assert trainer.shard_rows(64) == slice(0, 64)
    trainer.ctx = DistContext(rank=1, world_size=2, backend="gloo")  # only the row arithmetic is used
    assert trainer.shard_rows(64) == slice(32, 64)
    with pytest.raises(MkdtError, match="multiple of the number of processes"):
        trainer.shard_rows(63)

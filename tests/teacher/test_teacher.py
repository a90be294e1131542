"""The teacher and targets stages end to end on digits with a tiny backbone."""

import json
import warnings

import pytest
from helpers import stage_status
import torch

from mkdt.artifacts import load_tensors, read_metadata
from mkdt.data import DataConfig, load_dataset
from mkdt.errors import MkdtError
from mkdt.formats import load_targets
from mkdt.models import ModelConfig
from mkdt.ssl import ObjectiveConfig, SSLSchedule
from mkdt.teacher import TargetsConfig, TeacherConfig, compute_targets, load_teacher, train_teacher
from mkdt.teacher.targets import _warn_normalisation

SUBSET = list(range(128))


def data_cfg(**kw):
    return DataConfig(name="digits", resolution=16, channels=3, indices=SUBSET, **kw)


def teacher_cfg(out, epochs=1, seed=0, monitor=True):
    return TeacherConfig(
        seed=seed, device="cpu", out=str(out), data=data_cfg(),
        monitor=DataConfig(name="digits", split="test") if monitor else None,
        model=ModelConfig(name="convnet", depth=2, width=8),
        objective=ObjectiveConfig(projector_hidden=16, projector_out=32),
        schedule=SSLSchedule(epochs=epochs, batch_size=64, lr=2e-3, lr_schedule="onecycle"),
        knn_k=20)


def teacher_tensors(out):
    return load_tensors(out / "teacher" / "teacher.safetensors")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    result = train_teacher(teacher_cfg(out))
    return out, result


def test_teacher_written_with_metadata_and_log(trained):
    out, result = trained
    path = out / "teacher" / "teacher.safetensors"
    assert stage_status(out / "teacher") == "done"
    assert not (out / "teacher" / "checkpoint.safetensors").exists()
    meta = read_metadata(path)
    data = load_dataset(data_cfg())
    assert meta["fingerprint"] == data.fingerprint() and meta["resolution"] == 16 and meta["in_channels"] == 3
    assert meta["mean"] == list(data.mean) and meta["feature_dim"] == 128
    assert all(k not in meta for k in ("projector",)) and not any("projector" in k for k in teacher_tensors(out))
    model, loaded_meta = load_teacher(path)
    assert not model.training and loaded_meta == meta
    log = [json.loads(line) for line in (out / "teacher" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1]
    assert 0.0 <= log[1]["knn"] <= 1.0 and log[1]["loss"] > 0
    assert result.summary["knn"] == log[1]["knn"]


def test_rerun_is_a_noop(trained):
    out, result = trained
    stamp = (out / "teacher" / "teacher.safetensors").stat().st_mtime_ns
    again = train_teacher(teacher_cfg(out))
    assert again.status == "reused" and again.summary == result.summary
    assert (out / "teacher" / "teacher.safetensors").stat().st_mtime_ns == stamp


def test_targets_written_and_refused_for_other_data(trained):
    out, _ = trained
    result = compute_targets(TargetsConfig(out=str(out), device="cpu", data=data_cfg(), batch_size=50))
    path = out / "targets" / "targets.safetensors"
    data = load_dataset(data_cfg())
    targets = load_targets(path, fingerprint=data.fingerprint(), count=len(SUBSET))
    assert targets.values.shape == (len(SUBSET), 128) and result.summary["dim"] == 128
    model, _ = load_teacher(out / "teacher" / "teacher.safetensors")
    with torch.no_grad():
        direct = model.features(data.normalize(data.images[:5]))
    assert torch.allclose(targets.values[:5], direct, atol=1e-5)
    other = load_dataset(DataConfig(name="digits", resolution=16, channels=3, indices=list(range(1, 129))))
    with pytest.raises(MkdtError, match="fingerprint"):
        load_targets(path, fingerprint=other.fingerprint())
    stamp = path.stat().st_mtime_ns
    compute_targets(TargetsConfig(out=str(out), device="cpu", data=data_cfg(), batch_size=50))
    assert path.stat().st_mtime_ns == stamp


def test_targets_refuse_a_teacher_of_other_shape(trained, tmp_path):
    out, _ = trained
    cfg = TargetsConfig(out=str(tmp_path), device="cpu", teacher=str(out / "teacher" / "teacher.safetensors"),
                        data=DataConfig(name="digits", channels=3))  # 8 px, the teacher wants 16 px
    with pytest.raises(MkdtError, match="data.resolution=16"):
        compute_targets(cfg)
    assert not (tmp_path / "targets" / "targets.safetensors").exists()


def test_targets_warn_when_normalisation_differs(trained):
    out, _ = trained
    path = out / "teacher" / "teacher.safetensors"
    data = load_dataset(data_cfg())
    meta = {**read_metadata(path), "mean": [0.9, 0.9, 0.9]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _warn_normalisation(meta, data, path)
        _warn_normalisation(read_metadata(path), data, path)
    assert len(caught) == 1 and "statistics" in str(caught[0].message)


def test_load_teacher_checks_sha256(trained, tmp_path):
    out, _ = trained
    src = out / "teacher" / "teacher.safetensors"
    copy = tmp_path / "t.safetensors"
    copy.write_bytes(src.read_bytes())
    load_teacher(copy)  # no side file: nothing to check
    (tmp_path / "t.safetensors.sha256").write_text("0" * 64 + "  t.safetensors\n")
    with pytest.raises(MkdtError, match="sha256"):
        load_teacher(copy)


def test_resume_after_interrupt_equals_uninterrupted_run(tmp_path):
    train_teacher(teacher_cfg(tmp_path / "full", epochs=2, monitor=False))

    def stop_after_first(epoch, record):
        raise KeyboardInterrupt

    cfg = teacher_cfg(tmp_path / "resumed", epochs=2, monitor=False)
    with pytest.raises(KeyboardInterrupt):
        train_teacher(cfg, on_epoch_end=stop_after_first)
    assert (tmp_path / "resumed" / "teacher" / "checkpoint.safetensors").is_file()
    assert stage_status(tmp_path / "resumed" / "teacher") == "running"
    seen = []
    train_teacher(cfg, on_epoch_end=lambda e, r: seen.append(e))
    assert seen == [2]
    full, resumed = teacher_tensors(tmp_path / "full"), teacher_tensors(tmp_path / "resumed")
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_same_seed_same_teacher_other_seed_other(trained, tmp_path):
    out, _ = trained  # seed 0, with the kNN monitor (which must not touch the weights)
    train_teacher(teacher_cfg(tmp_path / "same", seed=0, monitor=False))
    train_teacher(teacher_cfg(tmp_path / "other", seed=1, monitor=False))
    a, b, c = teacher_tensors(out), teacher_tensors(tmp_path / "same"), teacher_tensors(tmp_path / "other")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)

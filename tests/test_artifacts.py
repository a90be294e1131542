import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from mkdt import artifacts
from mkdt.artifacts import (RunDir, TensorSpec, atomic_path, load_json, load_state_file, load_tensors, read_metadata,
                            save_json, save_tensors)
from mkdt.errors import MkdtError


def test_tensors_round_trip_with_metadata(tmp_path):
    path = tmp_path / "a.safetensors"
    save_tensors(path, {"x": torch.arange(6.0).view(2, 3), "i": torch.tensor([1, 2])}, {"note": "hi", "n": 2})
    out = load_tensors(path, {"x": TensorSpec(shape=(2, None), dtype=torch.float32)})
    assert torch.equal(out["x"], torch.arange(6.0).view(2, 3))
    assert read_metadata(path) == {"note": "hi", "n": 2}


def test_saved_tensor_is_a_copy_not_a_view(tmp_path):
    path = tmp_path / "a.safetensors"
    base = torch.zeros(4)
    save_tensors(path, {"x": base[:2]})
    base += 1
    assert torch.equal(load_tensors(path)["x"], torch.zeros(2))


@pytest.mark.parametrize("spec, message", [
    (TensorSpec(shape=(3, 3)), "shape"),
    (TensorSpec(dtype=torch.int64), "dtype"),
])
def test_load_checks_shape_and_dtype_naming_the_file(tmp_path, spec, message):
    path = tmp_path / "a.safetensors"
    save_tensors(path, {"x": torch.zeros(2, 3)})
    with pytest.raises(MkdtError, match=message) as err:
        load_tensors(path, {"x": spec})
    assert str(path) in str(err.value)


def test_missing_tensor_and_missing_file_are_named(tmp_path):
    path = tmp_path / "a.safetensors"
    save_tensors(path, {"x": torch.zeros(1)})
    with pytest.raises(MkdtError, match="missing tensor 'y'"):
        load_tensors(path, {"y": TensorSpec()})
    with pytest.raises(MkdtError, match="nope.safetensors"):
        load_tensors(tmp_path / "nope.safetensors")


def test_nan_is_never_saved(tmp_path):
    path = tmp_path / "a.safetensors"
    with pytest.raises(MkdtError, match="NaN"):
        save_tensors(path, {"x": torch.tensor([1.0, float("nan")])})
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_corrupt_file_is_reported(tmp_path):
    path = tmp_path / "a.safetensors"
    path.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(MkdtError, match="not a readable safetensors"):
        load_tensors(path)


def test_interrupted_write_keeps_old_artifact(tmp_path, monkeypatch):
    path = tmp_path / "a.safetensors"
    save_tensors(path, {"x": torch.ones(3)})

    def half_write(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(artifacts, "save_file", half_write)
    with pytest.raises(KeyboardInterrupt):
        save_tensors(path, {"x": torch.zeros(3)})
    assert torch.equal(load_tensors(path)["x"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


def test_killed_writer_leaves_old_or_new_never_partial(tmp_path):
    """A process killed (SIGKILL) while rewriting a JSON artifact leaves a readable file."""
    path = tmp_path / "meta.json"
    save_json(path, {"round": -1})
    script = textwrap.dedent(f"""
        from mkdt.artifacts import save_json
        i = 0
        while True:
            save_json({str(path)!r}, {{"round": i, "payload": "x" * 200000}})
            i += 1
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        import time
        deadline = time.time() + 10
        while time.time() < deadline and json.loads(path.read_text()).get("round", -1) < 3:
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    data = load_json(path)
    assert data["round"] >= 3


def test_atomic_path_cleans_up_on_error(tmp_path):
    target = tmp_path / "f.bin"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"abc")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_stage_done_only_after_finish_and_for_same_config(tmp_path):
    stage = RunDir(tmp_path / "run").stage("teacher")
    assert not stage.is_done()
    stage.finish({"epochs": 3}, summary={"ok": True})
    assert stage.is_done()
    assert stage.is_done({"epochs": 3})
    assert not stage.is_done({"epochs": 4})
    assert stage.record()["summary"] == {"ok": True}
    assert "torch" in stage.record()["environment"]
    stage.invalidate()
    assert not stage.is_done()


def test_load_state_file_reads_torch_files_weights_only(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"state_dict": {"a": torch.ones(2)}}, path)
    assert torch.equal(load_state_file(path)["a"], torch.ones(2))
    bad = tmp_path / "bad.pt"
    torch.save({"a": object.__new__(type("Evil", (), {}))}, bad) if False else bad.write_bytes(b"not a torch file")
    with pytest.raises(MkdtError, match="bad.pt"):
        load_state_file(bad)


def test_invalid_json_is_reported(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("{not json")
    with pytest.raises(MkdtError, match="x.json"):
        load_json(path)

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from mkdt import artifacts
from mkdt.artifacts import (TensorSpec, atomic_path, load_json, load_state_file, load_tensors, read_metadata,
                            remove_orphans, save_json, save_tensors)
from mkdt.errors import ArtifactIOError, MkdtError


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

    real_replace = os.replace

    def interrupted_rename(src, dst):
        with open(src, "wb") as fh:  # the new file is half written when the interruption comes
            fh.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(artifacts.os, "replace", interrupted_rename)
    with pytest.raises(KeyboardInterrupt):
        save_tensors(path, {"x": torch.zeros(3)})
    monkeypatch.setattr(artifacts.os, "replace", real_replace)
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


def test_changed_contents_or_metadata_are_refused_on_load(tmp_path):
    """Every artifact carries a digest of its tensors and metadata: an edited mean/std (same file size) is refused."""
    path = tmp_path / "set.safetensors"
    save_tensors(path, {"x": torch.ones(4)}, {"mean": [0.4914], "std": [0.247]})
    raw = path.read_bytes()
    edited = raw.replace(b"0.4914", b"0.4915")
    assert len(edited) == len(raw) and edited != raw
    path.write_bytes(edited)
    with pytest.raises(MkdtError, match="do not match the digest"):
        load_tensors(path)


def test_artifact_modes_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        save_tensors(tmp_path / "a.safetensors", {"x": torch.ones(1)})
        save_json(tmp_path / "a.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "a.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644


def test_orphan_temp_files_are_removed(tmp_path):
    (tmp_path / "sub").mkdir()
    orphans = [tmp_path / ".a.safetensors.x1y2.tmp", tmp_path / "sub" / ".b.json.abc.tmp"]
    for p in orphans:
        p.write_bytes(b"half")
    keep = tmp_path / "kept.safetensors"
    keep.write_bytes(b"x")
    assert sorted(remove_orphans(tmp_path)) == sorted(orphans)
    assert keep.is_file() and not any(p.exists() for p in orphans)


@pytest.mark.parametrize("errno_value, cause", [(30, "read-only file system"), (28, "no space left"),
                                               (27, "file too large"), (13, "permission denied")])
def test_file_system_failures_are_one_line_naming_the_path(tmp_path, monkeypatch, errno_value, cause):
    def fail(src, dst):
        raise OSError(errno_value, os.strerror(errno_value))

    monkeypatch.setattr(artifacts.os, "replace", fail)
    path = tmp_path / "a.safetensors"
    with pytest.raises(ArtifactIOError) as err:
        save_tensors(path, {"x": torch.ones(1)})
    text = str(err.value)
    assert str(path) in text and cause in text and "\n" not in text and "--out" in text
    assert list(tmp_path.iterdir()) == []


def test_file_size_limit_is_a_one_line_error_not_a_traceback(tmp_path):
    """A real EFBIG: the writer runs under a 64 KB file-size limit (SIGXFSZ ignored, as in a shell with ulimit -f)."""
    script = textwrap.dedent(f"""
        import resource, signal, sys, torch
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
        from mkdt.artifacts import save_tensors
        from mkdt.errors import ArtifactIOError
        try:
            save_tensors({str(tmp_path / 'big.safetensors')!r}, {{"x": torch.zeros(100000)}})
        except ArtifactIOError as exc:
            print(exc)
            sys.exit(3)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr
    assert "big.safetensors: file too large" in done.stdout
    assert not list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob(".*.tmp"))


def test_a_pickle_is_refused_in_one_line_of_ours(tmp_path):
    class Evil:  # a file a user might be handed: unpickling it would call print (or anything else)
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "evil.pt"
    torch.save({"w": Evil()}, bad)
    with pytest.raises(MkdtError) as err:
        load_state_file(bad)
    text = str(err.value)
    assert "evil.pt" in text and "\n" not in text and "weights_only=False" not in text

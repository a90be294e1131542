"""The decode cache: hits, invalidation, corruption, location and read-only safety."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from mkdt.data import load_dataset
from mkdt.data import cache as cache_mod
from mkdt.data.sources import decode as decode_mod
from mkdt.data.sources import idx as idx_mod
from mkdt.data.sources import imagefolder as imf


def _forbid_decoding(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("decoded again although the cache should have been used")

    monkeypatch.setattr(decode_mod, "decode_image", boom)


def _count_decodes(monkeypatch) -> list[int]:
    calls = [0]
    real = decode_mod.decode_image

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(decode_mod, "decode_image", counting)
    return calls


@pytest.mark.parametrize("kind", ["folder", "tar"])
def test_second_load_hits_the_cache(kind, image_folder, image_tar, monkeypatch):
    root = str(image_folder if kind == "folder" else image_tar)
    first = [load_dataset("imagefolder", root=root, split=s) for s in ("train", "test")]
    _forbid_decoding(monkeypatch)
    again = [load_dataset("imagefolder", root=root, split=s) for s in ("train", "test")]
    for a, b in zip(first, again):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
        assert (a.class_names, a.mean, a.std, a.name) == (b.class_names, b.mean, b.std, b.name)


def test_tar_is_read_once_for_all_splits(image_tar, monkeypatch):
    calls = []
    real = imf.scan_tar
    monkeypatch.setattr(imf, "scan_tar", lambda path: calls.append(path) or real(path))
    load_dataset("imagefolder", root=str(image_tar), split="test")
    load_dataset("imagefolder", root=str(image_tar), split="train")
    assert len(calls) == 1


def test_cache_entry_files_and_sidecar(image_tar, isolated_cache):
    load_dataset("imagefolder", root=str(image_tar))
    sidecars = sorted(isolated_cache.glob("*.json"))
    assert [p.name.split("-")[1] for p in sidecars] == ["test", "train"]
    meta = json.loads(sidecars[1].read_text())
    assert meta["key"]["source"] == "imagefolder" and meta["key"]["root"] == str(image_tar.resolve())
    assert meta["key"]["signature"]["size"] == image_tar.stat().st_size
    assert meta["shape"] == [6, 3, 8, 8] and meta["class_names"] == ["cat", "dog", "emu"]
    assert not list(isolated_cache.glob("*.tmp"))


def test_changed_source_file_rebuilds(tmp_path, kit, monkeypatch):
    root = kit.make_idx_folder(tmp_path / "mnist")
    first = load_dataset("idx", root=str(root))
    # same size, new content and time: the signature changes, so the entry is stale
    kit.write_idx(root / "train-labels-idx1-ubyte.gz", (torch.arange(12).numpy() + 1) % 10, 2049)
    os.utime(root / "train-labels-idx1-ubyte.gz", ns=(1, 1))
    second = load_dataset("idx", root=str(root))
    assert second.labels.tolist() == ((first.labels + 1) % 10).tolist()


def test_corrupt_entries_are_rebuilt(image_folder, isolated_cache, monkeypatch):
    ref = load_dataset("imagefolder", root=str(image_folder))
    images = next(p for p in isolated_cache.glob("imagefolder-train-*.npy") if ".labels" not in p.name)
    sidecar = images.with_suffix(".json")

    images.write_bytes(images.read_bytes()[:-10])  # truncated data file
    calls = _count_decodes(monkeypatch)
    assert torch.equal(load_dataset("imagefolder", root=str(image_folder)).images, ref.images)
    assert calls[0] == 6

    sidecar.write_text("{ not json")  # unreadable sidecar
    assert torch.equal(load_dataset("imagefolder", root=str(image_folder)).images, ref.images)
    assert calls[0] == 12

    meta = json.loads(sidecar.read_text())
    meta["key"]["version"] = -1  # written by another format version
    sidecar.write_text(json.dumps(meta))
    load_dataset("imagefolder", root=str(image_folder))
    assert calls[0] == 18
    load_dataset("imagefolder", root=str(image_folder))
    assert calls[0] == 18


def test_resolution_keys_imagefolder_entries(image_tar, isolated_cache):
    load_dataset("imagefolder", root=str(image_tar))
    load_dataset("imagefolder", root=str(image_tar), resolution=4)
    assert len(list(isolated_cache.glob("imagefolder-train-*.json"))) == 2


def test_cached_tensors_cannot_change_the_cache(image_folder):
    a = load_dataset("imagefolder", root=str(image_folder))
    b = load_dataset("imagefolder", root=str(image_folder))
    b.images.zero_()  # copy-on-write mapping: private to this tensor
    c = load_dataset("imagefolder", root=str(image_folder))
    assert torch.equal(a.images, c.images) and int(c.images.max()) > 0


def test_cache_dir_precedence(tmp_path, image_folder, monkeypatch):
    env_dir, cfg_dir = tmp_path / "env", tmp_path / "cfg"
    monkeypatch.setenv("MKDT_CACHE_DIR", str(env_dir))
    load_dataset("imagefolder", root=str(image_folder), cache_dir=str(cfg_dir))
    assert list(cfg_dir.glob("*.json")) and not env_dir.exists()
    load_dataset("imagefolder", root=str(image_folder))
    assert list(env_dir.glob("*.json"))
    monkeypatch.delenv("MKDT_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_mod.cache_dir() == Path(tmp_path / "home" / ".cache" / "mkdt" / "data")


def test_unwritable_cache_warns_and_still_loads(image_folder, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder should be")
    with pytest.warns(UserWarning, match="data cache"):
        ds = load_dataset("imagefolder", root=str(image_folder), cache_dir=str(blocker / "cache"))
    assert len(ds) == 6


def test_digits_is_not_cached(isolated_cache):
    load_dataset("digits", split="test")
    assert not list(isolated_cache.iterdir())


def test_statistics_are_computed_once_per_source(tmp_path, kit, monkeypatch):
    root = kit.make_idx_folder(tmp_path / "mnist")
    load_dataset("idx", root=str(root), split="test")  # builds train too, for its statistics
    monkeypatch.setattr(idx_mod, "read_idx", lambda *a: (_ for _ in ()).throw(AssertionError("re-read")))
    train = load_dataset("idx", root=str(root))
    test = load_dataset("idx", root=str(root), split="test")
    assert train.mean == test.mean and len(train) == 12


def test_added_image_in_a_folder_rebuilds(folder_factory, kit):
    root = folder_factory()
    assert len(load_dataset("imagefolder", root=str(root))) == 6
    kit.write_image(root / "train" / "emu" / "09.png", kit.solid(250))
    ds = load_dataset("imagefolder", root=str(root))
    assert len(ds) == 7 and ds.labels.tolist()[-2:] == [2, 2]

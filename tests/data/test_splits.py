"""Labelled splits: sizes, class coverage, determinism, validation and the JSON record."""

from __future__ import annotations

import json

import pytest
import torch

from mkdt.data import labelled_split, load_split, save_split
from mkdt.errors import MkdtError

# 10 classes of unequal size: 5, 15, 25, ..., 95 images (500 in total), interleaved.
_SORTED = torch.cat([torch.full((5 + 10 * c,), c) for c in range(10)])
LABELS = _SORTED[torch.randperm(500, generator=torch.Generator().manual_seed(1))]


def test_stratified_sizes_and_every_class_present():
    idx = labelled_split(LABELS, 10, seed=0)
    counts = torch.bincount(LABELS[idx], minlength=10).tolist()
    # round-half-up of 10% of 5, 15, 25, ... with at least one per class
    assert counts == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert idx.dtype == torch.int64 and torch.equal(idx, torch.sort(idx).values) and len(set(idx.tolist())) == 55


def test_stratified_keeps_one_per_class_at_tiny_percent():
    idx = labelled_split(LABELS, 0.01, seed=3)
    assert sorted(LABELS[idx].tolist()) == list(range(10))


def test_uniform_size_and_range():
    idx = labelled_split(LABELS, 1, seed=0, mode="uniform")
    assert len(idx) == 5 and int(idx.max()) < 500
    assert len(labelled_split(LABELS, 0.01, seed=0, mode="uniform")) == 1
    assert torch.equal(labelled_split(LABELS, 100, mode="uniform"), torch.arange(500))


@pytest.mark.parametrize("mode", ["stratified", "uniform"])
def test_same_seed_same_indices_other_seed_differs(mode):
    a = labelled_split(LABELS, 20, seed=7, mode=mode)
    b = labelled_split(LABELS.tolist(), 20, seed=7, mode=mode)
    c = labelled_split(LABELS, 20, seed=8, mode=mode)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("percent", [0, -1, 100.5, float("nan"), True, "5"])
def test_invalid_percent(percent):
    with pytest.raises(MkdtError, match="percent"):
        labelled_split(LABELS, percent)


def test_invalid_mode_and_empty_labels():
    with pytest.raises(MkdtError, match="mode"):
        labelled_split(LABELS, 5, mode="random")
    with pytest.raises(MkdtError, match="empty"):
        labelled_split(torch.zeros(0, dtype=torch.int64), 5)


def test_save_and_load_round_trip(tmp_path):
    path = tmp_path / "splits" / "labelled-10.json"
    idx = labelled_split(LABELS, 10, seed=0)
    meta = {"percent": 10, "seed": 0, "mode": "stratified", "fingerprint": "abc123"}
    save_split(path, idx, meta)
    record = json.loads(path.read_text())
    assert record["indices"] == idx.tolist() and record["fingerprint"] == "abc123"
    loaded, got_meta = load_split(path, fingerprint="abc123")
    assert torch.equal(loaded, idx) and loaded.dtype == torch.int64 and got_meta == meta
    assert not list(path.parent.glob("*.tmp"))


def test_load_refuses_other_data_and_bad_files(tmp_path):
    path = tmp_path / "split.json"
    save_split(path, [3, 1], {"fingerprint": "aaa"})
    with pytest.raises(MkdtError, match="fingerprint aaa"):
        load_split(path, fingerprint="bbb")
    path.write_text(json.dumps({"indices": [1, -2]}))
    with pytest.raises(MkdtError, match=str(path)):
        load_split(path)
    path.write_text(json.dumps({"indices": [1, 1]}))
    with pytest.raises(MkdtError, match="repeat"):
        load_split(path)
    with pytest.raises(MkdtError, match="missing.json"):
        load_split(tmp_path / "missing.json")

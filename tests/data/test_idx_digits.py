"""The IDX (MNIST-format) and digits sources."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from mkdt.data import load_dataset
from mkdt.data.sources.idx import FASHION_CLASSES
from mkdt.errors import MkdtError


@pytest.mark.parametrize("compress", [True, False])
def test_idx_loads_train_and_test(tmp_path, kit, compress):
    root = kit.make_idx_folder(tmp_path / "mnist", compress=compress)
    train = load_dataset("idx", root=str(root))
    test = load_dataset("idx", root=str(root), split="test")
    assert train.images.shape == (12, 1, 6, 5) and test.images.shape == (5, 1, 6, 5)
    assert train.labels.tolist() == [i % 10 for i in range(12)]
    assert train.class_names == [str(i) for i in range(10)] and train.name == "idx:train"
    raw = gzip.decompress((root / "train-images-idx3-ubyte.gz").read_bytes()) if compress else \
        (root / "train-images-idx3-ubyte").read_bytes()
    assert train.images.flatten().tolist() == list(raw[16:])
    assert test.mean == train.mean


def test_idx_fashion_class_names(tmp_path, kit):
    root = kit.make_idx_folder(tmp_path / "Fashion-MNIST")
    assert load_dataset("idx", root=str(root)).class_names == FASHION_CLASSES


def test_idx_wrong_magic_names_the_file(tmp_path, kit):
    root = kit.make_idx_folder(tmp_path / "mnist")
    bad = root / "train-images-idx3-ubyte.gz"
    kit.write_idx(bad, np.zeros((3, 4, 4)), 2049)  # a labels magic in the images file
    with pytest.raises(MkdtError) as err:
        load_dataset("idx", root=str(root))
    assert str(bad) in str(err.value) and "2051" in str(err.value)


def test_idx_truncated_file_names_it(tmp_path, kit):
    root = kit.make_idx_folder(tmp_path / "mnist", compress=False)
    bad = root / "t10k-images-idx3-ubyte"
    bad.write_bytes(bad.read_bytes()[:-7])
    with pytest.raises(MkdtError) as err:
        load_dataset("idx", root=str(root), split="test")
    assert str(bad) in str(err.value) and "truncated" in str(err.value)


def test_idx_corrupt_gzip_names_it(tmp_path, kit):
    root = kit.make_idx_folder(tmp_path / "mnist")
    bad = root / "train-labels-idx1-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:12])
    with pytest.raises(MkdtError, match="train-labels-idx1-ubyte.gz"):
        load_dataset("idx", root=str(root))


def test_idx_missing_file_is_named(tmp_path, kit):
    root = kit.make_idx_folder(tmp_path / "mnist")
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(MkdtError, match="t10k-labels-idx1-ubyte"):
        load_dataset("idx", root=str(root), split="test")


def test_idx_label_count_mismatch(tmp_path, kit):
    root = kit.make_idx_folder(tmp_path / "mnist")
    kit.write_idx(root / "train-labels-idx1-ubyte.gz", np.zeros(3), 2049)
    with pytest.raises(MkdtError, match="3 labels for 12 images"):
        load_dataset("idx", root=str(root))


def test_digits_fixed_split():
    train, test, everything = (load_dataset("digits", split=s) for s in ("train", "test", "all"))
    assert (len(train), len(test), len(everything)) == (1437, 360, 1797)
    assert train.images.shape[1:] == (1, 8, 8) and train.images.dtype == torch.uint8
    assert int(everything.images.max()) == 255 and int(everything.images.min()) == 0
    assert sorted(train.labels.unique().tolist()) == list(range(10))
    # the split is a partition of the whole set, stable across calls
    assert torch.equal(load_dataset("digits").images, train.images)
    both = torch.cat([train.images, test.images]).flatten(1)
    assert len(torch.unique(both, dim=0)) == len(torch.unique(everything.images.flatten(1), dim=0))
    assert test.mean == train.mean and train.class_names == [str(i) for i in range(10)]

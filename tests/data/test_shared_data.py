"""The real data in ../shared/data (or $MKDT_SHARED_DATA); skipped when it is absent."""

from __future__ import annotations

import pytest
import torch

from mkdt.data import load_dataset

pytestmark = [pytest.mark.shared_data, pytest.mark.slow]

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]




def test_cifar10_jpeg_tar(kit, shared_cache):
    tar = kit.shared_file("cifar10-jpeg.tar.gz")
    train = load_dataset("imagefolder", root=str(tar), cache_dir=str(shared_cache))
    test = load_dataset("imagefolder", root=str(tar), split="test", cache_dir=str(shared_cache))
    assert train.images.shape == (50000, 3, 32, 32) and test.images.shape == (10000, 3, 32, 32)
    assert train.class_names == CIFAR_CLASSES and test.class_names == CIFAR_CLASSES
    assert torch.bincount(train.labels).tolist() == [5000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    # statistics of the train split, close to the published CIFAR-10 constants
    assert train.mean == test.mean
    assert train.mean == pytest.approx((0.4914, 0.4822, 0.4465), abs=0.005)
    assert train.std == pytest.approx((0.2470, 0.2435, 0.2616), abs=0.01)


def test_cifar10_jpeg_tar_second_load_is_fast(kit, shared_cache):
    import time

    tar = kit.shared_file("cifar10-jpeg.tar.gz")
    load_dataset("imagefolder", root=str(tar), cache_dir=str(shared_cache))  # decoded at most once per session
    start = time.perf_counter()
    train = load_dataset("imagefolder", root=str(tar), cache_dir=str(shared_cache))
    test = load_dataset("imagefolder", root=str(tar), split="test", cache_dir=str(shared_cache))
    assert time.perf_counter() - start < 2.0
    assert len(train) + len(test) == 60000


def test_fashion_mnist(kit, shared_cache):
    root = kit.shared_file("fashion-mnist")
    train = load_dataset("idx", root=str(root), cache_dir=str(shared_cache))
    test = load_dataset("idx", root=str(root), split="test", cache_dir=str(shared_cache))
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.class_names[0] == "T-shirt/top" and len(train.class_names) == 10
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert train.mean == pytest.approx((0.2860,), abs=0.001)

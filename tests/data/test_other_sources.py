"""Tiny ImageNet, CUB, Stanford Dogs, Aircraft, Flowers and CIFAR on small fake folders."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from mkdt.data import load_dataset
from mkdt.data.sources import torchvision_sets
from mkdt.errors import MkdtError


# ----------------------------------------------------------------------------------------------
# Tiny ImageNet
# ----------------------------------------------------------------------------------------------
def make_tiny_imagenet(root: Path, kit) -> Path:
    base = root / "tiny-imagenet-200"
    for w, wnid in enumerate(["n02", "n01"]):
        for i in range(2):
            kit.write_image(base / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", kit.solid(40 * w + 10 * i))
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("ignored\n")
    kit.write_image(base / "val" / "images" / "val_1.JPEG", kit.solid(200))
    kit.write_image(base / "val" / "images" / "val_0.JPEG", kit.solid(100, channels=1))
    (base / "val" / "val_annotations.txt").write_text("val_1.JPEG\tn02\t0\t0\t8\t8\nval_0.JPEG\tn01\t0\t0\t8\t8\n")
    (base / "words.txt").write_text("n01\tgoldfish, Carassius auratus\nn02\tgreat white shark\n")
    return base


def test_tinyimagenet_train_and_val(tmp_path, kit):
    make_tiny_imagenet(tmp_path, kit)
    train = load_dataset("tinyimagenet", root=str(tmp_path))  # the parent of tiny-imagenet-200 works too
    val = load_dataset("tinyimagenet", root=str(tmp_path / "tiny-imagenet-200"), split="test")
    assert train.class_names == ["goldfish", "great white shark"]
    assert train.labels.tolist() == [0, 0, 1, 1] and train.images.shape == (4, 3, 8, 8)
    assert val.name == "tinyimagenet:val" and val.labels.tolist() == [0, 1]
    assert val.images.shape == (2, 3, 8, 8)  # the grayscale val image was expanded
    assert val.mean == train.mean


def test_tinyimagenet_bad_annotation_names_the_line(tmp_path, kit):
    base = make_tiny_imagenet(tmp_path, kit)
    (base / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99\t0\t0\t8\t8\n")
    with pytest.raises(MkdtError, match=r"val_annotations.txt:1"):
        load_dataset("tinyimagenet", root=str(base), split="val")


def test_tinyimagenet_missing_train_folder(tmp_path):
    with pytest.raises(MkdtError, match="train"):
        load_dataset("tinyimagenet", root=str(tmp_path))


# ----------------------------------------------------------------------------------------------
# CUB-200-2011
# ----------------------------------------------------------------------------------------------
def make_cub(root: Path, kit) -> Path:
    base = root / "CUB_200_2011"
    files = ["001.Albatross/a1.jpg", "001.Albatross/a2.jpg", "002.Auklet/b1.jpg", "002.Auklet/b2.jpg"]
    sizes = [(20, 30), (16, 16), (9, 14), (25, 12)]
    for f, size in zip(files, sizes):
        kit.write_image(base / "images" / f, kit.solid(100, size=size))
    (base / "images.txt").write_text("".join(f"{i} {f}\n" for i, f in enumerate(files, 1)))
    (base / "image_class_labels.txt").write_text("1 1\n2 1\n3 2\n4 2\n")
    (base / "train_test_split.txt").write_text("1 1\n2 0\n3 1\n4 0\n")
    (base / "classes.txt").write_text("1 001.Albatross\n2 002.Auklet\n")
    return base


def test_cub_requires_resolution_and_resizes(tmp_path, kit):
    base = make_cub(tmp_path, kit)
    with pytest.raises(MkdtError, match="resolution"):
        load_dataset("cub200", root=str(base))
    train = load_dataset("cub200", root=str(tmp_path), resolution=8)
    test = load_dataset("cub200", root=str(base), split="test", resolution=8)
    assert train.images.shape == (2, 3, 8, 8) and test.images.shape == (2, 3, 8, 8)
    assert train.labels.tolist() == [0, 1] and train.class_names == ["Albatross", "Auklet"]


def test_cub_missing_index_file_is_named(tmp_path, kit):
    base = make_cub(tmp_path, kit)
    (base / "train_test_split.txt").unlink()
    with pytest.raises(MkdtError, match="train_test_split.txt"):
        load_dataset("cub200", root=str(base), resolution=8)


def test_cub_missing_image_is_named(tmp_path, kit):
    base = make_cub(tmp_path, kit)
    (base / "images" / "002.Auklet" / "b1.jpg").unlink()
    with pytest.raises(MkdtError, match="b1.jpg"):
        load_dataset("cub200", root=str(base), resolution=8)


# ----------------------------------------------------------------------------------------------
# Stanford Dogs
# ----------------------------------------------------------------------------------------------
def make_dogs(root: Path, kit) -> tuple[Path, list[str], list[str]]:
    train = ["n02-Beagle/b1.jpg", "n01-Chihuahua/c1.jpg"]
    test = ["n01-Chihuahua/c2.jpg", "n02-Beagle/b2.jpg", "n02-Beagle/b3.jpg"]
    for i, rel in enumerate(train + test):
        kit.write_image(root / "Images" / rel, kit.solid(30 * i, size=(10 + i, 12)))
    return root, train, test


def test_dogs_from_txt_lists(tmp_path, kit):
    root, train_files, test_files = make_dogs(tmp_path, kit)
    (root / "train_list.txt").write_text("\n".join(train_files))
    (root / "lists").mkdir()
    (root / "lists" / "test_list.txt").write_text("\n".join(f"{f} 0" for f in test_files))
    train = load_dataset("dogs", root=str(root), resolution=6)
    test = load_dataset("dogs", root=str(root), resolution=6, split="test")
    assert train.class_names == ["Chihuahua", "Beagle"] and train.labels.tolist() == [1, 0]
    assert test.labels.tolist() == [0, 1, 1] and test.images.shape == (3, 3, 6, 6)


def test_dogs_from_mat_lists(tmp_path, kit):
    scipy_io = pytest.importorskip("scipy.io")
    root, train_files, test_files = make_dogs(tmp_path, kit)
    # one entry in train: loadmat(squeeze_me=True) turns it into a scalar string
    for split, files in (("train", train_files[:1]), ("test", test_files)):
        scipy_io.savemat(str(root / f"{split}_list.mat"), {"file_list": np.array(files, dtype=object)})
    test = load_dataset("dogs", root=str(root), resolution=6, split="test")
    assert test.labels.tolist() == [0, 1, 1]
    assert load_dataset("dogs", root=str(root), resolution=6).labels.tolist() == [1]


def test_dogs_missing_lists_are_named(tmp_path, kit):
    root, _, _ = make_dogs(tmp_path, kit)
    with pytest.raises(MkdtError, match="train_list"):
        load_dataset("dogs", root=str(root), resolution=6)


# ----------------------------------------------------------------------------------------------
# torchvision-backed sets
# ----------------------------------------------------------------------------------------------
def test_aircraft_from_a_fake_folder(tmp_path, kit):
    data = tmp_path / "fgvc-aircraft-2013b" / "data"
    data.mkdir(parents=True)
    (data / "variants.txt").write_text("707-320\nA300B4\n")
    (data / "images_variant_train.txt").write_text("0001 A300B4\n0002 707-320\n")
    for i, size in ((1, (30, 40)), (2, (20, 10))):
        kit.write_image(data / "images" / f"{i:04d}.jpg", kit.solid(50 * i, size=size))
    ds = load_dataset("aircraft", root=str(tmp_path), resolution=4)
    assert ds.images.shape == (2, 3, 4, 4) and ds.labels.tolist() == [1, 0]
    assert ds.class_names == ["707-320", "A300B4"] and ds.name == "aircraft:train"


def test_flowers_missing_folder_and_fake_listing(tmp_path, kit, monkeypatch):
    with pytest.raises(MkdtError) as err:
        load_dataset("flowers102", root=str(tmp_path), resolution=8)
    assert str(tmp_path / "flowers-102") in str(err.value) and "download" in str(err.value)

    files = [kit.write_image(tmp_path / "flowers-102" / "jpg" / f"image_{i:05d}.jpg", kit.solid(9 * i, (20, 9)))
             for i in (1, 2, 3)]

    class FakeFlowers:
        classes = ["rose", "tulip"]

        def __init__(self, root, split, download):
            assert not download and Path(root) == tmp_path
            self._image_files, self._labels = files, [1, 0, 1]

    monkeypatch.setattr(torchvision_sets.Flowers102Source, "dataset_class", lambda self: FakeFlowers)
    ds = load_dataset("flowers102", root=str(tmp_path / "flowers-102"), resolution=8, split="val")
    assert ds.images.shape == (3, 3, 8, 8) and ds.labels.tolist() == [1, 0, 1] and ds.class_names == ["rose", "tulip"]


def test_cifar_missing_files_says_where_and_does_not_download(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    def no_network(self):
        raise AssertionError("download attempted although download=False")

    monkeypatch.setattr(CIFAR10, "download", no_network)
    with pytest.raises(MkdtError) as err:
        load_dataset("cifar10", root=str(tmp_path))
    msg = str(err.value)
    assert str(tmp_path / "cifar-10-batches-py") in msg and "download=True" in msg and "data.download=true" in msg
    with pytest.raises(MkdtError, match="cifar-100-python"):
        load_dataset("cifar100", root=str(tmp_path), split="test")


def test_cifar_incomplete_folder_is_a_clear_error(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(MkdtError) as err:
        load_dataset("cifar10", root=str(tmp_path / "cifar-10-batches-py"))
    assert "cifar-10-batches-py" in str(err.value) and "\n" not in str(err.value)


def test_cifar_offline_download_fails_cleanly(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    def offline(self):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(CIFAR10, "download", offline)
    with pytest.raises(MkdtError, match="download failed"):
        load_dataset("cifar10", root=str(tmp_path), download=True)


def test_cifar_root_not_set():
    with pytest.raises(MkdtError, match="data.root"):
        load_dataset("cifar10")


def test_cifar_converts_nhwc_arrays(tmp_path, monkeypatch):
    (tmp_path / "cifar-10-batches-py").mkdir()

    class FakeCifar:
        def __init__(self, root, train, download):
            n = 3 if train else 2
            self.data = np.arange(n * 4 * 4 * 3, dtype=np.uint8).reshape(n, 4, 4, 3)
            self.targets = list(range(n))
            self.classes = ["a", "b", "c"]

    monkeypatch.setattr(torchvision_sets.Cifar10Source, "dataset_class", lambda self: FakeCifar)
    ds = load_dataset("cifar10", root=str(tmp_path), split="test")
    assert ds.images.shape == (2, 3, 4, 4) and ds.name == "cifar10:test"
    assert torch.equal(ds.images[1, :, 2, 3], torch.from_numpy(FakeCifar(None, False, False).data[1, 2, 3]))
    assert ds.mean == (0.4914, 0.4822, 0.4465) and ds.std == (0.2470, 0.2435, 0.2616)

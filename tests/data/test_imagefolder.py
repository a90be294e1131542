"""The imagefolder source, from a directory and from a tar archive, and its error messages."""

from __future__ import annotations

import tarfile

import pytest
import torch

from mkdt.data import load_dataset
from mkdt.errors import MkdtError


def _expected_train_values(layout):
    return [v for cls in sorted(layout["train"]) for v in layout["train"][cls]]


@pytest.mark.parametrize("kind", ["folder", "tar"])
def test_loads_both_splits_sorted_and_labelled(kind, image_folder, image_tar, kit):
    root = image_folder if kind == "folder" else image_tar
    train = load_dataset("imagefolder", root=str(root))
    test = load_dataset("imagefolder", root=str(root), split="test")
    assert train.name == "imagefolder:train" and train.class_names == ["cat", "dog", "emu"]
    assert train.images.shape == (6, 3, 8, 8) and train.images.dtype == torch.uint8
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 2]
    assert train.images[:, 0, 0, 0].tolist() == _expected_train_values(kit.layout)
    assert test.labels.tolist() == [0, 1, 2, 2] and test.class_names == train.class_names
    # train and test share the train split's statistics
    assert test.mean == train.mean and test.std == train.std
    mean = torch.tensor(_expected_train_values(kit.layout), dtype=torch.float64).mean() / 255
    assert train.mean[0] == pytest.approx(float(mean), abs=1e-6)


def test_folder_under_one_top_level_folder(tmp_path, kit):
    kit.make_image_folder(tmp_path / "outer" / "myset")
    ds = load_dataset("imagefolder", root=str(tmp_path / "outer"), split="test")
    assert len(ds) == 4


def test_tar_without_top_level_folder_and_plain_tar(tmp_path, kit):
    src = kit.make_image_folder(tmp_path / "src")
    for name in ("flat.tar", "flat.tgz"):
        tar = kit.make_tar(src, tmp_path / name)  # members ./train/cat/00.png
        assert len(load_dataset("imagefolder", root=str(tar))) == 6


def test_same_content_same_pixels_folder_and_tar(image_folder, image_tar):
    a = load_dataset("imagefolder", root=str(image_folder))
    b = load_dataset("imagefolder", root=str(image_tar))
    assert a.fingerprint() == b.fingerprint() and torch.equal(a.labels, b.labels)


def test_grayscale_images_in_rgb_set_become_rgb(folder_factory, kit):
    root = folder_factory()
    kit.write_image(root / "train" / "cat" / "99.png", kit.solid(77, channels=1))
    ds = load_dataset("imagefolder", root=str(root))
    assert ds.channels == 3
    gray = ds.images[3]  # cat/99.png sorts after 00..02 within cat
    assert gray.shape == (3, 8, 8) and gray.unique().tolist() == [77]


def test_all_grayscale_set_stays_one_channel(tmp_path, kit):
    for i in range(3):
        kit.write_image(tmp_path / "g" / "train" / "a" / f"{i}.png", kit.solid(i * 50, channels=1))
    ds = load_dataset("imagefolder", root=str(tmp_path / "g"))
    assert ds.channels == 1 and len(ds.mean) == 1
    assert load_dataset("imagefolder", root=str(tmp_path / "g"), channels=3).channels == 3


def test_mixed_sizes_need_resolution(folder_factory, kit):
    root = folder_factory()
    odd = kit.write_image(root / "train" / "dog" / "50.png", kit.solid(90, size=(12, 10)))
    with pytest.raises(MkdtError) as err:
        load_dataset("imagefolder", root=str(root))
    assert str(odd) in str(err.value) and "resolution" in str(err.value)
    ds = load_dataset("imagefolder", root=str(root), resolution=6)
    assert ds.images.shape == (7, 3, 6, 6)


def test_resolution_on_uniform_set_matches_resizing_later(image_tar):
    native = load_dataset("imagefolder", root=str(image_tar))
    small = load_dataset("imagefolder", root=str(image_tar), resolution=5)
    assert torch.equal(small.images, native.resized(5).images)


def test_missing_split_lists_found_splits(image_folder, image_tar):
    for root in (image_folder, image_tar):
        with pytest.raises(MkdtError) as err:
            load_dataset("imagefolder", root=str(root), split="val")
        msg = str(err.value)
        assert "'val'" in msg and "test, train" in msg and str(root) in msg


def test_missing_root_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "set.tar.gz"
    with pytest.raises(MkdtError) as err:
        load_dataset("imagefolder", root=str(missing))
    assert str(missing) in str(err.value) and "not found" in str(err.value)


def test_root_not_set_says_what_to_pass():
    with pytest.raises(MkdtError, match="data.root"):
        load_dataset("imagefolder")


def test_non_archive_file_is_refused(tmp_path):
    bad = tmp_path / "images.zip"
    bad.write_bytes(b"PK")
    with pytest.raises(MkdtError, match="images.zip"):
        load_dataset("imagefolder", root=str(bad))


def test_corrupt_jpeg_in_folder_names_the_file(folder_factory):
    root = folder_factory()
    bad = root / "train" / "dog" / "05.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with pytest.raises(MkdtError) as err:
        load_dataset("imagefolder", root=str(root))
    msg = str(err.value)
    assert str(bad) in msg and "remove or replace" in msg and "\n" not in msg


def test_truncated_jpeg_in_tar_names_the_member(tmp_path, kit):
    src = kit.make_image_folder(tmp_path / "src")
    good = kit.write_image(tmp_path / "x.jpg", torch.randint(0, 255, (3, 16, 16), dtype=torch.uint8))
    (src / "test" / "emu" / "07.jpg").write_bytes(good.read_bytes()[:150])
    tar = kit.make_tar(src, tmp_path / "set.tar.gz", arcname="myset")
    with pytest.raises(MkdtError) as err:
        load_dataset("imagefolder", root=str(tar), split="test")
    msg = str(err.value)
    assert "myset/test/emu/07.jpg" in msg and str(tar) in msg and "remove or replace" in msg


def test_empty_class_folder_is_named(folder_factory, tmp_path, kit):
    root = folder_factory()
    (root / "train" / "fox").mkdir()
    with pytest.raises(MkdtError) as err:
        load_dataset("imagefolder", root=str(root))
    assert str(root / "train" / "fox") in str(err.value)
    tar = kit.make_tar(root, tmp_path / "empty-class.tar", arcname="s")
    with pytest.raises(MkdtError) as err:
        load_dataset("imagefolder", root=str(tar))
    assert "s/train/fox" in str(err.value) and "no images" in str(err.value)


def test_image_outside_class_folder_is_refused(folder_factory, kit):
    root = folder_factory()
    stray = kit.write_image(root / "train" / "stray.png", kit.solid(1))
    with pytest.raises(MkdtError, match="stray.png"):
        load_dataset("imagefolder", root=str(root))


def test_non_image_and_hidden_files_are_ignored(folder_factory, tmp_path, kit):
    root = folder_factory()
    (root / "train" / "cat" / "notes.txt").write_text("hi")
    (root / "train" / "cat" / "._00.png").write_bytes(b"junk")
    (root / "README.md").write_text("readme")
    assert len(load_dataset("imagefolder", root=str(root))) == 6
    tar = kit.make_tar(root, tmp_path / "with-junk.tar.gz", arcname="s")
    assert len(load_dataset("imagefolder", root=str(tar))) == 6


def test_truncated_archive_is_a_clear_error(image_tar, tmp_path):
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(image_tar.read_bytes()[: len(image_tar.read_bytes()) // 2])
    with pytest.raises(MkdtError) as err:
        load_dataset("imagefolder", root=str(cut))
    assert str(cut) in str(err.value)


def test_wrong_archive_layout_names_the_member(tmp_path, kit):
    img = kit.write_image(tmp_path / "a.png", kit.solid(5))
    tar = tmp_path / "flat.tar"
    with tarfile.open(tar, "w") as tf:
        tf.add(img, arcname="train/a.png")
    with pytest.raises(MkdtError) as err:
        load_dataset("imagefolder", root=str(tar))
    assert "train/a.png" in str(err.value) and "<split>/<class>/<image>" in str(err.value)

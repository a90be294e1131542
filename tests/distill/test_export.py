"""``mkdt export``: the ImageFolder PNGs (read by mkdt and torchvision), the images.pt / labels.pt / lr.pt layout,
the manifest, and ``mkdt pretrain`` on an exported or hand-made .pt set with one-line errors for bad ones."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mkdt.artifacts import file_sha256
from mkdt.cli import main
from mkdt.data import DataConfig, load_dataset
from mkdt.distill import DistillConfig, ExportConfig, distill, export_distilled
from mkdt.errors import MkdtError
from mkdt.evaluate import PretrainConfig, pretrain
from mkdt.formats import load_pt_set, load_synthetic
from mkdt.models import ModelConfig
from mkdt.evaluate.pretraining import PretrainSchedule

TINY = ModelConfig(name="convnet", depth=1, width=4)


@pytest.fixture
def exported(config: DistillConfig):
    config = dataclasses.replace(config, iterations=3)
    distill(config)
    distilled = load_synthetic(Path(config.out) / "distill" / "distilled.safetensors")
    result = export_distilled(ExportConfig(out=config.out))
    return Path(config.out), distilled, result


def expected_pixels(distilled, i):
    m = torch.tensor(distilled.mean).view(-1, 1, 1)
    s = torch.tensor(distilled.std).view(-1, 1, 1)
    return ((distilled.images[i] * s + m).clamp(0, 1) * 255).round().to(torch.uint8)


def test_export_round_trip_and_manifest(exported):
    out, distilled, result = exported
    dest = out / "export"
    images = torch.load(dest / "images.pt", weights_only=True)
    labels = torch.load(dest / "labels.pt", weights_only=True)
    lr = torch.load(dest / "lr.pt", weights_only=True)
    assert torch.equal(images, distilled.images) and torch.equal(labels, distilled.targets)
    assert lr.dim() == 0 and float(lr) == pytest.approx(distilled.lr)
    pngs = sorted((dest / "train" / "synthetic").glob("*.png"))
    assert len(pngs) == len(distilled) == result.summary["png"]
    first = torch.from_numpy(np.array(Image.open(pngs[0])))[None]  # 1-channel digits
    assert torch.equal(first, expected_pixels(distilled, 0))
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["normalisation"]["mean"] == list(distilled.mean)
    assert manifest["normalisation"]["std"] == list(distilled.std)
    assert manifest["targets"]["dim"] == distilled.targets.shape[1]
    assert "not class labels" in manifest["targets"]["meaning"]
    assert manifest["lr"]["value"] == pytest.approx(distilled.lr)
    source = manifest["source"]
    assert source["file"] == "distill/distilled.safetensors" and source["fingerprint"] == distilled.meta["fingerprint"]
    assert source["sha256"] == file_sha256(out / "distill" / "distilled.safetensors")
    assert export_distilled(ExportConfig(out=str(out))).status == "reused"


def test_the_png_folder_reads_with_mkdt_imagefolder_and_torchvision(exported):
    from torchvision.datasets import ImageFolder

    out, distilled, _ = exported
    dest = out / "export"
    folder = ImageFolder(str(dest / "train"))
    assert folder.classes == ["synthetic"] and len(folder) == len(distilled)
    image, label = folder[1]
    gray = torch.from_numpy(np.array(image.convert("L")))[None]
    assert label == 0 and torch.equal(gray, expected_pixels(distilled, 1))
    data = load_dataset(DataConfig(name="imagefolder", root=str(dest), split="train", channels=1))
    assert len(data) == len(distilled) and data.images.shape[1:] == distilled.images.shape[1:]
    assert torch.equal(data.images[2], expected_pixels(distilled, 2))


def test_pretrain_on_the_exported_pt_set_equals_pretrain_on_the_safetensors_set(exported):
    out, distilled, _ = exported
    schedule = PretrainSchedule(epochs=2, batch_size=8)
    from_pt = pretrain(PretrainConfig(kind="distilled", name="pt", source=str(out / "export"), out=str(out),
                                      model=TINY, schedule=schedule, device="cpu"))
    from_st = pretrain(PretrainConfig(kind="distilled", name="st", out=str(out), model=TINY, schedule=schedule,
                                      device="cpu"))
    assert from_pt.summary["lr"] == pytest.approx(distilled.lr)
    assert from_pt.summary["losses"] == pytest.approx(from_st.summary["losses"])
    # the images.pt path itself works too, through the command line
    code = main(["pretrain", "--out", str(out), "--set", "name=pt2", "--set", f"source={out / 'export' / 'images.pt'}",
                 "--set", "model.depth=1", "--set", "model.width=4", "--set", "schedule.epochs=1", "--device", "cpu"])
    assert code == 0


def hand_made(folder: Path, images, labels, lr=None):
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(images, folder / "images.pt")
    torch.save(labels, folder / "labels.pt")
    if lr is not None:
        torch.save(lr, folder / "lr.pt")
    return folder


def test_a_pt_set_without_manifest_needs_its_normalisation(tmp_path):
    g = torch.Generator().manual_seed(0)
    folder = hand_made(tmp_path / "dd", torch.randn(6, 3, 8, 8, generator=g), torch.randn(6, 5, generator=g),
                       torch.tensor([0.02]))
    with pytest.raises(MkdtError, match="no normalisation.*set mean=\\[...\\] and std=\\[...\\]"):
        load_pt_set(folder)
    syn = load_pt_set(folder / "images.pt", mean=[0.5] * 3, std=[0.25] * 3)
    assert syn.lr == pytest.approx(0.02) and syn.mean == (0.5,) * 3 and syn.targets.shape == (6, 5)
    with pytest.raises(MkdtError, match="give both mean and std"):
        load_pt_set(folder, mean=[0.5] * 3)

@pytest.mark.parametrize("images, labels, kwargs, message", [
    (torch.randint(0, 255, (4, 3, 8, 8), dtype=torch.uint8), torch.randn(4, 5), {}, "holds uint8 pixels"),
    (torch.randn(4, 3, 8), torch.randn(4, 5), {}, "must be float images N x C x H x W"),
    (torch.randn(4, 3, 8, 8), torch.arange(4), {}, "holds class labels \\(4,\\)"),
    (torch.randn(4, 3, 8, 8), torch.randn(5, 5), {}, "must be 4 x D targets"),
    (torch.randn(4, 3, 8, 8), torch.randn(4, 5), {"mean": [0.5], "std": [0.2]}, "1 mean / 1 std values for 3-channel"),
    (torch.rand(4, 3, 8, 8), torch.randn(4, 5), {}, "look like pixels in \\[0, 1\\]"),
])
def test_bad_pt_sets_fail_with_one_line(tmp_path, images, labels, kwargs, message):
    folder = hand_made(tmp_path / "bad", images, labels)
    kwargs = kwargs or {"mean": [0.5] * 3, "std": [0.25] * 3}
    with pytest.raises(MkdtError, match=message) as info:
        load_pt_set(folder, **kwargs)
    assert "\n" not in str(info.value) and str(folder) in str(info.value)


def test_a_pickle_is_refused_and_a_manifest_mismatch_named(exported, tmp_path):
    out, _, _ = exported
    dest = out / "export"
    with pytest.raises(MkdtError, match="normalisation mismatch"):
        load_pt_set(dest, mean=[0.1], std=[0.2])
    folder = hand_made(tmp_path / "pickled", torch.randn(2, 1, 8, 8), torch.randn(2, 3))
    torch.save({"images": torch.randn(2, 1, 8, 8), "note": Path("x")}, folder / "images.pt")  # a pickled object
    with pytest.raises(MkdtError, match="cannot be read with torch.load\\(weights_only=True\\)"):
        load_pt_set(folder, mean=[0.5], std=[0.2])
    torch.save(torch.randn(3, 1, 8, 8), dest / "images.pt")  # no longer what the manifest records
    with pytest.raises(MkdtError, match="manifest.json records"):
        load_pt_set(dest)


def test_export_only_pt_from_an_explicit_file(config: DistillConfig, tiny, tmp_path: Path):
    result = export_distilled(ExportConfig(out=str(tmp_path / "x"), input=str(tiny.init), format="pt",
                                           dest=str(tmp_path / "pt")))
    assert sorted(p.name for p in (tmp_path / "pt").iterdir()) == ["config.yaml", "images.pt", "labels.pt",
                                                                   "manifest.json", "stage.json"]
    assert result.summary["pt"] == ["images.pt", "labels.pt"]  # the initial set has no learned lr
    assert json.loads((tmp_path / "pt" / "manifest.json").read_text())["lr"]["value"] is None


def test_export_without_a_distilled_set_names_the_fix(tmp_path: Path):
    with pytest.raises(MkdtError, match="mkdt distill"):
        export_distilled(ExportConfig(out=str(tmp_path)))
    with pytest.raises(MkdtError, match="format"):
        export_distilled(ExportConfig(out=str(tmp_path), format="jpeg"))

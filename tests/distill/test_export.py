"""``mkdt export``: PNG folder and the images.pt / labels.pt / lr.pt layout load back."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import numpy as np
from PIL import Image

from mkdt.distill import DistillConfig, ExportConfig, distill, export_distilled
from mkdt.errors import MkdtError
from mkdt.formats import load_synthetic


def test_export_round_trip(config: DistillConfig):
    config = dataclasses.replace(config, iterations=3)
    distill(config)
    distilled = load_synthetic(Path(config.out) / "distill" / "distilled.safetensors")
    result = export_distilled(ExportConfig(out=config.out))
    dest = Path(config.out) / "export"
    images = torch.load(dest / "images.pt", weights_only=True)
    labels = torch.load(dest / "labels.pt", weights_only=True)
    lr = torch.load(dest / "lr.pt", weights_only=True)
    assert torch.equal(images, distilled.images) and torch.equal(labels, distilled.targets)
    assert lr.dim() == 0 and float(lr) == pytest.approx(distilled.lr)
    pngs = sorted((dest / "png").glob("*.png"))
    assert len(pngs) == len(distilled) == result.summary["png"]
    first = torch.from_numpy(np.array(Image.open(pngs[0])))[None]  # 1-channel digits
    m = torch.tensor(distilled.mean).view(-1, 1, 1)
    s = torch.tensor(distilled.std).view(-1, 1, 1)
    expected = ((distilled.images[0] * s + m).clamp(0, 1) * 255).round().to(torch.uint8)
    assert first.shape == expected.shape and torch.equal(first, expected)
    again = export_distilled(ExportConfig(out=config.out))
    assert again.status == "reused"


def test_export_only_pt_from_an_explicit_file(config: DistillConfig, tiny, tmp_path: Path):
    result = export_distilled(ExportConfig(out=str(tmp_path / "x"), input=str(tiny.init), format="pt",
                                           dest=str(tmp_path / "pt")))
    assert sorted(p.name for p in (tmp_path / "pt").iterdir()) == ["config.yaml", "images.pt", "labels.pt", "meta.json",
                                                               "stage.json"]
    assert result.summary["pt"] == ["images.pt", "labels.pt"]  # the initial set has no learned lr


def test_export_without_a_distilled_set_names_the_fix(tmp_path: Path):
    with pytest.raises(MkdtError, match="mkdt distill"):
        export_distilled(ExportConfig(out=str(tmp_path)))
    with pytest.raises(MkdtError, match="format"):
        export_distilled(ExportConfig(out=str(tmp_path), format="jpeg"))

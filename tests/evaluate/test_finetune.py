"""``finetune``: augmentation, a short fine-tuning run, exact resume from a checkpoint, errors."""

from __future__ import annotations

import pytest
import torch

import mkdt.evaluate.finetuning as ft
from mkdt.evaluate import probe_results
from mkdt.data import DataConfig
from mkdt.errors import MkdtError
from mkdt.evaluate import FinetuneConfig, finetune
from mkdt.runtime import generator

def finetuned(config):
    """Run the finetune stage and return the results.json it recorded."""
    return probe_results(finetune(config))



def test_crop_flip_shapes_identity_and_windows():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)
    assert torch.equal(ft.crop_flip(x, 0, False, generator(0)), x)
    out = ft.crop_flip(x, 2, True, generator(1))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):  # every output image is a 6x6 window of the padded image, maybe mirrored
        windows = [padded[i, :, r:r + 6, c:c + 6] for r in range(5) for c in range(5)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(-1)) for w in windows)
    again = ft.crop_flip(x, 2, True, generator(1))
    assert torch.equal(out, again)  # same generator state -> same crops
    assert not torch.equal(out, ft.crop_flip(x, 2, True, generator(2)))


def cfg(tmp_path, enc, **kw) -> FinetuneConfig:
    values = dict(out=str(tmp_path), encoder=str(enc), downstream=[DataConfig(name="digits")], percents=[50.0],
                  seeds=[0], iterations=60, batch_size=64, lr=0.05, checkpoint_every=10, device="cpu",
                  crop_padding=0)  # padding 4 on 8x8 digits is too destructive for 60 steps
    values.update(kw)
    return FinetuneConfig(**values)


def test_finetune_learns_and_writes_results(tmp_path, random_encoder):
    res = finetuned(cfg(tmp_path, random_encoder(), seeds=[0, 1]))
    assert len(res["runs"]) == 2
    for run in res["runs"]:
        assert run["protocol"] == "finetune" and run["accuracy"] > 50  # chance is 10%
    cell = res["summary"]["digits"]["finetune"]["50"]
    assert cell["n"] == 2 and cell["mean"] == pytest.approx(sum(cell["accuracies"]) / 2)
    assert (tmp_path / "finetune" / "none" / "results.json").is_file()
    assert (tmp_path / "finetune" / "none" / "stage.json").is_file()
    assert not (tmp_path / "finetune" / "none" / "checkpoints").exists()


def test_interrupted_finetune_resumes_to_the_same_result(tmp_path, random_encoder, monkeypatch):
    enc = random_encoder()
    reference = finetuned(cfg(tmp_path / "ref", enc))["runs"][0]["accuracy"]
    real = ft.crop_flip
    count = {"n": 0}

    def interrupt_at_35(*a, **k):
        count["n"] += 1
        if count["n"] == 35:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(ft, "crop_flip", interrupt_at_35)
    with pytest.raises(KeyboardInterrupt):
        finetuned(cfg(tmp_path / "cut", enc))
    ckpts = list((tmp_path / "cut" / "finetune" / "none" / "checkpoints").rglob("*.safetensors"))
    assert len(ckpts) == 1
    steps = []
    monkeypatch.setattr(ft, "crop_flip", lambda *a, **k: (steps.append(1), real(*a, **k))[1])
    resumed = finetuned(cfg(tmp_path / "cut", enc))["runs"][0]
    assert len(steps) == 60 - 30  # resumed from the checkpoint at iteration 30, not from scratch
    assert resumed["accuracy"] == pytest.approx(reference, abs=1e-9)


def test_finetune_errors(tmp_path, random_encoder):
    with pytest.raises(MkdtError, match="encoder file not found"):
        finetuned(cfg(tmp_path, tmp_path / "missing.safetensors"))
    with pytest.raises(MkdtError, match="split_mode"):
        finetuned(cfg(tmp_path, random_encoder(), split_mode="random"))

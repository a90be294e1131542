import json

import numpy as np
import pytest
from helpers import stage_status
import torch

from mkdt.baselines import KrrStConfig, distill_krr_st
from mkdt.baselines import krr_st
from mkdt.baselines.krr_st import KrrFeatureNet, crop_flip, krr_predict
from mkdt.errors import MkdtError
from mkdt.formats import load_synthetic
from mkdt.metrics import read_csv


def _config(run, **kw):
    base = dict(data=run.data, out=str(run.out), device="cpu", size=40, widths=[8, 16], pool_size=3,
                max_online_steps=12, online_batch_size=16, iterations=30, lr=0.01, real_batch=128,
                checkpoint_every=10, log_every=1)
    base.update(kw)
    return KrrStConfig(**base)


def test_kernel_solve_matches_explicit_inverse():
    rng = np.random.default_rng(0)
    fs, fr, ys = rng.normal(size=(12, 30)), rng.normal(size=(7, 30)), rng.normal(size=(12, 4))
    ones_s, ones_r = np.hstack([fs, np.ones((12, 1))]), np.hstack([fr, np.ones((7, 1))])
    kss, krs = ones_s @ ones_s.T, ones_r @ ones_s.T
    lam = 1e-6 * np.trace(kss)
    want = krs @ np.linalg.inv(kss + lam * np.eye(12)) @ ys
    got = krr_predict(torch.tensor(fs, dtype=torch.float64), torch.tensor(fr, dtype=torch.float64),
                      torch.tensor(ys, dtype=torch.float64))
    assert np.allclose(got.numpy(), want, rtol=1e-8, atol=1e-10)
    # float32 features: kernel in float32, solve in float64, close to the exact answer
    got32 = krr_predict(torch.tensor(fs, dtype=torch.float32), torch.tensor(fr, dtype=torch.float32),
                        torch.tensor(ys, dtype=torch.float32))
    assert got32.dtype == torch.float32 and np.allclose(got32.numpy(), want, rtol=1e-3, atol=1e-4)


def test_kernel_solve_interpolates_training_points_and_is_differentiable():
    fs = torch.randn(6, 20, dtype=torch.float64, requires_grad=True)
    ys = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    pred = krr_predict(fs, fs.detach(), ys, ridge=1e-12)
    assert torch.allclose(pred, ys, atol=1e-6)  # tiny ridge + more features than points: interpolation
    krr_predict(fs, torch.randn(4, 20, dtype=torch.float64), ys).sum().backward()
    assert fs.grad is not None and ys.grad is not None and torch.isfinite(fs.grad).all()


def test_crop_flip_keeps_pixels_and_is_seeded():
    x = torch.rand(16, 3, 8, 8)
    assert torch.equal(crop_flip(x, 0, False, torch.Generator().manual_seed(0)), x)
    flipped = crop_flip(x, 0, True, torch.Generator().manual_seed(0))
    for a, b in zip(flipped, x):
        assert torch.equal(a, b) or torch.equal(a, b.flip(-1))
    a = crop_flip(x, 2, True, torch.Generator().manual_seed(5))
    b = crop_flip(x, 2, True, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == x.shape
    # a shifted crop keeps a 4x4 centre block of the original (padding 2 on 8 px)
    plain = crop_flip(x, 2, False, torch.Generator().manual_seed(7))
    for out, src in zip(plain, x):
        assert any(torch.equal(out[:, 2:6, 2:6], src[:, 2 + dy:6 + dy, 2 + dx:6 + dx])
                   for dy in range(-2, 3) for dx in range(-2, 3))


def test_feature_net_widths_and_resolution_check():
    net = KrrFeatureNet([4, 8, 16], in_channels=3, resolution=32, out_dim=5)
    assert net.feature_dim == 16 * 4 * 4 and net(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    with pytest.raises(MkdtError, match="divisible by 8"):
        KrrFeatureNet([4, 8, 16], in_channels=3, resolution=12, out_dim=5)


def test_loss_decreases_and_output_is_recorded(digits_run):
    # One pool model and the whole (un-augmented) real set as the batch: the loss then changes only
    # through the learned (X_s, Y_s) and the model's slow online training, so a decrease is meaningful.
    cfg = _config(digits_run, pool_size=1, max_online_steps=100, real_batch=10_000, crop_padding=0, flip=False)
    result = distill_krr_st(cfg)
    rows = [json.loads(line) for line in (digits_run.out / "krr_st" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    assert len(losses) == 30 and all(np.isfinite(losses))
    logged = [r for r in read_csv(digits_run.out / "krr_st" / "metrics.csv") if r["name"] == "loss"]
    assert [r["value"] for r in logged] == pytest.approx(losses, rel=1e-6)  # the experiment logger's copy
    assert np.median(losses[-5:]) < 0.8 * np.median(losses[:5])
    s = load_synthetic(result.outputs["set"])
    assert s.images.shape == (40, 1, 8, 8) and s.targets.shape == (40, 8) and s.lr is None
    assert set(s.meta["recipes"]) == {"krr_st", "mkdt"} and s.meta["recipes"]["mkdt"]["lr"] == 0.1
    assert not torch.equal(s.targets, digits_run.targets[s.indices])  # Y_s is learned
    assert not (digits_run.out / "krr_st" / "checkpoint.safetensors").exists()
    again = distill_krr_st(cfg)  # finished: no-op
    assert again.status == "reused" and again.summary == result.summary


def test_interrupted_run_resumes_to_the_same_result(digits_run, tmp_path, monkeypatch):
    full = load_synthetic(distill_krr_st(_config(digits_run, iterations=8, checkpoint_every=3)).outputs["set"])
    cut = tmp_path / "cut"
    targets = str(digits_run.out / "targets" / "targets.safetensors")
    real_step, calls = krr_st._outer_step, {"n": 0}

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(krr_st, "_outer_step", interrupting)
    with pytest.raises(KeyboardInterrupt):
        distill_krr_st(_config(digits_run, out=str(cut), targets=targets, iterations=8, checkpoint_every=3))
    assert (cut / "krr_st" / "checkpoint.safetensors").exists()
    assert stage_status(cut / "krr_st") != "done"
    monkeypatch.setattr(krr_st, "_outer_step", real_step)
    resumed = distill_krr_st(_config(digits_run, out=str(cut), targets=targets, iterations=8, checkpoint_every=3))
    assert resumed.summary["resumed_from"] == 3
    again = load_synthetic(resumed.outputs["set"])
    assert torch.equal(again.images, full.images) and torch.equal(again.targets, full.targets)


def test_nan_steps_are_skipped_then_stop(digits_run, monkeypatch):
    real, calls = krr_st.krr_predict, {"n": 0}

    def sometimes_nan(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        return out * float("nan") if calls["n"] in (2, 3) else out

    monkeypatch.setattr(krr_st, "krr_predict", sometimes_nan)
    result = distill_krr_st(_config(digits_run, iterations=6))
    assert result.summary["skipped_steps"] == 2
    assert torch.isfinite(load_synthetic(result.outputs["set"]).images).all()

    monkeypatch.setattr(krr_st, "krr_predict", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(MkdtError, match="non-finite steps in a row"):
        distill_krr_st(_config(digits_run, iterations=6, out=str(digits_run.out / "nan"), max_bad_steps=3,
                               targets=str(digits_run.out / "targets" / "targets.safetensors")))
    assert not list((digits_run.out / "nan" / "krr_st").glob("distilled*"))


def test_init_file_and_teacher_targets(digits_run, tmp_path, make_targets):
    from mkdt.artifacts import save_tensors
    from mkdt.baselines import SubsetConfig, select_subset
    from mkdt.models import ModelConfig, build_model
    from mkdt.runtime import seeded

    init = select_subset(SubsetConfig(data=digits_run.data, out=str(digits_run.out), method="random", size=24))
    result = distill_krr_st(_config(digits_run, init=str(init.outputs["set"]), iterations=3))
    assert torch.equal(load_synthetic(result.outputs["set"]).indices, load_synthetic(init.outputs["set"]).indices)

    cfg = ModelConfig(name="convnet", depth=1, width=8)
    with seeded(0):  # the encoder that wrote the fixture's targets (its first 8 of 128 features)
        teacher = build_model(cfg, in_channels=1, resolution=8)
    path = tmp_path / "teacher.safetensors"
    save_tensors(path, teacher.state_dict(), {"model": cfg.to_dict(), "in_channels": 1, "resolution": 8})
    with pytest.raises(MkdtError, match="teacher not found"):
        distill_krr_st(_config(digits_run, real_targets="teacher", iterations=3))
    with pytest.raises(MkdtError, match="128-d representations"):
        distill_krr_st(_config(digits_run, real_targets="teacher", teacher=str(path), iterations=3))
    out = tmp_path / "full"
    make_targets(out, digits_run.data, dim=128)
    result = distill_krr_st(_config(digits_run, out=str(out), real_targets="teacher", teacher=str(path),
                                    iterations=3))
    assert load_synthetic(result.outputs["set"]).targets.shape == (40, 128)

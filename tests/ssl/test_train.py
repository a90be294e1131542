"""The SSL loop's pieces: schedules, optimiser state round trip, kNN monitor, and a tiny exact resume."""

import math

import pytest
import torch
from torch import nn

from mkdt.artifacts import load_tensors, read_metadata, save_tensors
from mkdt.errors import MkdtError
from mkdt.models import build_model
from mkdt.ssl import AugmentConfig, BatchAugment, ObjectiveConfig, SSLSchedule, SSLTrainer, knn_accuracy, lr_factor
from mkdt.ssl.knn import knn_predict
from mkdt.ssl.train import autocast_dtype, flatten_optimizer_state, momentum_at, unflatten_optimizer_state

TINY_OBJECTIVE = ObjectiveConfig(projector_hidden=16, projector_out=32)


def test_cosine_schedule_warms_up_then_decays():
    s = SSLSchedule(epochs=10, lr_schedule="cosine", warmup_epochs=2)
    f = [lr_factor(s, step, 100, 10) for step in range(100)]
    assert f[0] == pytest.approx(0.05) and f[19] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:19], f[1:20]))
    assert all(a >= b for a, b in zip(f[20:], f[21:]))
    assert f[-1] < 0.01


def test_onecycle_schedule_matches_torch():
    s = SSLSchedule(epochs=5, lr=1.0, lr_schedule="onecycle", onecycle_pct=0.3)
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=1.0)
    ref = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=50, pct_start=0.3)
    for step in range(50):
        group = opt.param_groups[0]
        assert lr_factor(s, step, 50, 10) == pytest.approx(group["lr"], rel=1e-6, abs=1e-9)
        assert momentum_at(s, step, 50) == pytest.approx(group["betas"][0], rel=1e-6)
        opt.step()
        ref.step()
    assert momentum_at(SSLSchedule(lr_schedule="onecycle", cycle_momentum=False), 3, 50) is None
    assert momentum_at(SSLSchedule(lr_schedule="cosine"), 3, 50) is None


def test_optimizer_state_round_trip(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    opt = torch.optim.Adam(model.parameters(), lr=0.1, weight_decay=1e-4)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
    tensors, meta = flatten_optimizer_state(opt.state_dict())
    save_tensors(tmp_path / "o.safetensors", tensors, meta)
    back = unflatten_optimizer_state(load_tensors(tmp_path / "o.safetensors"), read_metadata(tmp_path / "o.safetensors"))
    fresh = torch.optim.Adam(model.parameters(), lr=0.5)
    fresh.load_state_dict(back)
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for pid in a["state"]:
        for key in a["state"][pid]:
            assert torch.equal(a["state"][pid][key], b["state"][pid][key])


def knn_by_hand(bank, bank_labels, query, k, t, classes):
    sims = [(float(torch.nn.functional.cosine_similarity(query, b, dim=0)), int(lab))
            for b, lab in zip(bank, bank_labels)]
    sims.sort(key=lambda s: -s[0])
    votes = [0.0] * classes
    for s, lab in sims[:k]:
        votes[lab] += math.exp(s / t)
    return max(range(classes), key=lambda c: votes[c])


def test_knn_weighted_vote_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    bank, labels = torch.randn(40, 6, generator=g), torch.randint(0, 4, (40,), generator=g)
    queries = torch.randn(15, 6, generator=g)
    pred = knn_predict(bank, labels, queries, k=7, temperature=0.1, num_classes=4)
    assert pred.tolist() == [knn_by_hand(bank, labels, q, 7, 0.1, 4) for q in queries]


def test_knn_accuracy_on_separated_clusters_and_leave_one_out():
    g = torch.Generator().manual_seed(1)
    centres = torch.eye(3) * 10
    labels = torch.arange(3).repeat_interleave(20)
    feats = centres[labels] + torch.randn(60, 3, generator=g)
    assert knn_accuracy(feats, labels, feats, labels, k=5, exclude_self=True) == 1.0
    shuffled = labels[torch.randperm(60, generator=g)]
    assert knn_accuracy(feats, shuffled, feats, labels, k=5, exclude_self=True) < 0.8


def tiny_trainer(seed=0, epochs=2, optimizer="adam", objective=TINY_OBJECTIVE):
    torch.manual_seed(seed)
    model = build_model("convnet", depth=1, width=4, in_channels=3, resolution=8)
    aug = BatchAugment(AugmentConfig(), (0.5,) * 3, (0.25,) * 3)
    schedule = SSLSchedule(epochs=epochs, batch_size=16, warmup_epochs=0.5, optimizer=optimizer, lr=0.01)
    return SSLTrainer(model, objective, schedule, aug, seed=seed, device=torch.device("cpu"))


@pytest.mark.parametrize("optimizer,objective", [("adam", "barlow_twins"), ("lars", "simclr"), ("sgd", "simclr")])
def test_trainer_resumes_exactly(tmp_path, optimizer, objective):
    x = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    kw = {"optimizer": optimizer, "objective": ObjectiveConfig(name=objective, projector_hidden=16, projector_out=8)}
    full = tiny_trainer(**kw)
    full.fit(x, checkpoint=tmp_path / "a.safetensors", identity="run")

    def stop(epoch, record):
        raise KeyboardInterrupt

    first = tiny_trainer(**kw)
    with pytest.raises(KeyboardInterrupt):
        first.fit(x, checkpoint=tmp_path / "b.safetensors", identity="run", on_epoch_end=stop)
    seen = []
    second = tiny_trainer(**kw)
    second.fit(x, checkpoint=tmp_path / "b.safetensors", identity="run", on_epoch_end=lambda e, r: seen.append(e))
    assert seen == [2]
    for (name, a), b in zip(full.backbone.state_dict().items(), second.backbone.state_dict().values()):
        assert torch.equal(a, b), name
    assert [r["loss"] for r in full.history] == [r["loss"] for r in second.history]
    # a checkpoint written for another configuration is not resumed
    other = tiny_trainer(**kw)
    assert not other.load_checkpoint(tmp_path / "b.safetensors", identity="other")


def test_divergence_is_reported():
    x = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8)
    trainer = tiny_trainer(epochs=1)
    trainer.loss_fn = lambda a, b: (a.sum() + b.sum()) * float("nan")
    with pytest.raises(MkdtError, match="diverged"):
        trainer.fit(x)


def test_precision_choice_per_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("fp16", cpu) is None
    assert autocast_dtype("bf16", cpu) is torch.bfloat16
    assert autocast_dtype("fp32", cuda) is None and autocast_dtype("fp16", cuda) is torch.float16


def test_native_only_auto_is_bf16_only_on_native_hardware(monkeypatch):
    """``auto`` with ``native_only`` (distillation): bf16 where the capability probe says the hardware runs
    it, float32 elsewhere (never fp16); without it the SSL choice above is unchanged."""
    import mkdt.ssl.train as train

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert train.native_bf16(torch.device("meta")) is False
    monkeypatch.setattr(train, "native_bf16", lambda device: False)
    assert autocast_dtype("auto", cpu, native_only=True) is None
    assert autocast_dtype("auto", cuda, native_only=True) is None
    assert autocast_dtype("bf16", cpu, native_only=True) is torch.bfloat16
    monkeypatch.setattr(train, "native_bf16", lambda device: True)
    assert autocast_dtype("auto", cpu, native_only=True) is torch.bfloat16
    assert autocast_dtype("fp32", cpu, native_only=True) is None
    assert autocast_dtype("auto", cpu) is None


def test_bf16_on_cpu_trains_float32_weights_close_to_fp32():
    """precision bf16 on the CPU: the forward runs under bf16 autocast, the weights and optimiser stay
    float32, and one epoch lands near the float32 run (same data, seeds and augmentations)."""
    x = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    runs = {}
    for precision in ("fp32", "bf16"):
        trainer = tiny_trainer(epochs=1)
        trainer.schedule.precision = precision
        trainer.amp_dtype = autocast_dtype(precision, torch.device("cpu"))
        runs[precision] = (trainer, trainer.fit(x)[-1]["loss"])
    bf16, fp32 = runs["bf16"][0], runs["fp32"][0]
    assert bf16.amp_dtype is torch.bfloat16 and all(p.dtype == torch.float32 for p in bf16.backbone.parameters())
    assert math.isfinite(runs["bf16"][1]) and runs["bf16"][1] != runs["fp32"][1]
    assert runs["bf16"][1] == pytest.approx(runs["fp32"][1], rel=0.05)
    for a, b in zip(fp32.backbone.parameters(), bf16.backbone.parameters()):
        assert torch.allclose(a, b, atol=0.05)


def test_channels_last_is_kept_off_where_this_torch_crashes():
    """8-channel convolutions at 64 px crash (segfault) in channels-last backward on torch 2.14's CPU kernels:
    the trainer uses the default layout for them, and channels-last for 16 channels and more."""
    import torch

    from mkdt.models import ModelConfig, build_model
    from mkdt.ssl import AugmentConfig, BatchAugment, ObjectiveConfig, SSLSchedule, SSLTrainer

    def trainer(width: int) -> SSLTrainer:
        model = build_model(ModelConfig(name="resnet18", width=width, norm="batchnorm"), in_channels=3, resolution=64)
        return SSLTrainer(model, ObjectiveConfig(projector_hidden=16, projector_out=16),
                          SSLSchedule(epochs=1, batch_size=16, warmup_epochs=0, channels_last=True),
                          BatchAugment(AugmentConfig(), (0.5,) * 3, (0.25,) * 3), seed=0, device=torch.device("cpu"))

    narrow = trainer(8)
    assert narrow.memory_format == torch.contiguous_format
    narrow.fit(torch.randint(0, 255, (32, 3, 64, 64), dtype=torch.uint8))  # one epoch, no crash
    assert trainer(16).memory_format == torch.channels_last

"""``probe`` with ``evaluation: validation``: scored on a held-out part of the train split that is never
labelled, the same for every probe seed and method; the test split is never read; test mode unchanged."""

from __future__ import annotations

import pytest
import torch

import mkdt.evaluate.probing as probe_mod
from mkdt.config import validate
from mkdt.data import DataConfig, holdout_split, labelled_split
from mkdt.errors import ConfigError, MkdtError
from mkdt.evaluate import ProbeConfig, combine_probe_results, probe, probe_results
from mkdt.runtime import derive_seed

DIGITS = [DataConfig(name="digits")]


def small(out, encoder, **kw) -> ProbeConfig:
    values = dict(out=str(out), encoder=str(encoder), downstream=DIGITS, percents=[5.0], seeds=[0, 1],
                  device="cpu")
    values.update(kw)
    return ProbeConfig(**values)


def uneven_labels() -> torch.Tensor:
    """4,900 labels in 10 classes of 400..580 images, shuffled."""
    y = torch.cat([torch.full((400 + 20 * c,), c) for c in range(10)])
    return y[torch.randperm(len(y), generator=torch.Generator().manual_seed(3))]


def test_holdout_split_is_stratified_deterministic_and_seeded():
    y = uneven_labels()
    a = holdout_split(y, 0.1, 0)
    assert torch.equal(a, holdout_split(y, 0.1, 0))
    assert torch.equal(a, torch.sort(a).values) and len(torch.unique(a)) == len(a)
    for c in range(10):  # 10% of every class, half-up
        assert int((y[a] == c).sum()) == int(int((y == c).sum()) * 0.1 + 0.5)
    assert not torch.equal(a, holdout_split(y, 0.1, 1))
    assert len(holdout_split(y, 0.2, 0)) == 980
    assert len(holdout_split(torch.tensor([0] * 30 + [1]), 0.1, 0)) == 3  # a class of one: uniform draw
    with pytest.raises(MkdtError, match="fraction"):
        holdout_split(y, 1.0, 0)


def test_held_out_images_are_never_labelled_and_label_counts_match_test_mode():
    y = uneven_labels()
    test_cfg = ProbeConfig(percents=[1.0, 5.0, 50.0], seeds=[0, 1, 2])
    val_cfg = ProbeConfig(percents=[1.0, 5.0, 50.0], seeds=[0, 1, 2], evaluation="validation")
    held = probe_mod.held_out_rows(val_cfg, y)
    for protocol in ("paper", "converged"):
        for percent in (1.0, 5.0, 50.0):
            for seed in (0, 1, 7):
                idx = probe_mod.labelled_indices(val_cfg, y, protocol, percent, seed)
                assert not torch.isin(idx, held).any()
                ref = probe_mod.labelled_indices(test_cfg, y, protocol, percent, seed)
                assert abs(len(idx) - len(ref)) <= (10 if protocol == "converged" else 0)  # per-class rounding
    assert torch.isin(held, probe_mod.labelled_rows(val_cfg, y)).all()  # encoded with the labelled images
    # the held-out images depend on validation_seed only, not on the run's or the probe's seeds
    other = ProbeConfig(evaluation="validation", seed=5, seeds=[4])
    assert torch.equal(held, probe_mod.held_out_rows(other, y))


def test_test_mode_draws_the_labelled_subsets_it_always_drew():
    y = uneven_labels()
    cfg = ProbeConfig(seed=3)
    for protocol, mode in probe_mod.SPLIT_MODE.items():
        seed = derive_seed(3, "labelled", mode, "5", 1)
        assert torch.equal(probe_mod.labelled_indices(cfg, y, protocol, 5.0, 1), labelled_split(y, 5.0, seed, mode=mode))


def test_bad_settings_are_refused_by_name():
    with pytest.raises(ConfigError, match="evaluation"):
        validate(ProbeConfig(evaluation="val"))
    with pytest.raises(ConfigError, match="validation_fraction"):
        validate(ProbeConfig(evaluation="validation", validation_fraction=1.0))


def test_validation_probe_scores_held_out_train_images(tmp_path, random_encoder, monkeypatch):
    enc = random_encoder()
    test_res = probe_results(probe(small(tmp_path, enc)))
    real = probe_mod.load_split_set

    def no_test_split(cfg, split, encoder):
        assert split != "test", "the validation protocol must not read the test split"
        return real(cfg, split, encoder)

    monkeypatch.setattr(probe_mod, "load_split_set", no_test_split)
    cfg = small(tmp_path, enc, evaluation="validation")
    res = probe_results(probe(cfg))
    assert res["name"] == "none-validation" and (tmp_path / "probe" / "none-validation" / "results.json").is_file()
    assert res["evaluation"]["mode"] == "validation" and res["evaluation"]["validation_fraction"] == 0.1
    assert test_res["evaluation"]["mode"] == "test"
    assert (tmp_path / "probe" / "none" / "results.json").is_file()  # the test probe is kept

    # each accuracy is the fitted probe's on the held-out images, recomputed here
    encoder = probe_mod.load_encoder(enc)
    train, held = probe_mod.evaluation_splits(cfg, DIGITS[0], encoder, tmp_path / "scratch-cache")
    labels = real(DIGITS[0], "train", encoder).labels
    assert len(held.labels) == sum(int(0.1 * n + 0.5) for n in torch.bincount(labels).tolist())
    assert torch.equal(held.labels, labels[probe_mod.held_out_rows(cfg, labels)])
    for run in res["runs"]:
        again = probe_mod.evaluate_one(cfg, train, held, 10, run["protocol"], run["percent"], run["seed"],
                                       torch.device("cpu"))
        assert again["accuracy"] == pytest.approx(run["accuracy"])
        assert again["split_digest"] == run["split_digest"]
    assert not {r["split_digest"] for r in res["runs"]} & {r["split_digest"] for r in test_res["runs"]}


def test_results_of_both_modes_are_not_merged(tmp_path, random_encoder):
    enc = random_encoder()
    parts = [probe(small(tmp_path, enc, seeds=[0])).output("results"),
             probe(small(tmp_path, enc, seeds=[0], evaluation="validation")).output("results")]
    with pytest.raises(MkdtError, match="cannot merge test and validation"):
        combine_probe_results(parts, tmp_path / "merged.json", "merged")
    assert combine_probe_results(parts[1:], tmp_path / "merged.json", "merged")["evaluation"]["mode"] == "validation"

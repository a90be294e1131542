"""``probe``: results layout, reproducible splits, stratification, collapse flag, caching, resume, errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from helpers import stage_status
import torch

import mkdt.evaluate.probing as probe_mod
from mkdt.training import RegressionSchedule
from mkdt.evaluate import probe_results
from mkdt.artifacts import load_json, load_tensors, read_metadata, save_tensors
from mkdt.cli import main
from mkdt.data import DataConfig
from mkdt.errors import MkdtError
from mkdt.evaluate import PretrainConfig, ProbeConfig, pretrain, probe, write_tables
from mkdt.formats import SyntheticSet, save_synthetic
from mkdt.models import ModelConfig

DIGITS = [DataConfig(name="digits")]

def probed(config):
    """Run the probe stage and return the results.json it recorded."""
    return probe_results(probe(config))



def small(out, encoder, **kw) -> ProbeConfig:
    values = dict(out=str(out), encoder=str(encoder), downstream=DIGITS, percents=[5.0], seeds=[0, 1],
                  device="cpu")
    values.update(kw)
    return ProbeConfig(**values)


def test_results_layout_and_summary(tmp_path, random_encoder):
    enc = random_encoder()
    res = probed(small(tmp_path, enc, percents=[5.0, 50.0]))
    stage = tmp_path / "probe" / "none"
    assert (stage / "stage.json").is_file() and (stage / "results.json").is_file()
    assert load_json(stage / "results.json") == load_json(stage / "results.json")  # valid JSON
    assert len(res["runs"]) == 1 * 2 * 2 * 2  # sets x protocols x percents x seeds
    for run in res["runs"]:
        assert 0 <= run["accuracy"] <= 100 and run["accuracy"] > 20  # far above chance (10%) on digits
    cell = res["summary"]["digits"]["converged"]["50"]
    accs = cell["accuracies"]
    assert cell["n"] == 2 and cell["mean"] == pytest.approx(sum(accs) / 2)
    assert cell["std"] == pytest.approx(abs(accs[0] - accs[1]) / math.sqrt(2))  # sample std, ddof 1
    assert res["protocols"]["paper"]["max_iterations"] == 20
    assert "C = 1 / (2 * n * reg)" in res["protocols"]["converged"]["objective"]
    # More labels help (50% vs 5%) under the converged protocol.
    assert cell["mean"] > res["summary"]["digits"]["converged"]["5"]["mean"]


def test_same_seed_same_split_and_number(tmp_path, random_encoder):
    enc = random_encoder()
    a = probed(small(tmp_path / "a", enc))
    b = probed(small(tmp_path / "b", enc))
    key = lambda r: (r["protocol"], r["percent"], r["seed"])  # noqa: E731
    runs_a = {key(r): r for r in a["runs"]}
    runs_b = {key(r): r for r in b["runs"]}
    for k, r in runs_a.items():
        assert r["split_digest"] == runs_b[k]["split_digest"]
        assert r["accuracy"] == runs_b[k]["accuracy"]
    # Different seeds draw different labelled subsets.
    assert runs_a[("converged", 5.0, 0)]["split_digest"] != runs_a[("converged", 5.0, 1)]["split_digest"]


def test_stratified_fraction_holds_every_class(tmp_path, random_encoder):
    res = probed(small(tmp_path, random_encoder(), protocols=["converged"], percents=[1.0], seeds=[0, 1, 2]))
    for run in res["runs"]:
        assert run["classes_seen"] == 10
        assert run["train_size"] >= 10
        assert run["converged"] is True  # ran to the gradient tolerance


def test_collapsed_probe_is_flagged(tmp_path, random_encoder):
    """An encoder with all-zero weights maps every image to the same features: the probe can only
    predict one class, which must be flagged and shown with a warning sign, not as a plain number."""
    enc = random_encoder()
    meta = read_metadata(enc)
    zero = {k: torch.zeros_like(v) for k, v in load_tensors(enc).items()}
    save_tensors(enc, zero, meta)
    res = probed(small(tmp_path, enc, protocols=["converged"]))
    assert all(r["collapsed"] and r["majority_fraction"] >= 0.9 for r in res["runs"])
    assert res["summary"]["digits"]["converged"]["5"]["collapsed"] is True
    paths = write_tables({"zeroed": res}, tmp_path / "tables")
    md = paths["markdown"].read_text()
    assert "⚠" in md


def test_rerun_is_noop_and_interrupted_run_resumes(tmp_path, random_encoder, monkeypatch):
    enc = random_encoder()
    cfg = small(tmp_path, enc, seeds=[0, 1, 2])
    real = probe_mod.evaluate_one
    calls = []

    def flaky(*args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(args[4:7])
        return real(*args, **kwargs)

    monkeypatch.setattr(probe_mod, "evaluate_one", flaky)
    with pytest.raises(KeyboardInterrupt):
        probed(cfg)
    assert stage_status(tmp_path / "probe" / "none") != "done"
    monkeypatch.setattr(probe_mod, "evaluate_one", lambda *a, **k: (calls.append(a[4:7]), real(*a, **k))[1])
    res = probed(cfg)
    assert len(calls) == 6  # 3 before the interruption + the 3 missing ones, none redone
    assert len(res["runs"]) == 6

    def fail(*a, **k):
        raise AssertionError("a finished probe must not be recomputed")

    monkeypatch.setattr(probe_mod, "evaluate_one", fail)
    assert probed(cfg)["runs"] == res["runs"]


def test_features_are_cached_per_encoder_and_data(tmp_path, random_encoder, monkeypatch):
    enc = random_encoder()
    probed(small(tmp_path, enc))
    cache = sorted((tmp_path / "cache" / "probe-features" / "none").glob("*.safetensors"))
    assert len(cache) == 2  # train and test split
    digest = probe_mod.load_encoder(enc).digest
    assert all(p.name.startswith(digest + "_") for p in cache)

    def no_extract(*a, **k):
        raise AssertionError("features should come from the cache")

    monkeypatch.setattr(probe_mod, "extract_features", no_extract)
    res = probed(small(tmp_path, enc, reg=1e-2))  # other config, same encoder, data and labelled subsets
    assert len(res["runs"]) == 4
    monkeypatch.undo()
    other = random_encoder(seed=1, out=tmp_path / "other")
    enc.write_bytes(other.read_bytes())  # a new encoder under the same name: its features replace the old
    probed(small(tmp_path, enc, percents=[10.0]))
    now = sorted((tmp_path / "cache" / "probe-features" / "none").glob("*.safetensors"))
    new_digest = probe_mod.load_encoder(enc).digest
    assert new_digest != digest and len(now) == 2 and all(p.name.startswith(new_digest) for p in now)


def test_only_labelled_training_images_are_encoded(tmp_path, random_encoder, monkeypatch):
    """A 5% probe encodes the union of its labelled subsets (plus the test split), not the whole train
    split; a later probe with more labels encodes only the rows the cache lacks, and its accuracies equal
    a probe that encoded everything."""
    enc = random_encoder()
    counts = []
    real = probe_mod.extract_features

    def spy(model, images, mean, std, **kw):
        counts.append(len(images))
        return real(model, images, mean, std, **kw)

    monkeypatch.setattr(probe_mod, "extract_features", spy)
    probed(small(tmp_path, enc))
    digits_train, digits_test = 1437, 360  # the digits source's train / test split sizes
    cfg = small(tmp_path, enc)
    labels = probe_mod.load_split_set(DIGITS[0], "train", probe_mod.load_encoder(enc)).labels
    rows = probe_mod.labelled_rows(cfg, labels)
    assert sorted(counts) == sorted([len(rows), digits_test]) and len(rows) < digits_train // 2
    counts.clear()
    wider = probed(small(tmp_path, enc, percents=[5.0, 10.0]))
    wider_rows = probe_mod.labelled_rows(small(tmp_path, enc, percents=[5.0, 10.0]), labels)
    assert counts == [len(wider_rows) - len(rows)]  # only the new rows; the test split came from the cache
    full = probed(small(tmp_path / "full", enc, percents=[5.0, 10.0, 60.0]))  # >= half: encodes everything
    for run in wider["runs"]:
        same = [r for r in full["runs"] if (r["protocol"], r["percent"], r["seed"]) ==
                (run["protocol"], run["percent"], run["seed"])]
        assert same[0]["accuracy"] == pytest.approx(run["accuracy"], abs=1e-6)


def test_downstream_is_adapted_and_normalised_with_encoder_stats(tmp_path, random_encoder, monkeypatch):
    """A 16x16 RGB encoder probes the 8x8 grayscale digits: resized, 1 -> 3 channels, encoder mean/std."""
    enc = random_encoder(data=DataConfig(name="digits", resolution=16, channels=3))
    meta = read_metadata(enc)
    seen = []
    real = probe_mod.extract_features

    def spy(model, images, mean, std, **kw):
        seen.append((tuple(images.shape[1:]), mean, std))
        return real(model, images, mean, std, **kw)

    monkeypatch.setattr(probe_mod, "extract_features", spy)
    res = probed(small(tmp_path, enc, protocols=["paper"], seeds=[0]))
    assert res["runs"][0]["accuracy"] > 20
    assert seen and all(s[0] == (3, 16, 16) for s in seen)
    assert all(list(s[1]) == meta["mean"] and list(s[2]) == meta["std"] for s in seen)


def test_missing_encoder_is_a_clear_error(tmp_path):
    with pytest.raises(MkdtError, match="encoder file not found"):
        probed(small(tmp_path, tmp_path / "nope" / "encoder.safetensors"))


def test_file_without_encoder_metadata_is_rejected(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_tensors(path, {"w": torch.zeros(3)})
    with pytest.raises(MkdtError, match="not an mkdt encoder"):
        probed(small(tmp_path, path))


def test_channel_mismatch_that_cannot_be_adapted(tmp_path):
    """An encoder pre-trained on 2-channel images cannot read 1-channel digits."""
    syn = SyntheticSet(torch.randn(16, 2, 8, 8), torch.randn(16, 4), (0.5, 0.5), (0.25, 0.25),
                       indices=torch.arange(16))
    save_synthetic(tmp_path / "two.safetensors", syn)
    r = pretrain(PretrainConfig(kind="subset", source=str(tmp_path / "two.safetensors"), out=str(tmp_path),
                                model=ModelConfig(name="convnet", depth=1, width=4),
                                schedule=RegressionSchedule(epochs=1, lr=None), device="cpu"))
    with pytest.raises(MkdtError, match="encoder expects 2"):
        probed(small(tmp_path, r.outputs["encoder"]))


def test_bad_protocol_is_an_error(tmp_path, random_encoder):
    with pytest.raises(MkdtError, match="protocols"):
        probed(small(tmp_path, random_encoder(), protocols=["closed-form"]))


def test_cli_reports_one_line_error(tmp_path, capsys):
    code = main(["probe", "--out", str(tmp_path), "--set", f"encoder={tmp_path / 'missing.safetensors'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "missing.safetensors" in err  # checked before it starts


def test_cli_runs_a_probe(tmp_path, random_encoder):
    enc = random_encoder()
    code = main(["probe", "--out", str(tmp_path), "--device", "cpu", "--set", f"encoder={enc}",
                 "--set", "percents=[5]", "--set", "seeds=[0]", "--set", "protocols=[paper]"])
    assert code == 0
    assert Path(tmp_path / "probe" / "none" / "results.json").is_file()


def test_diverged_fit_is_recorded_without_nan(tmp_path, random_encoder, monkeypatch):
    """If LBFGS (no line search, as in the paper protocol) blows up, the run is marked diverged, has no
    accuracy, and no NaN reaches results.json."""
    real = probe_mod.fit_logistic

    def blow_up(*a, **k):
        fit = real(*a, **k)
        fit.weight = torch.full_like(fit.weight, float("nan"))
        fit.loss = float("nan")
        return fit

    monkeypatch.setattr(probe_mod, "fit_logistic", blow_up)
    res = probed(small(tmp_path, random_encoder(), protocols=["paper"]))
    assert all(r["diverged"] and r["accuracy"] is None and r["loss"] is None for r in res["runs"])
    cell = res["summary"]["digits"]["paper"]["5"]
    assert cell["diverged"] and cell["mean"] is None
    text = (tmp_path / "probe" / "none" / "results.json").read_text()
    assert "NaN" not in text and "Infinity" not in text

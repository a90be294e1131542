import pytest
import torch

from mkdt.artifacts import save_tensors
from mkdt.baselines import SubsetConfig, select_subset
from mkdt.baselines.sas import allocate, positive_similarity_scores, sas_select
from mkdt.data import load_dataset
from mkdt.errors import MkdtError
from mkdt.formats import load_synthetic
from mkdt.models import ModelConfig, build_model
from mkdt.runtime import seeded


def _run(run, **kw):
    return select_subset(SubsetConfig(data=run.data, out=str(run.out), device="cpu", **kw))


def test_random_subset_size_fraction_count_and_seed(digits_run):
    frac = load_synthetic(_run(digits_run, method="random", size=0.05).outputs["set"])
    assert len(frac) == round(0.05 * digits_run.n)
    counted = load_synthetic(_run(digits_run, method="random", size=100, name="r100").outputs["set"])
    assert len(counted) == 100 and len(torch.unique(counted.indices)) == 100
    again = load_synthetic(_run(digits_run, method="random", size=100, name="r100b").outputs["set"])
    other = load_synthetic(_run(digits_run, method="random", size=100, name="r100c", seed=1).outputs["set"])
    assert torch.equal(again.indices, counted.indices)
    assert not torch.equal(other.indices, counted.indices)
    # The stored pairs are the real normalised images with their own teacher targets.
    data = load_dataset(digits_run.data)
    assert torch.allclose(counted.images, data.normalize(data.images[counted.indices]))
    assert torch.equal(counted.targets, digits_run.targets[counted.indices])
    assert counted.lr is None and counted.meta["method"] == "random"


def test_subset_rerun_is_noop_and_bad_size_fails(digits_run):
    first = _run(digits_run, method="random", size=30)
    path = digits_run.out / "subsets" / "random" / "subset.safetensors"
    stamp = path.stat().st_mtime_ns
    again = _run(digits_run, method="random", size=30)
    assert again.status == "reused" and again.summary == first.summary and path.stat().st_mtime_ns == stamp
    with pytest.raises(MkdtError, match="larger than the data set"):
        _run(digits_run, method="random", size=10**6, name="huge")
    with pytest.raises(MkdtError, match="whole count"):
        _run(digits_run, method="random", size=2.5, name="odd")
    assert not (digits_run.out / "subsets" / "huge").exists()


def test_subset_refuses_targets_of_other_data(digits_run):
    from dataclasses import replace

    with pytest.raises(MkdtError, match="fingerprint"):
        select_subset(SubsetConfig(data=replace(digits_run.data, resolution=16), out=str(digits_run.out),
                                   method="random", size=10, name="other"))
    assert not (digits_run.out / "subsets" / "other").exists()


def test_sas_stage_exact_size_every_cluster_deterministic(digits_run):
    a = load_synthetic(_run(digits_run, method="sas", size=25, clusters=10).outputs["set"])
    assert len(a) == 25 and len(torch.unique(a.indices)) == 25
    kept = a.meta["selection"]["kept_per_cluster"]
    assert sum(kept) == 25 and min(kept) >= 1 and len(kept) == 10
    b = load_synthetic(_run(digits_run, method="sas", size=25, clusters=10, name="sas2").outputs["set"])
    assert torch.equal(a.indices, b.indices)
    # SAS keeps the examples most similar to their cluster: their mean score beats the cluster average.
    assert a.meta["selection"]["mean_score_kept"] > a.meta["selection"]["mean_score_all"]


def test_sas_with_encoder_file(digits_run, tmp_path):
    cfg = ModelConfig(name="convnet", depth=1, width=4)
    with seeded(3):
        enc = build_model(cfg, in_channels=1, resolution=8)
    path = tmp_path / "proxy.safetensors"
    save_tensors(path, enc.state_dict(), {"model": cfg.to_dict(), "in_channels": 1, "resolution": 8})
    out = _run(digits_run, method="sas", size=40, clusters=5, encoder=str(path), name="sas_enc")
    s = load_synthetic(out.outputs["set"])
    assert len(s) == 40 and s.meta["selection"]["proxy"] == str(path)  # outside the run folder: as given
    assert torch.equal(s.targets, digits_run.targets[s.indices])


def test_positive_similarity_scores_match_brute_force():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(37, 5, generator=gen)
    assign = torch.randint(0, 3, (37,), generator=gen)
    got = positive_similarity_scores(z, assign, chunk_elements=20)  # forces many small chunks
    unit = torch.nn.functional.normalize(z.double(), dim=1)
    sim = (unit @ unit.T).clamp_min(0)
    same = assign[:, None] == assign[None, :]
    sim = sim * same * (1 - torch.eye(37, dtype=torch.float64))
    assert torch.allclose(got, sim.sum(1), atol=1e-5)


def test_sas_keeps_the_dense_core_not_the_outliers():
    gen = torch.Generator().manual_seed(1)
    centres = torch.eye(4)[:2] * 10
    core = torch.cat([c + 0.1 * torch.randn(20, 4, generator=gen) for c in centres])
    # outliers: same clusters but pointing away from the core direction
    outliers = torch.cat([c + torch.tensor([0.0, 0.0, 9.0, 9.0]) * s for c, s in zip(centres, (1, -1))])
    outliers = outliers.reshape(2, 4)
    emb = torch.cat([core, outliers])
    idx, info = sas_select(emb, 10, 2, seed=0)
    assert len(idx) == 10 and idx.max() < 40  # no outlier (indices 40, 41) chosen
    assert sorted(info["kept_per_cluster"]) == [5, 5]


def test_allocate_sums_exactly_and_covers_every_cluster():
    sizes = [500, 30, 3, 1, 0, 466]
    for total in (5, 6, 17, 100, 999, 1000):
        keep = allocate(sizes, total)
        assert sum(keep) == total
        assert all(k >= 1 for k, s in zip(keep, sizes) if s > 0) and keep[4] == 0
        assert all(k <= s for k, s in zip(keep, sizes))
    keep = allocate([600, 300, 100], 100)
    assert keep == [60, 30, 10]
    with pytest.raises(MkdtError, match="cannot represent all 5 clusters"):
        allocate(sizes, 4)

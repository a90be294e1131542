"""The ``balanced`` subset method and ``image_scale`` (the ``balanced_lowres`` variant's set): equal shares
per k-means cluster filled with each cluster's highest-loss images, low-resolution storage decoded on load."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mkdt.artifacts import save_tensors
from mkdt.baselines import SubsetConfig, select_subset
from mkdt.baselines.balanced import balanced_select, equal_shares
from mkdt.data import load_dataset
from mkdt.errors import MkdtError
from mkdt.formats import decode_images, load_synthetic
from mkdt.runtime import derive_seed


def test_equal_shares_spread_evenly_and_pass_on_what_small_clusters_cannot_take():
    assert equal_shares([10, 10, 10], 9) == [3, 3, 3]
    assert equal_shares([10, 10, 10], 10) == [4, 3, 3]
    assert equal_shares([1, 10, 10], 9) == [1, 4, 4]  # the small cluster's share goes to the others
    assert equal_shares([0, 5, 50], 30) == [0, 5, 25]
    with pytest.raises(MkdtError, match="cannot keep"):
        equal_shares([1, 2], 4)


def test_balanced_select_takes_each_clusters_hardest_members():
    gen = torch.Generator().manual_seed(0)
    centres = torch.eye(4) * 5  # four well-separated groups of very different sizes
    sizes = [100, 40, 20, 10]
    emb = torch.cat([c + 0.1 * torch.randn(n, 4, generator=gen) for c, n in zip(centres, sizes)])
    loss = torch.rand(len(emb), generator=gen)
    loss[:100] += 10  # the big group is the hardest: plain high-loss selection would take only it
    idx, info = balanced_select(loss, emb, 20, 4, seed=0)
    assert sorted(info["kept_per_cluster"]) == [5, 5, 5, 5] and len(idx) == 20
    assert torch.equal(idx, torch.sort(idx).values)
    group = torch.repeat_interleave(torch.arange(4), torch.tensor(sizes))
    assert torch.bincount(group[idx], minlength=4).tolist() == [5, 5, 5, 5]
    for g in range(4):  # within a group: its 5 highest losses
        members = torch.nonzero(group == g).flatten()
        best = members[torch.sort(loss[members], descending=True).indices[:5]]
        assert set(best.tolist()) == set(idx[group[idx] == g].tolist())
    again, _ = balanced_select(loss, emb, 20, 4, seed=0)
    assert torch.equal(idx, again)
    rand, info = balanced_select(loss, emb, 20, 4, seed=0, within="random")
    assert torch.bincount(group[rand], minlength=4).tolist() == [5, 5, 5, 5] and info["within"] == "random"
    assert info["mean_loss_kept"] < balanced_select(loss, emb, 20, 4, seed=0)[1]["mean_loss_kept"]


def write_losses(run, fingerprint=None):
    mean_loss = torch.rand(run.n, generator=torch.Generator().manual_seed(1))
    data = load_dataset(run.data)
    save_tensors(run.out / "init" / "losses.safetensors", {"mean_loss": mean_loss, "losses": mean_loss[None]},
                 {"fingerprint": fingerprint or data.fingerprint()})
    return mean_loss, data


def test_balanced_lowres_subset_stores_four_times_the_images_at_half_resolution(digits_run):
    mean_loss, data = write_losses(digits_run)
    result = select_subset(SubsetConfig(data=digits_run.data, out=str(digits_run.out), device="cpu", method="balanced",
                                        name="bl", size=20, clusters=5, image_scale=2))
    assert result.summary["images"] == 80 and result.summary["stored_resolution"] == 4
    path = result.outputs["set"]
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert tuple(f.get_slice("images").get_shape()) == (80, 1, 4, 4)  # the pixels of 20 images at 8 x 8
    loaded = load_synthetic(path)
    assert tuple(loaded.images.shape) == (80, 1, 8, 8)  # decoded on load for every reader
    expected = decode_images(F.avg_pool2d(data.normalize(data.images[loaded.indices]), 2), 8)
    assert torch.allclose(loaded.images, expected, atol=1e-6)
    assert torch.equal(loaded.targets, digits_run.targets[loaded.indices])
    # the same selection as the pure function with the stage's seed
    unit = F.normalize(digits_run.targets, dim=1)
    want, _ = balanced_select(mean_loss, unit, 80, 5, derive_seed(0, "subset", "balanced"))
    assert torch.equal(loaded.indices, want)
    assert result.summary["class_counts"] is not None and sum(result.summary["class_counts"]) == 80


def test_balanced_subset_refuses_missing_or_foreign_losses_and_bad_scales(digits_run):
    cfg = dict(data=digits_run.data, out=str(digits_run.out), device="cpu", method="balanced", size=10)
    with pytest.raises(MkdtError, match="losses"):
        select_subset(SubsetConfig(name="a", **cfg))
    write_losses(digits_run, fingerprint="someotherdata")
    with pytest.raises(MkdtError, match="other data"):
        select_subset(SubsetConfig(name="b", **cfg))
    write_losses(digits_run)
    with pytest.raises(MkdtError, match="does not divide"):
        select_subset(SubsetConfig(name="c", image_scale=3, **cfg))
    with pytest.raises(MkdtError, match="more than the data"):
        select_subset(SubsetConfig(name="d", **{**cfg, "size": 500}, image_scale=2))
    for name in "abcd":
        assert not (digits_run.out / "subsets" / name).exists()

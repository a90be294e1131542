"""Cluster-balanced hard examples, as pure tensor functions (the ``balanced`` subset method).

Why: MKDT's high-loss initial set takes the k examples with the highest mean expert loss, and those
pile up in a few latent classes (on CIFAR-10 from 10 to 204 images per class). Here the teacher's
representations are clustered by k-means (unit-normalised, as SAS does) and every cluster gives the
same share of the set, filled with its own highest-loss members (or random ones: the control that
separates "balanced" from "hard"). No label is read.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from mkdt.baselines.sas import kmeans_assign
from mkdt.errors import MkdtError

WITHIN = ("high_loss", "random")


def equal_shares(cluster_sizes: Sequence[int], total: int) -> list[int]:
    """``total`` spread as evenly as possible over the clusters, never more than a cluster holds: what a
    small cluster cannot take goes to the others (remainders to the lower indices)."""
    sizes = [int(s) for s in cluster_sizes]
    if total > sum(sizes):
        raise MkdtError(f"cannot keep {total} images out of {sum(sizes)}")
    keep = [0] * len(sizes)
    left = total
    while left:
        open_ = [i for i, s in enumerate(sizes) if keep[i] < s]
        share, extra = divmod(left, len(open_))
        for rank, i in enumerate(open_):
            add = min(share + (rank < extra), sizes[i] - keep[i])
            keep[i] += add
            left -= add
    return keep


def balanced_select(mean_loss: torch.Tensor, embeddings: torch.Tensor, size: int, clusters: int, seed: int, *,
                    within: str = "high_loss", n_init: int = 3) -> tuple[torch.Tensor, dict]:
    """Sorted indices (int64) of ``size`` rows: an equal share of every k-means cluster of ``embeddings``,
    its highest-``mean_loss`` members (``within="random"``: random members), and per-cluster statistics."""
    n = len(mean_loss)
    if embeddings.shape[0] != n:
        raise MkdtError(f"{embeddings.shape[0]} embeddings but {n} per-example losses")
    if not 0 < size <= n:
        raise MkdtError(f"balanced subset size must be between 1 and {n}, got {size}")
    if within not in WITHIN:
        raise MkdtError(f"balanced subset: within must be one of {', '.join(WITHIN)}, got {within!r}")
    unit = F.normalize(embeddings.detach().float(), dim=1)
    assignments = kmeans_assign(unit, clusters, seed, n_init=n_init)
    sizes = torch.bincount(assignments, minlength=clusters).tolist()
    keep = equal_shares(sizes, size)
    rng = torch.Generator().manual_seed(int(seed))
    chosen = []
    for c in range(clusters):
        members = torch.nonzero(assignments == c).flatten()  # ascending index: stable ties
        if within == "high_loss":
            order = torch.sort(mean_loss[members], descending=True, stable=True).indices
        else:
            order = torch.randperm(len(members), generator=rng)
        chosen.append(members[order[:keep[c]]])
    indices = torch.sort(torch.cat(chosen)).values
    info = {"cluster_sizes": sizes, "kept_per_cluster": keep, "within": within,
            "mean_loss_kept": float(mean_loss[indices].mean()), "mean_loss_all": float(mean_loss.mean())}
    return indices, info

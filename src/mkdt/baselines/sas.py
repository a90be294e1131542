"""SAS subset selection (Joshi & Mirzasoleiman, 2023) as pure tensor functions.

Why this shape: SAS keeps, inside each approximate latent class, the examples whose augmentations look
most like the rest of their class (they contribute most to contrastive learning). Latent classes come
from k-means on a proxy encoder's embeddings; an example's score is the sum of its *positive* cosine
similarities to the other members of its cluster. Computed in row chunks so that a 50,000-image
cluster never materialises a 50,000 x 50,000 matrix.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mkdt.errors import MkdtError


def kmeans_assign(embeddings: torch.Tensor, clusters: int, seed: int, *, n_init: int = 3,
                  minibatch: bool = False, max_iter: int = 300) -> torch.Tensor:
    """Cluster index (int64, N) of every row, from scikit-learn k-means seeded with ``seed``."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    n = embeddings.shape[0]
    if clusters < 1 or clusters > n:
        raise MkdtError(f"SAS clusters must be between 1 and the number of images ({n}), got {clusters}")
    data = embeddings.detach().to("cpu", torch.float32).numpy()
    state = int(seed) % (2**32)
    if minibatch:
        km = MiniBatchKMeans(n_clusters=clusters, random_state=state, n_init=n_init, max_iter=max_iter,
                             batch_size=4096)
    else:
        km = KMeans(n_clusters=clusters, random_state=state, n_init=n_init, max_iter=max_iter)
    labels = km.fit_predict(data)
    return torch.from_numpy(np.asarray(labels, dtype=np.int64))


def positive_similarity_scores(embeddings: torch.Tensor, assignments: torch.Tensor, *,
                               chunk_elements: int = 1 << 24) -> torch.Tensor:
    """For every row: sum of max(0, cos(z_i, z_j)) over the other rows j of its cluster (float64).

    ``chunk_elements`` bounds the size of each similarity block (rows x cluster size).
    """
    if embeddings.shape[0] != assignments.shape[0]:
        raise MkdtError(f"{embeddings.shape[0]} embeddings but {assignments.shape[0]} cluster assignments")
    z = F.normalize(embeddings.detach().float(), dim=1)
    scores = torch.zeros(z.shape[0], dtype=torch.float64, device=z.device)
    assignments = assignments.to(z.device)
    for c in torch.unique(assignments).tolist():
        members = torch.nonzero(assignments == c).flatten()
        zc = z[members]
        rows = max(1, chunk_elements // max(1, len(members)))
        for start in range(0, len(members), rows):
            block = zc[start:start + rows] @ zc.T  # rows x cluster size
            local = torch.arange(block.shape[0], device=z.device)
            block[local, start + local] = 0.0  # the example itself does not count
            scores[members[start:start + rows]] = block.clamp_min_(0).sum(1, dtype=torch.float64)
    return scores.cpu()


def allocate(cluster_sizes: Sequence[int], total: int) -> list[int]:
    """How many to keep from each cluster: proportional to its size, summing exactly to ``total``, and
    at least one from every non-empty cluster (largest-remainder rounding, ties to the lower index)."""
    sizes = [int(s) for s in cluster_sizes]
    n = sum(sizes)
    nonempty = sum(1 for s in sizes if s > 0)
    if total > n:
        raise MkdtError(f"cannot keep {total} images out of {n}")
    if total < nonempty:
        raise MkdtError(f"a subset of {total} images cannot represent all {nonempty} clusters; "
                        f"use fewer clusters (clusters=...) or a larger size")
    quota = [total * s / n for s in sizes]
    keep = [min(s, max(1, int(q))) if s > 0 else 0 for s, q in zip(sizes, quota)]
    while sum(keep) < total:  # give to the clusters most under their quota
        c = max((i for i in range(len(sizes)) if keep[i] < sizes[i]), key=lambda i: (quota[i] - keep[i], -i))
        keep[c] += 1
    while sum(keep) > total:  # minimum-one bumps overshot: take from the most over-served clusters
        c = min((i for i in range(len(sizes)) if keep[i] > 1), key=lambda i: (quota[i] - keep[i], i))
        keep[c] -= 1
    return keep


def sas_select(embeddings: torch.Tensor, size: int, clusters: int, seed: int, *, n_init: int = 3,
               minibatch: bool = False, chunk_elements: int = 1 << 24) -> tuple[torch.Tensor, dict]:
    """Indices (sorted, int64) of the SAS subset of ``size`` rows, and per-cluster statistics."""
    n = embeddings.shape[0]
    if not 0 < size <= n:
        raise MkdtError(f"SAS subset size must be between 1 and {n}, got {size}")
    if not torch.isfinite(embeddings).all():
        raise MkdtError("SAS proxy embeddings contain NaN/inf; recompute the targets or encoder features")
    unit = F.normalize(embeddings.detach().float(), dim=1)
    assignments = kmeans_assign(unit, clusters, seed, n_init=n_init, minibatch=minibatch)
    scores = positive_similarity_scores(unit, assignments, chunk_elements=chunk_elements)
    sizes = torch.bincount(assignments, minlength=clusters).tolist()
    keep = allocate(sizes, size)
    chosen = []
    for c in range(clusters):
        members = torch.nonzero(assignments == c).flatten()  # ascending index: stable ties
        if keep[c] == 0:
            continue
        order = torch.sort(scores[members], descending=True, stable=True).indices
        chosen.append(members[order[:keep[c]]])
    indices = torch.sort(torch.cat(chosen)).values
    info = {"cluster_sizes": sizes, "kept_per_cluster": keep,
            "mean_score_kept": float(scores[indices].mean()), "mean_score_all": float(scores.mean())}
    return indices, info

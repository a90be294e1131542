"""Encoding image sets with a frozen encoder, and the weighted kNN monitor of InstDisc / SimCLR.

The kNN monitor (k=200, T=0.1, cosine similarity) classifies each query by a vote of its k nearest
bank features, each weighted by ``exp(similarity / T)``; it needs no training, so it is a cheap,
label-free-training check of representation quality during SSL.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mkdt.data.imageset import normalize


@torch.no_grad()
def encode(model: nn.Module, images: torch.Tensor, mean: Sequence[float], std: Sequence[float], *,
           batch_size: int = 512, device: str | torch.device = "cpu", progress: str | None = None) -> torch.Tensor:
    """``model.features`` of uint8 images (eval mode, no augmentation, normalised), float32 on the CPU.

    ``progress``: a name to report progress under (``None``: silent)."""
    from mkdt.progress import Progress

    was_training = model.training
    model.eval()
    layout = _memory_format(model)
    out = []
    chunks = images.split(batch_size)
    try:
        with Progress(len(chunks), progress or "encode", unit="batch", enabled=progress is not None) as bar:
            for chunk in chunks:
                x = normalize(chunk.to(device, non_blocking=True), mean, std).contiguous(memory_format=layout)
                out.append(model.features(x).float().cpu())
                bar.update(1)
    finally:
        model.train(was_training)
    if not out:
        return torch.zeros(0, 0)
    return torch.cat(out)


def _memory_format(model: nn.Module) -> torch.memory_format:
    """Channels-last inputs for a model whose conv weights are channels-last (faster on CPU)."""
    for p in model.parameters():
        if p.dim() == 4:
            cl = p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
            return torch.channels_last if cl else torch.contiguous_format
    return torch.contiguous_format


@torch.no_grad()
def knn_predict(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, *, k: int = 200,
                temperature: float = 0.1, num_classes: int | None = None, exclude_self: bool = False,
                chunk: int = 512) -> torch.Tensor:
    """Predicted labels of ``queries`` by a similarity-weighted vote of their k nearest bank features.

    ``exclude_self``: queries are the bank itself (same order); each query's own entry is ignored.
    """
    bank = F.normalize(bank.float(), dim=1)
    queries = F.normalize(queries.float(), dim=1)
    bank_labels = bank_labels.long()
    classes = num_classes or int(bank_labels.max()) + 1
    k = min(k, len(bank) - (1 if exclude_self else 0))
    preds = []
    for start in range(0, len(queries), chunk):
        q = queries[start:start + chunk]
        sim = q @ bank.T
        if exclude_self:
            rows = torch.arange(len(q))
            sim[rows, rows + start] = -float("inf")
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(len(q), classes).scatter_add_(1, bank_labels[top_idx], weights)
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def knn_accuracy(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor,
                 *, k: int = 200, temperature: float = 0.1, exclude_self: bool = False) -> float:
    """Fraction of queries whose kNN vote equals their label."""
    classes = int(max(bank_labels.max(), query_labels.max())) + 1
    pred = knn_predict(bank, bank_labels, queries, k=k, temperature=temperature, num_classes=classes,
                       exclude_self=exclude_self)
    return float((pred == query_labels.long()).float().mean())

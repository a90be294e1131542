"""scikit-learn's 8x8 digits: the one real image set present on every machine, without a download.

Why a fixed split: the set has none, and every stage must agree on which images are "train"; a
stratified split with seed 0 (1,437 train / 360 test) is deterministic across runs and machines.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mkdt.data.registry import DataConfig, register_source
from mkdt.data.sources.base import Decoded, Source

TEST_SIZE = 360
SPLIT_SEED = 0


@register_source("digits")
class DigitsSource(Source):
    """1,797 grayscale 8x8 digits; splits ``train`` (1,437), ``test`` (360) and ``all``."""

    splits = ("train", "test", "all")
    cacheable = False  # loading from the sklearn package takes milliseconds

    def locate(self, cfg: DataConfig) -> Path | None:
        return None

    def decode(self, cfg: DataConfig, path: Path | None, split: str) -> Decoded:
        from sklearn.datasets import load_digits

        digits = load_digits()
        # Values are 0..16: scale to the full uint8 range.
        pixels = np.rint(digits.images.astype(np.float64) * (255.0 / 16.0)).astype(np.uint8)
        images = torch.from_numpy(pixels).unsqueeze(1)
        labels = torch.from_numpy(digits.target.astype(np.int64))
        if split != "all":
            idx = torch.from_numpy(split_indices(digits.target)[split])
            images, labels = images[idx], labels[idx]
        return Decoded(images.contiguous(), labels, [str(i) for i in range(10)])


def split_indices(target: np.ndarray) -> dict[str, np.ndarray]:
    from sklearn.model_selection import train_test_split

    train, test = train_test_split(np.arange(len(target)), test_size=TEST_SIZE, random_state=SPLIT_SEED,
                                   stratify=target)
    return {"train": np.sort(train), "test": np.sort(test)}

"""Shared helpers for the evaluation tests: tiny encoders on the 8x8 digits and single-threaded torch.

Why one thread: the machine's two cores are shared; tiny LBFGS/ConvNet problems run an order of
magnitude faster single-threaded than with contended OpenMP threads. The setting is restored after
each test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mkdt.data import DataConfig
from mkdt.evaluate import PretrainConfig, pretrain
from mkdt.models import ModelConfig

TINY = ModelConfig(name="convnet", depth=2, width=8)
DIGITS8 = DataConfig(name="digits", resolution=8)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def random_encoder(tmp_path):
    """``random_encoder(name=..., model=..., data=..., seed=...)``: a random-init encoder file saved by
    ``pretrain(kind="none")`` under ``tmp_path``."""

    def make(*, name: str = "none", model: ModelConfig = TINY, data: DataConfig = DIGITS8, seed: int = 0,
             out: Path | None = None) -> Path:
        result = pretrain(PretrainConfig(kind="none", name=name, out=str(out or tmp_path), data=data, model=model,
                                         seed=seed, device="cpu"))
        return result.outputs["encoder"]

    return make

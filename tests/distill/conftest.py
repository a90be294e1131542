"""Fixtures of the distill tests (the tiny problem itself is in ``distill_helpers``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distill_helpers import MODEL, TinyRun, build_tiny
from mkdt.distill import DistillConfig


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> TinyRun:
    root = tmp_path_factory.mktemp("tiny-run")
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # see one_thread below; this fixture is built before function fixtures
    try:
        return build_tiny(root)
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def config(tiny: TinyRun, tmp_path: Path) -> DistillConfig:
    """A fast config on the tiny problem (CPU, plain path, checkpoints every 5 iterations)."""
    return DistillConfig(model=MODEL, experts_dir=str(tiny.experts), init=str(tiny.init), out=str(tmp_path / "run"),
                         device="cpu", iterations=10, syn_steps=4, expert_epochs=2, max_start_epoch=2,
                         lr_img=100.0, lr_targets=1.0, lr_lr=1e-3, batch_syn=16, memory_saving=False,
                         checkpoint_every=5, grid_images=16)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread avoids OpenMP barrier stalls when other jobs share the 2 cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

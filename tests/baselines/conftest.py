"""Fixtures for the baseline tests: a digits run directory with teacher targets from a fixed random
encoder, an isolated data cache, and one torch thread (tiny ops on a shared 2-core CPU are many
times slower with two OpenMP threads competing with other processes)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mkdt.data import DataConfig, load_dataset
from mkdt.formats import save_targets
from mkdt.models import build_model
from mkdt.runtime import seeded


@pytest.fixture(autouse=True)
def one_thread_and_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MKDT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_targets(out: Path, data: DataConfig, dim: int = 8, seed: int = 0) -> torch.Tensor:
    """Targets = the first ``dim`` features of a fixed random ConvNet, at <out>/targets/targets.safetensors."""
    images = load_dataset(data)
    with seeded(seed):
        encoder = build_model("convnet", depth=1, width=8, in_channels=images.channels,
                              resolution=images.resolution).eval()
    with torch.no_grad():
        values = encoder(images.normalize())[:, :dim].contiguous()
    save_targets(out / "targets" / "targets.safetensors", values, images.fingerprint(), data_name=images.name,
                 mean=list(images.mean), std=list(images.std))
    return values


@pytest.fixture
def make_targets():
    """The targets writer, for tests that need another run directory or target dimension."""
    return write_targets


@pytest.fixture
def digits_run(tmp_path: Path) -> SimpleNamespace:
    """A run directory over digits at 8 px with 8-d targets."""
    data = DataConfig(name="digits", resolution=8)
    out = tmp_path / "run"
    values = write_targets(out, data)
    return SimpleNamespace(out=out, data=data, targets=values, n=len(values))

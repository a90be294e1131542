"""Fixtures for the expert/init tests: digits at 8 px, targets from a fixed random projection of the
pixels (saved with ``save_targets``), an isolated data cache, and one torch thread (tiny ops on a
shared 2-core CPU are much slower with two OpenMP threads competing with other processes)."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mkdt.data import DataConfig, load_dataset
from mkdt.experts import ExpertsConfig, InitConfig
from mkdt.formats import save_targets
from mkdt.models import ModelConfig
from mkdt.training import RegressionSchedule

TINY = ModelConfig(name="convnet", width=8, depth=1, norm="instancenorm", pool="avgpool")
SCHEDULE_KEYS = ("epochs", "lr", "momentum", "weight_decay", "batch_size")


@pytest.fixture(autouse=True)
def one_thread_and_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MKDT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_targets(out: Path, data: DataConfig, dim: int = 6, seed: int = 0) -> torch.Tensor:
    """Targets = a fixed random linear projection of the normalised pixels, at <out>/targets/."""
    images = load_dataset(data)
    g = torch.Generator().manual_seed(seed)
    x = images.normalize().flatten(1)
    values = (x @ torch.randn(x.shape[1], dim, generator=g)) / x.shape[1] ** 0.5
    save_targets(out / "targets" / "targets.safetensors", values, images.fingerprint(), data_name=images.name,
                 mean=list(images.mean), std=list(images.std))
    return values


@pytest.fixture(scope="session")
def digits() -> DataConfig:
    return DataConfig(name="digits", resolution=8)


@pytest.fixture
def run(tmp_path: Path, digits: DataConfig) -> SimpleNamespace:
    """A run directory with targets, and builders for small expert / init configs in it."""
    out = tmp_path / "run"
    values = write_targets(out, digits)

    def experts(**overrides) -> ExpertsConfig:
        sched = {k: overrides.pop(k) for k in SCHEDULE_KEYS if k in overrides}
        base = dict(data=digits, model=TINY, num_experts=3, out=str(out), device="cpu",
                    schedule=RegressionSchedule(**{"epochs": 2, "batch_size": 128, **sched}))
        return ExpertsConfig(**{**base, **overrides})

    def init(**overrides) -> InitConfig:
        base = dict(data=digits, model=TINY, size=0.05, out=str(out), device="cpu")
        return InitConfig(**{**base, **overrides})

    def clone(name: str) -> Path:
        """Another run directory with the same targets (for comparing runs)."""
        other = tmp_path / name
        shutil.copytree(out / "targets", other / "targets")
        return other

    return SimpleNamespace(out=out, data=digits, targets=values, n=len(values), experts=experts, init=init,
                           clone=clone)


@pytest.fixture
def cli_run(tmp_path: Path, digits: DataConfig) -> Path:
    """A run directory holding only digits targets (for CLI tests)."""
    out = tmp_path / "cli"
    write_targets(out, digits)
    return out

"""Fixtures for the data tests: tiny image folders, archives and IDX files written into tmp_path.

Every test gets its own empty cache folder (``MKDT_CACHE_DIR``) so nothing is written to the home
folder and no test sees another's cache; the tests on the real shared data share one session cache so
the 60,000 CIFAR JPEGs are decoded once.
"""

from __future__ import annotations

import gzip
import os
import struct
import tarfile
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pytest
import torch
from torchvision.io import encode_jpeg, encode_png


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("MKDT_CACHE_DIR", str(folder))
    return folder


# ----------------------------------------------------------------------------------------------
# images
# ----------------------------------------------------------------------------------------------
def solid(value: int, size: tuple[int, int] = (8, 8), channels: int = 3) -> torch.Tensor:
    """A flat image: JPEG keeps flat colours (nearly) exact, so tests can tell images apart."""
    return torch.full((channels, *size), value, dtype=torch.uint8)


def write_image(path: Path, img: torch.Tensor) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    encoder = encode_png if path.suffix.lower() == ".png" else encode_jpeg
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its codecs, once per call
        warnings.simplefilter("ignore", DeprecationWarning)
        path.write_bytes(encoder(img).numpy().tobytes())
    return path


# Layout of the small image-folder fixture: split -> class -> list of pixel values.
FOLDER_LAYOUT = {
    "train": {"cat": [10, 20, 30], "dog": [110, 120], "emu": [210]},
    "test": {"cat": [40], "dog": [130], "emu": [220, 230]},
}


def make_image_folder(root: Path, layout: dict = FOLDER_LAYOUT, size: tuple[int, int] = (8, 8)) -> Path:
    """``root/<split>/<class>/<nn>.png`` (PNG: lossless, so pixel values can be asserted exactly)."""
    for split, classes in layout.items():
        for cls, values in classes.items():
            for i, v in enumerate(values):
                write_image(root / split / cls / f"{i:02d}.png", solid(v, size))
    return root


def make_tar(src: Path, dest: Path, arcname: str | None = None) -> Path:
    mode = "w:gz" if dest.name.endswith((".gz", ".tgz")) else "w"
    with tarfile.open(dest, mode) as tf:
        tf.add(src, arcname=arcname if arcname is not None else ".")
    return dest


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "folder")


@pytest.fixture
def image_tar(tmp_path: Path) -> Path:
    src = make_image_folder(tmp_path / "src")
    return make_tar(src, tmp_path / "set.tar.gz", arcname="myset")


@pytest.fixture
def folder_factory(tmp_path: Path) -> Callable[..., Path]:
    return lambda name="folder", layout=FOLDER_LAYOUT, size=(8, 8): make_image_folder(tmp_path / name, layout, size)


# ----------------------------------------------------------------------------------------------
# IDX
# ----------------------------------------------------------------------------------------------
def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, magic: int, compress: bool = True) -> Path:
    data = idx_bytes(array, magic)
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def make_idx_folder(root: Path, n_train: int = 12, n_test: int = 5, compress: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    suffix = ".gz" if compress else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 6, 5)), 2051, compress)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", np.arange(n) % 10, 2049, compress)
    return root


# ----------------------------------------------------------------------------------------------
# the real shared data (skipped when absent)
# ----------------------------------------------------------------------------------------------
def shared_data_dir() -> Path:
    env = os.environ.get("MKDT_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shared-cache")


def shared_file(relative: str) -> Path:
    path = shared_data_dir() / relative
    if not path.exists():
        pytest.skip(f"{path} is absent (set MKDT_SHARED_DATA to the folder holding it)")
    return path


@pytest.fixture
def kit() -> SimpleNamespace:
    """The helper functions above, for tests (conftest modules are not meant to be imported)."""
    return SimpleNamespace(solid=solid, write_image=write_image, make_image_folder=make_image_folder,
                           make_tar=make_tar, idx_bytes=idx_bytes, write_idx=write_idx,
                           make_idx_folder=make_idx_folder, shared_file=shared_file, layout=FOLDER_LAYOUT)

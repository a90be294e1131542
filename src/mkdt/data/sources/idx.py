"""MNIST-format (IDX) files: MNIST, Fashion-MNIST, KMNIST and friends, gzip-compressed or raw.

Why parse by hand: the format is a 4-byte magic number, big-endian int32 sizes and raw uint8 pixels,
so numpy reads it directly; checking the magic and the length catches a wrong or truncated file with a
message naming it, instead of a reshape error later.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from mkdt.data.registry import DataConfig, register_source
from mkdt.data.sources.base import Decoded, Source, require_root
from mkdt.errors import MkdtError

IMAGES_MAGIC = 2051  # 0x00000803: unsigned byte, 3 dimensions
LABELS_MAGIC = 2049  # 0x00000801: unsigned byte, 1 dimension
PREFIX = {"train": "train", "test": "t10k"}
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]


@register_source("idx")
class IdxSource(Source):
    """``root`` is a folder with ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``."""

    def locate(self, cfg: DataConfig) -> Path:
        root = require_root(cfg, self.name, "the folder holding train-images-idx3-ubyte.gz and friends")
        if not root.is_dir():
            raise MkdtError(f"{root}: not a folder; set data.root to the folder holding the IDX files")
        return root

    def decode(self, cfg: DataConfig, path: Path | None, split: str) -> Decoded:
        assert path is not None
        prefix = PREFIX[split]
        images = read_idx(find_idx(path, f"{prefix}-images-idx3-ubyte", f"{prefix}-images.idx3-ubyte"), IMAGES_MAGIC)
        label_file = find_idx(path, f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels.idx1-ubyte")
        labels = read_idx(label_file, LABELS_MAGIC)
        if labels.shape[0] != images.shape[0]:
            raise MkdtError(f"{label_file}: {labels.shape[0]} labels for {images.shape[0]} images; "
                            f"the image and label files do not belong together")
        num = max(10, int(labels.max()) + 1 if labels.size else 0)
        names = FASHION_CLASSES if "fashion" in path.name.lower() and num == 10 else [str(i) for i in range(num)]
        tensor = torch.from_numpy(images.copy()).unsqueeze(1)  # N x 1 x H x W
        return Decoded(tensor, torch.from_numpy(labels.astype(np.int64)), list(names))


def find_idx(folder: Path, *stems: str) -> Path:
    """The first existing ``<stem>.gz`` or ``<stem>`` in ``folder``."""
    for stem in stems:
        for name in (f"{stem}.gz", stem):
            if (folder / name).is_file():
                return folder / name
    raise MkdtError(f"{folder / (stems[0] + '.gz')}: not found (nor the uncompressed file); "
                    f"put the MNIST-format files in {folder}")


def read_idx(path: Path, magic: int) -> np.ndarray:
    """The uint8 array stored in an IDX file, after checking its magic number and length."""
    data = _read_bytes(path)
    if len(data) < 4 or int.from_bytes(data[:4], "big") != magic:
        got = int.from_bytes(data[:4], "big") if len(data) >= 4 else "none"
        kind = "images" if magic == IMAGES_MAGIC else "labels"
        raise MkdtError(f"{path}: magic number {got}, expected {magic} (IDX {kind}); this is not the right file")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise MkdtError(f"{path}: header is truncated; replace the file")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise MkdtError(f"{path}: {len(data)} bytes, expected {expected} for shape {dims}; the file is truncated "
                        f"or corrupt, replace it")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _read_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
        return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (OSError, EOFError, zlib.error) as exc:
        raise MkdtError(f"{path}: cannot read ({exc}); the file is truncated or corrupt, replace it") from None

"""CUB-200-2011 and Stanford Dogs: downstream sets read from their own index files.

Why by hand: torchvision has no loader for either. Both hold photos of varying size, so they need a
``resolution`` and every image is resized as it is decoded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mkdt.data.registry import DataConfig, register_source
from mkdt.data.sources.base import Decoded, Source, read_text_lines, require_root, sorted_subdirs
from mkdt.data.sources.decode import ImageStack, read_and_decode
from mkdt.errors import MkdtError


def _decode_files(files: list[Path], labels: list[int], classes: list[str], resolution: int | None) -> Decoded:
    stack = ImageStack(resolution)
    for file in files:
        stack.add(read_and_decode(file), str(file))
    return Decoded(stack.finish(), torch.tensor(labels, dtype=torch.int64), classes)


# ----------------------------------------------------------------------------------------------
# CUB-200-2011
# ----------------------------------------------------------------------------------------------
@register_source("cub200")
class Cub200Source(Source):
    """``root`` is ``CUB_200_2011/`` (or its parent): images.txt, image_class_labels.txt, ...,  images/."""

    needs_resolution = True
    resolution_in_key = True
    hint = "re-extract CUB_200_2011.tgz"

    def locate(self, cfg: DataConfig) -> Path:
        root = require_root(cfg, self.name, "the CUB_200_2011 folder")
        if (root / "CUB_200_2011").is_dir():
            root = root / "CUB_200_2011"
        if not (root / "images.txt").is_file():
            raise MkdtError(f"{root / 'images.txt'}: not found; set data.root to the CUB_200_2011 folder")
        return root

    def decode(self, cfg: DataConfig, path: Path | None, split: str) -> Decoded:
        assert path is not None
        files = self._table(path / "images.txt")
        labels = self._table(path / "image_class_labels.txt")
        is_train = self._table(path / "train_test_split.txt")
        classes = self._table(path / "classes.txt")
        names = [classes[k].split(".", 1)[-1] for k in sorted(classes, key=int)]
        want = "1" if split == "train" else "0"
        ids = sorted((i for i in files if is_train.get(i) == want), key=int)
        for i in ids:
            if i not in labels or not labels[i].isdigit() or not 1 <= int(labels[i]) <= len(names):
                raise MkdtError(f"{path / 'image_class_labels.txt'}: no valid label for image id {i}; {self.hint}")
        return _decode_files([path / "images" / files[i] for i in ids], [int(labels[i]) - 1 for i in ids], names,
                             cfg.resolution)

    def _table(self, file: Path) -> dict[str, str]:
        """``<id> <value>`` lines as a dict (the format of every CUB index file)."""
        table = {}
        for n, line in enumerate(read_text_lines(file, self.hint), 1):
            key, _, value = line.partition(" ")
            if not value:
                raise MkdtError(f"{file}:{n}: expected '<id> <value>'; {self.hint}")
            table[key] = value.strip()
        return table


# ----------------------------------------------------------------------------------------------
# Stanford Dogs
# ----------------------------------------------------------------------------------------------
@register_source("dogs")
class StanfordDogsSource(Source):
    """``root`` holds ``Images/<wnid>-<breed>/`` and ``{train,test}_list.txt`` or ``.mat`` (maybe in lists/)."""

    needs_resolution = True
    resolution_in_key = True

    def locate(self, cfg: DataConfig) -> Path:
        root = require_root(cfg, self.name, "the Stanford Dogs folder (holding Images/ and the lists)")
        if not (root / "Images").is_dir():
            raise MkdtError(f"{root / 'Images'}: not found; set data.root to the Stanford Dogs folder")
        return root

    def decode(self, cfg: DataConfig, path: Path | None, split: str) -> Decoded:
        assert path is not None
        folders = [d.name for d in sorted_subdirs(path / "Images")]
        index = {name: i for i, name in enumerate(folders)}
        list_file, rels = read_dogs_list(path, split)
        labels = []
        for rel in rels:
            folder = rel.split("/", 1)[0]
            if folder not in index:
                raise MkdtError(f"{list_file}: entry '{rel}' is not under a folder of {path / 'Images'}; "
                                f"re-extract images.tar and lists.tar")
            labels.append(index[folder])
        names = [name.split("-", 1)[-1] for name in folders]
        return _decode_files([path / "Images" / rel for rel in rels], labels, names, cfg.resolution)


def read_dogs_list(root: Path, split: str) -> tuple[Path, list[str]]:
    """Relative image paths of a split, from ``<split>_list.txt`` (first column) or ``.mat``."""
    for folder in (root, root / "lists"):
        txt = folder / f"{split}_list.txt"
        if txt.is_file():
            return txt, [line.split()[0] for line in read_text_lines(txt, "")]
    for folder in (root, root / "lists"):
        mat = folder / f"{split}_list.mat"
        if mat.is_file():
            return mat, _read_mat_list(mat)
    raise MkdtError(f"{root / f'{split}_list.mat'}: not found (nor .txt, nor under lists/); extract lists.tar there")


def _read_mat_list(mat: Path) -> list[str]:
    try:
        from scipy.io import loadmat
    except ImportError:
        raise MkdtError(f"{mat}: reading .mat lists needs scipy (pip install scipy), "
                        f"or write {mat.with_suffix('.txt').name} with one relative image path per line") from None
    try:
        entries = loadmat(str(mat), squeeze_me=True)["file_list"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MkdtError(f"{mat}: not a Stanford Dogs list ({exc}); re-extract lists.tar") from None
    return [str(e).replace("\\", "/") for e in np.atleast_1d(entries).ravel().tolist()]

"""Sets whose files torchvision knows how to download and index: CIFAR-10/100, Flowers-102, Aircraft.

Why still through torchvision: it owns the download URLs and checksums. We only use it to fetch and
list the files; pixels are converted in one array operation (CIFAR) or decoded with torchvision.io and
resized as they are read (the photo sets), never through per-image PIL.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mkdt.data.registry import DataConfig, register_source
from mkdt.data.sources.base import Decoded, Source
from mkdt.data.sources.decode import ImageStack, read_and_decode
from mkdt.errors import MkdtError

DOWNLOAD_HINT = "pass download=True (--set data.download=true) on a machine with internet, or copy the files there"


def _root(cfg: DataConfig, source: str, folder: str) -> Path:
    """The torchvision root (the folder that holds ``folder``); accepts ``folder`` itself too."""
    if not cfg.root:
        raise MkdtError(f"data source '{source}' needs a root; set data.root (--set data.root=...) to the folder "
                        f"that holds {folder}/")
    root = Path(cfg.root).expanduser().resolve()
    return root.parent if root.name == folder else root


def _expected(root: Path, folder: str, download: bool) -> Path:
    """``root/folder`` if present; else an error saying where the files go (unless downloading).

    A folder that exists but is incomplete fails later, in decode, asking to delete it and download again.
    """
    path = root / folder
    if not path.is_dir() and not download:
        raise MkdtError(f"{path}: not found (the {folder} files are expected there); {DOWNLOAD_HINT}")
    return path


def _construct(cls: Any, where: Path, **kwargs: Any) -> Any:
    """Build a torchvision dataset, turning its download/integrity failures into one-line errors."""
    try:
        return cls(**kwargs)
    except OSError as exc:  # URLError, socket errors and timeouts are OSErrors too
        if kwargs.get("download"):
            raise MkdtError(f"{where}: download failed ({exc}); copy the files there by hand or retry with "
                            f"internet") from None
        raise MkdtError(f"{where}: cannot read the files ({exc}); check permissions or copy them again") from None
    except RuntimeError as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MkdtError(f"{where}: {msg}; delete the folder and {DOWNLOAD_HINT}") from None


# ----------------------------------------------------------------------------------------------
# CIFAR
# ----------------------------------------------------------------------------------------------
class _Cifar(Source):
    folder = ""

    def dataset_class(self) -> Any:
        raise NotImplementedError

    def locate(self, cfg: DataConfig) -> Path:
        root = _root(cfg, self.name, self.folder)
        path = _expected(root, self.folder, cfg.download)
        if cfg.download and not path.is_dir():  # only when missing: every load calls locate
            _construct(self.dataset_class(), path, root=str(root), train=True, download=True)
        return path

    def decode(self, cfg: DataConfig, path: Path | None, split: str) -> Decoded:
        assert path is not None
        ds = _construct(self.dataset_class(), path, root=str(path.parent), train=split == "train", download=False)
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # N H W C -> N C H W
        return Decoded(images, torch.as_tensor(ds.targets, dtype=torch.int64), [str(c) for c in ds.classes])


@register_source("cifar10")
class Cifar10Source(_Cifar):
    """``root`` holds ``cifar-10-batches-py/`` (the python version of CIFAR-10)."""

    folder = "cifar-10-batches-py"
    stats = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))

    def dataset_class(self) -> Any:
        from torchvision.datasets import CIFAR10

        return CIFAR10


@register_source("cifar100")
class Cifar100Source(_Cifar):
    """``root`` holds ``cifar-100-python/``."""

    folder = "cifar-100-python"
    stats = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))

    def dataset_class(self) -> Any:
        from torchvision.datasets import CIFAR100

        return CIFAR100


# ----------------------------------------------------------------------------------------------
# photo sets of varying size (downstream evaluation)
# ----------------------------------------------------------------------------------------------
class _PhotoSet(Source):
    """A torchvision set listing image files: decoded and resized to ``resolution`` one by one."""

    folder = ""
    needs_resolution = True
    resolution_in_key = True
    download_split = "train"

    def dataset_class(self) -> Any:
        raise NotImplementedError

    def locate(self, cfg: DataConfig) -> Path:
        root = _root(cfg, self.name, self.folder)
        path = _expected(root, self.folder, cfg.download)
        if cfg.download and not path.is_dir():  # only when missing: every load calls locate
            _construct(self.dataset_class(), path, root=str(root), split=self.download_split, download=True)
        return path

    def decode(self, cfg: DataConfig, path: Path | None, split: str) -> Decoded:
        assert path is not None and cfg.resolution is not None
        ds = _construct(self.dataset_class(), path, root=str(path.parent), split=split, download=False)
        files = getattr(ds, "_image_files", None)
        labels = getattr(ds, "_labels", None)
        if files is None or labels is None:
            raise MkdtError(f"{path}: this torchvision version does not expose the {self.name} file list; "
                            f"use torchvision 0.17-0.29 or the imagefolder source")
        stack = ImageStack(cfg.resolution)
        for file in files:
            stack.add(read_and_decode(Path(file)), str(file))
        num = int(max(labels)) + 1 if len(labels) else 0
        names = [str(c) for c in getattr(ds, "classes", [])] or [str(i) for i in range(num)]
        return Decoded(stack.finish(), torch.as_tensor(list(labels), dtype=torch.int64), names)


@register_source("flowers102")
class Flowers102Source(_PhotoSet):
    """Oxford Flowers-102: ``root`` holds ``flowers-102/`` (jpg/, imagelabels.mat, setid.mat; needs scipy)."""

    folder = "flowers-102"
    splits = ("train", "val", "test")

    def dataset_class(self) -> Any:
        from torchvision.datasets import Flowers102

        return Flowers102


@register_source("aircraft")
class AircraftSource(_PhotoSet):
    """FGVC-Aircraft (variants): ``root`` holds ``fgvc-aircraft-2013b/``."""

    folder = "fgvc-aircraft-2013b"
    splits = ("train", "val", "trainval", "test")

    def dataset_class(self) -> Any:
        from torchvision.datasets import FGVCAircraft

        return FGVCAircraft

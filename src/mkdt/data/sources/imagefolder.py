"""Image folders (a directory or a tar archive of ``<split>/<class>/<image>``) and Tiny ImageNet.

Why read tar archives in place: the shared CIFAR-10 copy is one 19 MB ``.tar.gz`` of 60,000 JPEGs;
extracting it would write 60,000 files for nothing. Members are streamed in archive order, their bytes
kept (small: JPEG-compressed), and each split is decoded once, sorted by class and path so the order
never depends on how the archive was built.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import lzma
import os
import tarfile
import zlib
from pathlib import Path, PurePosixPath
from typing import IO, Iterator

import torch

from mkdt.data.registry import DataConfig, register_source
from mkdt.data.sources.base import (
    Decoded,
    Source,
    SplitNotFound,
    read_text_lines,
    require_root,
    sorted_subdirs,
    visible,
)
from mkdt.data.sources.decode import ImageStack, is_image_name, read_and_decode
from mkdt.errors import MkdtError

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
LAYOUT = "<split>/<class>/<image> (optionally under one top-level folder)"


@register_source("imagefolder")
class ImageFolderSource(Source):
    """``root`` is a folder or a .tar/.tar.gz holding ``<split>/<class>/<image>``; splits are found."""

    splits = ()  # discovered from the files
    resolution_in_key = True

    def resolve_split(self, split: str) -> str:
        if not split or "/" in split or split.startswith("."):
            raise MkdtError(f"imagefolder: invalid split name '{split}'; use a split folder name such as train")
        return split

    def locate(self, cfg: DataConfig) -> Path:
        path = require_root(cfg, self.name, f"a folder or .tar/.tar.gz archive holding {LAYOUT}")
        if path.is_file() and not path.name.lower().endswith(TAR_SUFFIXES):
            raise MkdtError(f"{path}: not a folder or a tar archive ({', '.join(TAR_SUFFIXES)}); "
                            f"pass a folder or archive holding {LAYOUT}")
        return path

    def decode_many(self, cfg: DataConfig, path: Path | None, split: str) -> dict[str, Decoded]:
        assert path is not None
        if path.is_dir():
            return {split: decode_folder_split(path, split, cfg.resolution)}
        # One pass over the archive yields every split: decode them all rather than stream it again.
        return decode_tar(path, split, cfg.resolution)


# ----------------------------------------------------------------------------------------------
# directories
# ----------------------------------------------------------------------------------------------
def split_base(root: Path) -> Path:
    """The folder holding the split folders: ``root`` itself, or its only subfolder if that has them."""
    subdirs = sorted_subdirs(root)
    if len(subdirs) == 1 and _holds_split_folders(subdirs[0]):
        return subdirs[0]
    return root


def _holds_split_folders(folder: Path) -> bool:
    """True if the first child of ``folder`` contains folders (i.e. ``folder/<split>/<class>/``)."""
    for child in sorted_subdirs(folder):
        with os.scandir(child) as it:
            return any(entry.is_dir() for entry in it)
    return False


def decode_folder_split(root: Path, split: str, resolution: int | None) -> Decoded:
    base = split_base(root)
    splits = [d.name for d in sorted_subdirs(base)]
    if split not in splits:
        found = ", ".join(splits) or "none"
        raise SplitNotFound(f"{base}: no split folder '{split}' (found: {found}); expected {LAYOUT}")
    # Class names come from every split so train and test labels agree even if a split lacks a class.
    classes = sorted({c.name for s in splits for c in sorted_subdirs(base / s)})
    split_dir = base / split
    _reject_loose_images(split_dir)
    if not sorted_subdirs(split_dir):
        raise MkdtError(f"{split_dir}: no class folders; expected {LAYOUT}")
    stack, labels = ImageStack(resolution), []
    for label, cls in enumerate(classes):
        folder = split_dir / cls
        if not folder.is_dir():
            continue
        for file in image_files(folder):
            stack.add(read_and_decode(file), str(file))
            labels.append(label)
    return Decoded(stack.finish(), torch.tensor(labels, dtype=torch.int64), classes)


def image_files(folder: Path) -> list[Path]:
    """Sorted image files of a class folder; an empty folder is an error naming it."""
    files = sorted(p for p in folder.iterdir() if visible(p.name) and is_image_name(p.name) and p.is_file())
    if not files:
        raise MkdtError(f"{folder}: class folder holds no images (.jpg/.png/.gif/.webp); add images or remove it")
    return files


def _reject_loose_images(split_dir: Path) -> None:
    for p in sorted(split_dir.iterdir()):
        if p.is_file() and visible(p.name) and is_image_name(p.name):
            raise MkdtError(f"{p}: image outside a class folder; move it into {split_dir}/<class>/")


# ----------------------------------------------------------------------------------------------
# tar archives
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def open_tar_stream(path: Path) -> Iterator[tarfile.TarFile]:
    """A streaming (forward-only) tar reader; compression found from the file's magic bytes."""
    with open(path, "rb") as fh:
        magic = fh.read(6)
    opener = {b"\x1f\x8b": gzip.open, b"BZ": bz2.open, b"\xfd7": lzma.open}.get(magic[:2], open)
    with opener(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r|") as tf:  # type: ignore[operator]
        yield tf


class _TarScan:
    """Image members of an archive grouped by split, with the layout checked member by member."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, list[tuple[str, str, bytes]]] = {}  # split -> (class, member, bytes)
        self.dirs: set[tuple[str, ...]] = set()
        self.top: tuple[str, ...] | None = None

    def add(self, member: tarfile.TarInfo, fh: IO[bytes] | None) -> None:
        parts = PurePosixPath(member.name).parts
        if not parts or not all(visible(p) for p in parts) or parts[0] == "/":
            return
        if member.isdir():
            self.dirs.add(parts)
            return
        if not member.isfile() or fh is None or not is_image_name(parts[-1]):
            return
        if self.top is None:
            if len(parts) not in (3, 4):
                raise self._layout_error(member.name)
            self.top = parts[: len(parts) - 3]
        if len(parts) != len(self.top) + 3 or parts[: len(self.top)] != self.top:
            raise self._layout_error(member.name)
        split, cls = parts[-3], parts[-2]
        self.entries.setdefault(split, []).append((cls, member.name, fh.read()))

    def _layout_error(self, name: str) -> MkdtError:
        return MkdtError(f"{self.path} [{name}]: unexpected location; the archive must hold {LAYOUT}")

    def check_empty_classes(self) -> None:
        top = self.top or ()
        filled = {(s, cls) for s, items in self.entries.items() for cls, _, _ in items}
        for parts in sorted(self.dirs):
            if len(parts) == len(top) + 2 and parts[: len(top)] == top and tuple(parts[-2:]) not in filled:
                raise MkdtError(f"{self.path} [{'/'.join(parts)}]: class folder holds no images; "
                                f"add images or remove it from the archive")


def scan_tar(path: Path) -> _TarScan:
    scan = _TarScan(path)
    try:
        with open_tar_stream(path) as tf:
            for member in tf:
                scan.add(member, tf.extractfile(member) if member.isfile() else None)
    except (tarfile.TarError, EOFError, zlib.error, OSError, lzma.LZMAError) as exc:
        raise MkdtError(f"{path}: archive is truncated or corrupt ({exc}); re-copy or re-download it") from None
    if not scan.entries:
        raise MkdtError(f"{path}: no images found; the archive must hold {LAYOUT}")
    scan.check_empty_classes()
    return scan


def decode_tar(path: Path, split: str, resolution: int | None) -> dict[str, Decoded]:
    """Every split in the archive, decoded (``split`` must be one of them)."""
    scan = scan_tar(path)
    if split not in scan.entries:
        found = ", ".join(sorted(scan.entries))
        raise SplitNotFound(f"{path}: no split folder '{split}' in the archive (found: {found}); expected {LAYOUT}")
    classes = sorted({cls for items in scan.entries.values() for cls, _, _ in items})
    index = {cls: i for i, cls in enumerate(classes)}
    out: dict[str, Decoded] = {}
    for name in sorted(scan.entries):
        items = sorted(scan.entries.pop(name), key=lambda e: (index[e[0]], e[1]))
        stack = ImageStack(resolution)
        for _, member, data in items:
            stack.add_bytes(data, f"{path} [{member}]")
        labels = torch.tensor([index[cls] for cls, _, _ in items], dtype=torch.int64)
        del items
        out[name] = Decoded(stack.finish(), labels, list(classes))
    return out


# ----------------------------------------------------------------------------------------------
# Tiny ImageNet
# ----------------------------------------------------------------------------------------------
@register_source("tinyimagenet")
class TinyImageNetSource(Source):
    """``root`` is ``tiny-imagenet-200/`` (or its parent); ``test`` reads the labelled ``val`` folder."""

    splits = ("train", "val")
    aliases = {"test": "val"}

    def locate(self, cfg: DataConfig) -> Path:
        root = require_root(cfg, self.name, "the tiny-imagenet-200 folder")
        if (root / "tiny-imagenet-200").is_dir():
            root = root / "tiny-imagenet-200"
        if not (root / "train").is_dir():
            raise MkdtError(f"{root / 'train'}: not found; set data.root to the tiny-imagenet-200 folder "
                            f"(holding train/<wnid>/images/ and val/)")
        return root

    def decode(self, cfg: DataConfig, path: Path | None, split: str) -> Decoded:
        assert path is not None
        wnids = [d.name for d in sorted_subdirs(path / "train")]
        if split == "train":
            items = [(i, f) for i, w in enumerate(wnids) for f in image_files(_wnid_folder(path, w))]
        else:
            items = _val_items(path, wnids)
        stack = ImageStack(cfg.resolution)
        for _, file in items:
            stack.add(read_and_decode(file), str(file))
        labels = torch.tensor([label for label, _ in items], dtype=torch.int64)
        return Decoded(stack.finish(), labels, _wnid_names(path, wnids))


def _wnid_folder(root: Path, wnid: str) -> Path:
    folder = root / "train" / wnid
    return folder / "images" if (folder / "images").is_dir() else folder


def _val_items(root: Path, wnids: list[str]) -> list[tuple[int, Path]]:
    """(label, file) pairs from ``val/val_annotations.txt`` (file, wnid, box), sorted by file name."""
    ann = root / "val" / "val_annotations.txt"
    index = {w: i for i, w in enumerate(wnids)}
    items = []
    for n, line in enumerate(read_text_lines(ann, "it ships with Tiny ImageNet; re-extract the archive"), 1):
        fields = line.split()
        if len(fields) < 2 or fields[1] not in index:
            raise MkdtError(f"{ann}:{n}: expected '<file> <wnid> ...' with a wnid from train/; fix or re-extract")
        items.append((index[fields[1]], root / "val" / "images" / fields[0]))
    if not items:
        raise MkdtError(f"{ann}: no annotations; re-extract Tiny ImageNet")
    return sorted(items, key=lambda it: it[1].name)


def _wnid_names(root: Path, wnids: list[str]) -> list[str]:
    """Readable names from the optional ``words.txt`` (first synonym), else the wnids themselves."""
    words = root / "words.txt"
    if not words.is_file():
        return list(wnids)
    table = {}
    for line in read_text_lines(words, ""):
        wnid, _, text = line.partition("\t")
        table[wnid] = text.split(",")[0].strip() or wnid
    return [table.get(w, w) for w in wnids]

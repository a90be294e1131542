"""What a data source is, and the file checks every source shares.

Why a small class instead of a function per dataset: the cache needs to know, before decoding
anything, which files identify the data (their sizes and times key the cache), which splits exist and
whether the decode depends on ``resolution``. A source answers those questions; :mod:`mkdt.data.cache`
does the rest, so no source has to think about caching or normalisation statistics.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

import torch

from mkdt.errors import MkdtError

if TYPE_CHECKING:
    from mkdt.data.registry import DataConfig

Stats = tuple[tuple[float, ...], tuple[float, ...]]


@dataclass
class Decoded:
    """One decoded split: uint8 N x C x H x W images, int64 labels (or None) and class names."""

    images: torch.Tensor
    labels: torch.Tensor | None = None
    class_names: list[str] = field(default_factory=list)


class SplitNotFound(MkdtError):
    """The requested split does not exist in the source (the message lists the ones that do)."""


class Source:
    """A named way to turn files on disk into :class:`Decoded` splits.

    Subclasses set the class attributes and implement :meth:`locate` and :meth:`decode` (or
    :meth:`decode_many` when one pass over the files yields every split, as for a tar archive).
    """

    name: ClassVar[str] = ""
    splits: ClassVar[tuple[str, ...]] = ("train", "test")
    aliases: ClassVar[Mapping[str, str]] = {}
    # Known normalisation constants; None = computed from the train split (and cached).
    stats: ClassVar[Stats | None] = None
    # Variable-size images: decoding must resize, so ``resolution`` is required and keys the cache.
    needs_resolution: ClassVar[bool] = False
    # The decode output depends on ``resolution`` (so it is part of the cache key).
    resolution_in_key: ClassVar[bool] = False
    cacheable: ClassVar[bool] = True

    # -- naming ----------------------------------------------------------------------------------
    def resolve_split(self, split: str) -> str:
        """The canonical split name (aliases applied); unknown names fail listing the valid ones."""
        split = self.aliases.get(split, split)
        if self.splits and split not in self.splits:
            names = ", ".join(self.splits + tuple(self.aliases))
            raise SplitNotFound(f"{self.name}: unknown split '{split}'; use one of: {names}")
        return split

    # -- files -----------------------------------------------------------------------------------
    def locate(self, cfg: "DataConfig") -> Path | None:
        """Check (or download) the files and return the path that identifies them (None: no files)."""
        raise NotImplementedError

    def signature(self, path: Path | None) -> Any:
        """JSON-able summary of the files' sizes and times: when it changes, the cache is rebuilt."""
        if path is None:
            return None
        return file_signature(path) if path.is_file() else tree_signature(path)

    # -- decoding --------------------------------------------------------------------------------
    def decode(self, cfg: "DataConfig", path: Path | None, split: str) -> Decoded:
        raise NotImplementedError

    def decode_many(self, cfg: "DataConfig", path: Path | None, split: str) -> dict[str, Decoded]:
        """``split`` decoded, plus any other splits that came for free in the same pass."""
        return {split: self.decode(cfg, path, split)}


# ----------------------------------------------------------------------------------------------
# paths
# ----------------------------------------------------------------------------------------------
def require_root(cfg: "DataConfig", source: str, hint: str) -> Path:
    """The configured root as an absolute path; missing or unset roots fail naming what to pass."""
    if not cfg.root:
        raise MkdtError(f"data source '{source}' needs a root; set data.root (--set data.root=...) to {hint}")
    return require_path(Path(cfg.root).expanduser(), f"set data.root to {hint}")


def require_path(path: Path, hint: str) -> Path:
    """``path`` made absolute if it exists, else an error naming it."""
    if not path.exists():
        raise MkdtError(f"{path}: not found; {hint}")
    return path.resolve()


def require_file(path: Path, hint: str) -> Path:
    if not path.is_file():
        raise MkdtError(f"{path}: file not found; {hint}")
    return path


def read_text_lines(path: Path, hint: str) -> list[str]:
    """Non-empty stripped lines of a small text file (list files of the fine-grained sets)."""
    require_file(path, hint)
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MkdtError(f"{path}: cannot read ({exc}); replace the file") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def visible(name: str) -> bool:
    """Hidden files (``.DS_Store``, macOS ``._x`` twins) are never data."""
    return not name.startswith(".")


def sorted_subdirs(path: Path) -> list[Path]:
    return sorted((p for p in path.iterdir() if p.is_dir() and visible(p.name)), key=lambda p: p.name)


# ----------------------------------------------------------------------------------------------
# signatures
# ----------------------------------------------------------------------------------------------
def file_signature(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def tree_signature(root: Path) -> dict[str, Any]:
    """Count, total size and a digest of every file's relative path, size and mtime under ``root``."""
    entries: list[tuple[str, int, int]] = []
    stack, seen = [root], {os.path.realpath(root)}
    while stack:
        folder = stack.pop()
        with os.scandir(folder) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=True):
                    real = os.path.realpath(entry.path)  # symlinked folders are followed, loops are not
                    if real not in seen:
                        seen.add(real)
                        stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=True):
                    st = entry.stat()
                    entries.append((os.path.relpath(entry.path, root), st.st_size, st.st_mtime_ns))
    entries.sort()
    digest = hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]
    return {"files": len(entries), "bytes": sum(e[1] for e in entries), "digest": digest}

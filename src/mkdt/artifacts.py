"""Artifact store: atomic safetensors + JSON files in a run directory with one folder per stage.

Why: every stage must survive Ctrl-C / kill without leaving half-written files, and a later stage must
be able to trust what it loads. So every write goes to a temporary file in the same folder and is
renamed into place, tensors are stored as safetensors (never pickle), and loaders check names, shapes,
dtypes and finiteness, failing with a message that names the file.

Every safetensors artifact carries a digest of its tensors and metadata, checked on load: a file whose
stored normalisation (or any other byte) was changed after it was written is refused, not trusted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from mkdt.errors import MkdtError, io_error

TMP_SUFFIX = ".tmp"
DIGEST_KEY = "mkdt_digest"


# ----------------------------------------------------------------------------------------------
# atomic writes
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    On any exception (including KeyboardInterrupt) the temporary file is removed and the old ``path``,
    if any, is left untouched. File-system failures (read-only, full, too large, permission) become one
    :class:`~mkdt.errors.ArtifactIOError` naming ``path``. The file gets the usual permissions (umask).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise io_error(path, exc) from None
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # after writing: a writer may have replaced the file
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise io_error(path, exc) from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise


def remove_orphans(folder: str | os.PathLike) -> list[Path]:
    """Delete temporary files a killed writer left in ``folder`` (and below); returns what was removed."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for tmp in folder.rglob(f".*{TMP_SUFFIX}"):
        if tmp.is_file():
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed.append(tmp)
    return removed


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n"


def save_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, to_json(obj))


def load_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise MkdtError(f"{path}: file not found; run the stage that writes it first")
    try:
        return json.loads(path.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MkdtError(f"{path}: not valid JSON ({exc}); delete it and re-run the stage") from None


# ----------------------------------------------------------------------------------------------
# tensors
# ----------------------------------------------------------------------------------------------
def content_digest(tensors: Mapping[str, torch.Tensor], metadata_json: str | None) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, and the metadata JSON."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update((metadata_json or "").encode())
    return h.hexdigest()[:32]


def save_tensors(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any] | None = None,
    *,
    allow_nonfinite: bool = False,
) -> None:
    """Write tensors (copied to contiguous CPU memory) as safetensors, atomically, with a content digest.

    Refuses NaN/inf in floating tensors unless ``allow_nonfinite``: NaN must never reach an artifact.
    ``metadata`` is stored as JSON under the safetensors header key ``mkdt``.
    """
    path = Path(path)
    clean: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(tensor).__name__}")
        t = tensor.detach().to("cpu").contiguous().clone()
        if not allow_nonfinite and t.is_floating_point() and not torch.isfinite(t).all():
            raise MkdtError(f"{path}: tensor '{name}' contains NaN/inf; refusing to save it")
        clean[name] = t
    meta_json = to_json(dict(metadata)) if metadata else None
    header = {DIGEST_KEY: content_digest(clean, meta_json)}
    if meta_json is not None:
        header["mkdt"] = meta_json
    data = safetensors_bytes(clean, metadata=header)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


@dataclass(frozen=True)
class TensorSpec:
    """Expected shape (``None`` = any size in that dimension) and dtype of a stored tensor."""

    shape: Sequence[int | None] | None = None
    dtype: torch.dtype | None = None
    finite: bool = True


def _open(path: Path, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise MkdtError(f"{path}: file not found; run the stage that writes it first")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as fh:
            header = fh.metadata() or {}
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise MkdtError(f"{path}: not a readable safetensors file ({exc}); delete it and re-run") from None
    except OSError as exc:
        raise io_error(path, exc) from None
    stored = header.get(DIGEST_KEY)
    if stored is not None and stored != content_digest(tensors, header.get("mkdt")):
        raise MkdtError(f"{path}: contents do not match the digest written with them (the file was changed "
                        f"after it was written, e.g. its mean/std); re-create it with the stage that wrote it")
    return tensors, header


def load_tensors(
    path: str | os.PathLike,
    expect: Mapping[str, TensorSpec] | None = None,
    *,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """Load a safetensors file, verify its digest and check it against ``expect``; errors name the file."""
    return load_tensors_and_metadata(path, expect, device=device)[0]


def load_tensors_and_metadata(
    path: str | os.PathLike,
    expect: Mapping[str, TensorSpec] | None = None,
    *,
    device: str | torch.device = "cpu",
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """:func:`load_tensors` and the metadata :func:`save_tensors` stored, read (and verified) together."""
    path = Path(path)
    tensors, header = _open(path, device)
    for name, spec in (expect or {}).items():
        if name not in tensors:
            raise MkdtError(f"{path}: missing tensor '{name}' (has {sorted(tensors)}); re-run the stage")
        check_tensor(tensors[name], spec, f"{path}: tensor '{name}'")
    return tensors, _metadata(path, header)


def _metadata(path: Path, header: Mapping[str, str]) -> dict[str, Any]:
    if "mkdt" not in header:
        return {}
    try:
        meta = json.loads(header["mkdt"])
    except ValueError:
        raise MkdtError(f"{path}: metadata is not valid JSON; re-create the file") from None
    if not isinstance(meta, dict):
        raise MkdtError(f"{path}: metadata is not a mapping; re-create the file")
    return meta


def check_tensor(tensor: torch.Tensor, spec: TensorSpec, where: str) -> None:
    if spec.dtype is not None and tensor.dtype != spec.dtype:
        raise MkdtError(f"{where} has dtype {tensor.dtype}, expected {spec.dtype}")
    if spec.shape is not None:
        ok = tensor.dim() == len(spec.shape) and all(
            want is None or want == got for want, got in zip(spec.shape, tensor.shape)
        )
        if not ok:
            want = "x".join("*" if s is None else str(s) for s in spec.shape)
            raise MkdtError(f"{where} has shape {tuple(tensor.shape)}, expected {want}")
    if spec.finite and tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise MkdtError(f"{where} contains NaN/inf; the artifact is corrupt, re-run the stage")


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata stored by :func:`save_tensors` (header only: cheap; :func:`load_tensors_and_metadata`
    verifies it against the tensors)."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
    except (SafetensorError, ValueError) as exc:
        raise MkdtError(f"{path}: not a readable safetensors file ({exc})") from None
    except OSError as exc:
        if not path.exists():
            raise MkdtError(f"{path}: file not found; run the stage that writes it first") from None
        raise io_error(path, exc) from None
    return _metadata(path, header)


def load_state_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a torch file (read with ``weights_only=True``: no pickle code)."""
    path = Path(path)
    if not path.is_file():
        raise MkdtError(f"{path}: file not found")
    if path.suffix == ".safetensors":
        return load_tensors(path)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except OSError as exc:
        raise io_error(path, exc) from None
    except Exception:  # torch raises many types, with a long message suggesting the unsafe weights_only=False
        raise MkdtError(f"{path}: not a weights-only torch file (it is not a torch file, or holds Python objects "
                        f"whose unpickling could run code, which mkdt refuses); save it as a plain state dict "
                        f"of tensors or as safetensors") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise MkdtError(f"{path}: expected a state dict of tensors")
    return dict(obj)


# ----------------------------------------------------------------------------------------------
# provenance
# ----------------------------------------------------------------------------------------------
def environment_info() -> dict[str, str]:
    """Versions that decide whether an artifact can be reproduced."""
    import mkdt

    info = {
        "mkdt": mkdt.__version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    for pkg in ("torchvision", "numpy", "safetensors"):
        with contextlib.suppress(Exception):
            info[pkg] = __import__(pkg).__version__
    return info


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except OSError as exc:
        raise io_error(path, exc) from None
    return h.hexdigest()


def config_digest(config: Any) -> str:
    """A short stable hash of a (JSON-serialisable) configuration."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=_json_default).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# logs
# ----------------------------------------------------------------------------------------------
class JsonLog:
    """Append-only JSON-lines log in a stage folder (one flushed object per line); ``fresh`` empties it."""

    def __init__(self, path: str | os.PathLike, *, fresh: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fresh and self.path.exists():
            self.path.unlink()

    def write(self, **record: Any) -> None:
        try:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record, default=float) + "\n")
                fh.flush()
        except OSError as exc:
            raise io_error(self.path, exc) from None

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        rows = []
        for line in self.path.read_text("utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a line cut by a kill
                row = json.loads(line)
                if isinstance(row, dict):
                    rows.append(row)
        return rows


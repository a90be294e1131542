"""Artifact store: atomic safetensors + JSON files in a run directory with one folder per stage.

Why: every stage must survive Ctrl-C / kill without leaving half-written files, and a later stage must
be able to trust what it loads. So every write goes to a temporary file in the same folder and is
renamed into place, tensors are stored as safetensors (never pickle), and loaders check names, shapes,
dtypes and finiteness, failing with a message that names the file.

A stage counts as done only when its ``stage.json`` exists: it is written last, after every output.
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
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mkdt.errors import MkdtError

STAGE_RECORD = "stage.json"


# ----------------------------------------------------------------------------------------------
# atomic writes
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    On any exception (including KeyboardInterrupt) the temporary file is removed and the old
    ``path``, if any, is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        # mkstemp creates 0600 files; give the artifact the usual permissions (umask applied).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


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
def save_tensors(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any] | None = None,
    *,
    allow_nonfinite: bool = False,
) -> None:
    """Write tensors (copied to contiguous CPU memory) as safetensors, atomically.

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
    header = {"mkdt": to_json(dict(metadata))} if metadata else None
    with atomic_path(path) as tmp:
        save_file(clean, str(tmp), metadata=header)


@dataclass(frozen=True)
class TensorSpec:
    """Expected shape (``None`` = any size in that dimension) and dtype of a stored tensor."""

    shape: Sequence[int | None] | None = None
    dtype: torch.dtype | None = None
    finite: bool = True


def load_tensors(
    path: str | os.PathLike,
    expect: Mapping[str, TensorSpec] | None = None,
    *,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """Load a safetensors file and check it against ``expect``; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise MkdtError(f"{path}: file not found; run the stage that writes it first")
    try:
        tensors = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise MkdtError(f"{path}: not a readable safetensors file ({exc}); delete it and re-run") from None
    for name, spec in (expect or {}).items():
        if name not in tensors:
            raise MkdtError(f"{path}: missing tensor '{name}' (has {sorted(tensors)}); re-run the stage")
        check_tensor(tensors[name], spec, f"{path}: tensor '{name}'")
    return tensors


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
    """The JSON metadata stored in a safetensors header by :func:`save_tensors`."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise MkdtError(f"{path}: not a readable safetensors file ({exc})") from None
    return json.loads(meta["mkdt"]) if "mkdt" in meta else {}


def load_state_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a torch file (read with ``weights_only=True``: no pickle code)."""
    path = Path(path)
    if not path.is_file():
        raise MkdtError(f"{path}: file not found")
    if path.suffix == ".safetensors":
        return load_tensors(path)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for bad files
        raise MkdtError(f"{path}: cannot read as a weights-only torch file ({exc})") from None
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


def config_digest(config: Any) -> str:
    """A short stable hash of a (JSON-serialisable) configuration."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=_json_default).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# run directory
# ----------------------------------------------------------------------------------------------
class StageDir:
    """One stage's folder inside a run directory.

    Outputs are written first; :meth:`finish` writes ``stage.json`` (config, digest, seed, versions and
    any extra metadata) last, which is what marks the stage as done.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def ensure(self) -> "StageDir":
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    @property
    def record_path(self) -> Path:
        return self.path / STAGE_RECORD

    def record(self) -> dict[str, Any] | None:
        return load_json(self.record_path) if self.record_path.is_file() else None

    def is_done(self, config: Any | None = None) -> bool:
        """Done = ``stage.json`` exists (and, if ``config`` is given, was written for that config)."""
        rec = self.record()
        if rec is None:
            return False
        return config is None or rec.get("config_digest") == config_digest(config)

    def finish(self, config: Any, **extra: Any) -> dict[str, Any]:
        record = {
            "config": config,
            "config_digest": config_digest(config),
            "environment": environment_info(),
            **extra,
        }
        save_json(self.record_path, record)
        return record

    def save_config(self, config: Any) -> Path:
        """Write the resolved config as ``config.yaml`` beside the stage's outputs."""
        from mkdt.config import dump_yaml

        path = self.path / "config.yaml"
        atomic_write_text(path, dump_yaml(config))
        return path

    def invalidate(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.record_path.unlink()


class RunDir:
    """A run directory: ``<root>/<stage>/`` folders, each a :class:`StageDir`."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def stage(self, name: str) -> StageDir:
        return StageDir(self.root / name).ensure()

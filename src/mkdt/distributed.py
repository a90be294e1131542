"""torchrun + ``torch.distributed`` support: one process per device, PyTorch's own collectives.

Why a thin layer: stages must behave the same when started by ``torchrun`` (several ranks) and when
run plainly (one process, no process group). Every helper here is therefore a no-op or the identity
for a single-process :class:`DistContext`, so stage code calls them unconditionally. Backend: NCCL
when the device is CUDA, gloo on CPU. The process group, once created, lives until the process exits
(``cleanup`` runs at exit), because re-creating a default group inside one torchrun process is fragile.
"""

from __future__ import annotations

import atexit
import datetime
import functools
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

import torch
import torch.distributed as dist

from mkdt.errors import MkdtError
from mkdt.runtime import resolve_device

T = TypeVar("T")
ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_TIMEOUT_MINUTES = 60.0  # rank 0 may extract features while the others wait at a barrier

_cleanup_registered = False


@dataclass(frozen=True)
class DistContext:
    """Who this process is: its rank among ``world_size`` processes and the device it computes on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None = single process, no process group

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes artifacts and logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and self.backend is not None


def _env_int(name: str, env: Mapping[str, str]) -> int:
    raw = env.get(name)
    try:
        return int(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise MkdtError(f"environment variable {name}={raw!r} is not an integer; launch with torchrun, "
                        f"which sets RANK, WORLD_SIZE and LOCAL_RANK") from None


def launched_by_torchrun(env: Mapping[str, str] | None = None) -> bool:
    """True when torchrun (or an equivalent launcher) set ``WORLD_SIZE`` > 1 for this process."""
    env = os.environ if env is None else env
    return "WORLD_SIZE" in env and "RANK" in env and env.get("WORLD_SIZE", "1").strip() not in ("", "1")


def single_process(device: str | torch.device = "auto") -> DistContext:
    """The context of a plain (not torchrun) run: rank 0 of 1 on the configured device."""
    return DistContext(device=resolve_device(device))


def _timeout(minutes: float | None) -> datetime.timedelta:
    if minutes is None:
        raw = os.environ.get("MKDT_DIST_TIMEOUT_MINUTES")
        try:
            minutes = float(raw) if raw else DEFAULT_TIMEOUT_MINUTES
        except ValueError:
            raise MkdtError(f"MKDT_DIST_TIMEOUT_MINUTES={raw!r} is not a number of minutes") from None
    return datetime.timedelta(minutes=minutes)


def init_distributed(device: str | torch.device = "auto", timeout_minutes: float | None = None) -> DistContext:
    """Join the torchrun process group (gloo on CPU, NCCL on CUDA), or return a 1-process context.

    Safe to call several times (e.g. once per stage in ``mkdt run``): an existing group is reused.
    Under torchrun with CUDA, rank ``r`` computes on ``cuda:LOCAL_RANK``.
    """
    if not launched_by_torchrun():
        if dist.is_available() and dist.is_initialized():  # a group created by the caller: respect it
            return _context_of_existing_group(device)
        return single_process(device)
    env = os.environ
    rank, world, local = _env_int("RANK", env), _env_int("WORLD_SIZE", env), _env_int("LOCAL_RANK", env)
    if not 0 <= rank < world:
        raise MkdtError(f"RANK={rank} is outside 0..WORLD_SIZE-1 (WORLD_SIZE={world}); check the launcher")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
    if missing:
        raise MkdtError(f"{', '.join(missing)} not set; launch with torchrun (it sets the rendezvous address)")
    base = resolve_device(device)
    if base.type == "cuda":
        if local >= torch.cuda.device_count():
            raise MkdtError(f"LOCAL_RANK={local} but only {torch.cuda.device_count()} CUDA devices are visible; "
                            f"use --nproc_per_node <= the number of GPUs")
        dev, backend = torch.device("cuda", local), "nccl"
        torch.cuda.set_device(dev)
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not dist.is_available():
        raise MkdtError("this PyTorch build has no torch.distributed; install a build with distributed support")
    if dist.is_initialized():
        if dist.get_world_size() != world or dist.get_rank() != rank:
            raise MkdtError(f"a process group of size {dist.get_world_size()} already exists but torchrun set "
                            f"WORLD_SIZE={world}; do not mix launchers")
        return DistContext(rank, world, local, dev, dist.get_backend())
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world,
                            timeout=_timeout(timeout_minutes))
    global _cleanup_registered
    if not _cleanup_registered:
        atexit.register(cleanup)
        _cleanup_registered = True
    return DistContext(rank, world, local, dev, backend)


def _context_of_existing_group(device: str | torch.device) -> DistContext:
    backend = dist.get_backend()
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
    return DistContext(dist.get_rank(), dist.get_world_size(), local, dev, backend)


def current_context(device: str | torch.device = "auto") -> DistContext:
    """The context of the already-initialised group, or the single-process one (never creates a group)."""
    if dist.is_available() and dist.is_initialized():
        return _context_of_existing_group(device)
    return single_process(device)


def cleanup() -> None:
    """Destroy the default process group if one exists (registered to run at exit)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# work splitting
# ----------------------------------------------------------------------------------------------
def shard_indices(n: int, rank: int, world_size: int, mode: str = "round_robin") -> list[int]:
    """Indices ``0..n-1`` owned by ``rank``: every index exactly once across ranks, independent of timing.

    ``round_robin``: ``rank, rank + W, ...`` (balances jobs sorted by size); ``contiguous``: one block,
    block sizes differ by at most one (keeps neighbouring items, e.g. one data set, on one rank).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise MkdtError(f"cannot shard for rank {rank} of world size {world_size}")
    if mode == "round_robin":
        return list(range(rank, n, world_size))
    if mode == "contiguous":
        base, extra = divmod(n, world_size)
        start = rank * base + min(rank, extra)
        return list(range(start, start + base + (1 if rank < extra else 0)))
    raise MkdtError(f"shard mode must be round_robin or contiguous, got {mode!r}")


def shard(items: Sequence[T] | Iterable[T], ctx: DistContext, mode: str = "round_robin") -> list[T]:
    """This rank's share of ``items`` (all of them in a single process)."""
    seq = list(items)
    return [seq[i] for i in shard_indices(len(seq), ctx.rank, ctx.world_size, mode)]


# ----------------------------------------------------------------------------------------------
# collectives (identity / no-op in a single process)
# ----------------------------------------------------------------------------------------------
TensorTree = torch.Tensor | Sequence[torch.Tensor | None] | Mapping[str, torch.Tensor | None]


def _leaves(tensors: TensorTree) -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor):
        return [tensors]
    values = tensors.values() if isinstance(tensors, Mapping) else tensors
    return [t for t in values if t is not None]


def all_reduce_mean(tensors: TensorTree, ctx: DistContext) -> TensorTree:
    """Average tensors over ranks in place (one flat all-reduce per dtype/device) and return them.

    ``None`` entries (e.g. a gradient that does not exist) are skipped. Flattening into one buffer
    means one collective per call, e.g. images + targets + lr gradients in a distillation step;
    every rank receives the same bytes, so replicas that apply the same update stay identical.
    """
    if not ctx.distributed:
        return tensors
    leaves = _leaves(tensors)
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in leaves:
        if not (t.is_floating_point() or t.is_complex()):
            raise MkdtError(f"all_reduce_mean needs floating-point tensors, got {t.dtype}")
        groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(ctx.world_size)
        offset = 0
        for t in group:
            n = t.numel()
            t.detach().copy_(flat[offset:offset + n].view_as(t))
            offset += n
    return tensors


def broadcast_tensors(tensors: TensorTree, ctx: DistContext, src: int = 0) -> TensorTree:
    """Overwrite ``tensors`` in place with rank ``src``'s values (e.g. to start replicas identically)."""
    if ctx.distributed:
        for t in _leaves(tensors):
            dist.broadcast(t.detach(), src=src)
    return tensors


def broadcast_object(obj: Any, ctx: DistContext, src: int = 0) -> Any:
    """Rank ``src``'s (picklable, in-memory only) object on every rank; the identity in one process."""
    if not ctx.distributed:
        return obj
    box = [obj if ctx.rank == src else None]
    dist.broadcast_object_list(box, src=src, device=_object_device(ctx))
    return box[0]


def all_gather_object(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's object, in rank order, on every rank (``[obj]`` in one process)."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def gather_records(local: Mapping[str, Any], ctx: DistContext) -> dict[str, Any]:
    """Merge per-rank ``{key: record}`` dicts into one on every rank; two ranks with one key is a bug."""
    merged: dict[str, Any] = {}
    for part in all_gather_object(dict(local), ctx):
        clash = set(merged) & set(part)
        if clash:
            raise MkdtError(f"ranks computed the same job twice ({sorted(clash)[:3]}); sharding is inconsistent")
        merged.update(part)
    return merged


def barrier(ctx: DistContext) -> None:
    """Wait until every rank arrives (no-op in one process)."""
    if not ctx.distributed:
        return
    if ctx.backend == "nccl":
        dist.barrier(device_ids=[ctx.device.index or 0])
    else:
        dist.barrier()


def _object_device(ctx: DistContext) -> torch.device | None:
    return ctx.device if ctx.backend == "nccl" else None


def assert_in_sync(tensor: torch.Tensor, ctx: DistContext, what: str = "tensor") -> None:
    """Raise if ``tensor`` differs between ranks (cheap checksum), e.g. the shared synthetic set."""
    if not ctx.distributed:
        return
    local = torch.stack([tensor.detach().double().sum(), tensor.detach().double().abs().sum()]).to(ctx.device)
    high, low = local.clone(), local.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    if not torch.equal(high, low):
        raise MkdtError(f"{what} differs between ranks (checksums {low.tolist()} vs {high.tolist()}); "
                        f"replicas diverged, every rank must apply the same averaged update")


# ----------------------------------------------------------------------------------------------
# main-process helpers
# ----------------------------------------------------------------------------------------------
def is_main_process() -> bool:
    """True in a single process and on global rank 0 of an initialised group."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def main_process_only(fn: Callable[..., T]) -> Callable[..., T | None]:
    """Decorator: run ``fn`` on rank 0 only (writers, loggers); other ranks get ``None``."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T | None:
        return fn(*args, **kwargs) if is_main_process() else None

    return wrapper

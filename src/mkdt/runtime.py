"""Device choice, explicit seeding, and time / peak-memory measurement of stages.

No hidden seeding: stages derive every random stream from their config's seed with
:func:`derive_seed` and pass ``torch.Generator`` objects around; :func:`seeded` exists for code paths
(module construction) that only read torch's global generator, and restores it afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from mkdt.errors import ConfigError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is a configuration error."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' requested but CUDA is not available on this machine; use --device cpu "
                          f"or auto")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device '{name}'; use auto, cpu or cuda") from None
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device '{name}' requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return dev


def derive_seed(seed: int, *keys: object) -> int:
    """A 63-bit seed for a named sub-stream, e.g. ``derive_seed(run_seed, "expert", 7)``.

    Stable across processes and Python versions (sha256, not ``hash``), so expert ``i`` gets the same
    stream whether trained alone, in a batch or on another rank.
    """
    text = "/".join([str(int(seed))] + [str(k) for k in keys])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & ((1 << 63) - 1)


def generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with torch's (CPU and CUDA) global generators seeded, restoring them afterwards."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed) % (1 << 63))
        yield


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run with ``threads`` intra-op threads (0 or None = leave torch's setting), restoring it afterwards.

    On a busy few-core machine 1 thread is often faster than 2 for the small ops of students.
    """
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def set_deterministic(seed: int) -> None:
    """Seed Python, NumPy and torch in one call (for scripts and the CLI entry point only)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# measurement
# ----------------------------------------------------------------------------------------------
def current_rss_mb(pid: int | str = "self") -> float:
    """Resident memory of a process (default: this one) in MB (Linux /proc; 0 elsewhere)."""
    try:
        with open(f"/proc/{pid}/statm") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return 0.0


def descendant_pids(pid: int) -> list[int]:
    """Every process started (directly or not) by ``pid`` that is still running (Linux /proc)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{parent}/task/{tid}/children") as fh:
                    kids = [int(k) for k in fh.read().split()]
            except (OSError, ValueError):
                continue
            found += kids
            todo += kids
    return found


def tree_rss_mb() -> float:
    """Resident memory of this process plus all its running descendants (e.g. torchrun workers), in MB."""
    return current_rss_mb() + sum(current_rss_mb(p) for p in descendant_pids(os.getpid()))


@dataclass
class Meter:
    """Wall time and peak resident memory of a block (sampled every ``interval`` seconds); with
    ``children`` the memory of processes the block starts is added (their sum at each sample)."""

    interval: float = 0.05
    children: bool = False
    seconds: float = 0.0
    peak_mb: float = 0.0
    cuda_peak_mb: float | None = None
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)

    def _rss(self) -> float:
        return tree_rss_mb() if self.children else current_rss_mb()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, self._rss())

    def __enter__(self) -> "Meter":
        self.peak_mb = self._rss()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t0
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self._rss())
        if torch.cuda.is_available():
            self.cuda_peak_mb = torch.cuda.max_memory_allocated() / 2**20

    def as_dict(self) -> dict:
        out = {"seconds": round(self.seconds, 3), "peak_mb": round(self.peak_mb, 1)}
        if self.cuda_peak_mb is not None:
            out["cuda_peak_mb"] = round(self.cuda_peak_mb, 1)
        return out

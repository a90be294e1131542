"""Progress of long loops and the ``mkdt`` logger: visible in any terminal, in pipes and in the run's log.

On a terminal a long loop shows a tqdm bar; when stderr is a pipe, a file, nohup or CI, it prints one
line through :mod:`logging` at most every ``min_interval`` seconds and at least every ``heartbeat``
seconds (``distill 40/120 loss 0.871 lr 0.103 eta 3m10s``). The same lines always reach the run's
``mkdt.log`` (see :func:`log_to_file`), whatever the terminal shows. ``--quiet`` shows warnings only,
``--verbose`` adds debug lines. Under torchrun only rank 0 reports.

Every numeric field of ``update(n, **fields)`` and ``set(**fields)`` also goes to the running stage's
experiment loggers (:mod:`mkdt.metrics`: ``metrics.csv``, TensorBoard, W&B) as series ``desc`` at step
``n``, so a loop that reports progress is logged without code of its own.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from mkdt import metrics

log = logging.getLogger("mkdt")

MIN_INTERVAL = float(os.environ.get("MKDT_PROGRESS_INTERVAL", "10"))  # seconds between lines (tests: 0)
HEARTBEAT = 60.0
_state = {"configured": False, "bars": True}


class _Console(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is when a line is emitted (tests and tools swap it)."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: D401
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _DropProgressOnTerminal(logging.Filter):
    """On a terminal the tqdm bar shows progress; its log lines then go to the log file only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (getattr(record, "progress", False) and _bars_enabled())


def setup_logging(level: int = logging.INFO, *, rank: int = 0) -> None:
    """Console logging for the CLI: bare messages on stderr; only rank 0 below WARNING."""
    log.setLevel(logging.DEBUG)
    for handler in [h for h in log.handlers if getattr(h, "_mkdt_console", False)]:
        log.removeHandler(handler)
    console = _Console()
    console.setLevel(level if rank == 0 else logging.WARNING)
    console.setFormatter(logging.Formatter("%(message)s"))
    console.addFilter(_DropProgressOnTerminal())
    console._mkdt_console = True  # type: ignore[attr-defined]
    log.addHandler(console)
    log.propagate = False
    _state["configured"] = True
    _state["bars"] = level <= logging.INFO and rank == 0


def log_to_file(path: str | Path) -> None:
    """Append this process's ``mkdt`` log (progress lines included) to ``path`` (idempotent per path)."""
    path = Path(path)
    for handler in log.handlers:
        if getattr(handler, "_mkdt_file", None) == str(path.resolve()):
            return
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    handler._mkdt_file = str(path.resolve())  # type: ignore[attr-defined]
    log.addHandler(handler)
    if log.level == logging.NOTSET or log.level > logging.INFO:
        log.setLevel(logging.INFO)


def close_file_logs() -> None:
    for handler in [h for h in log.handlers if getattr(h, "_mkdt_file", None)]:
        log.removeHandler(handler)
        handler.close()


def _bars_enabled() -> bool:
    return _state["bars"] and sys.stderr.isatty()


def format_seconds(seconds: float) -> str:
    """``190`` -> ``3m10s``, ``4000`` -> ``1h06m``."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class Progress:
    """One loop's progress: ``update(n, loss=...)`` per step, ``note(text)`` for a line that always shows.

    ``enabled=False`` (e.g. ranks other than 0) makes every call a no-op.
    """

    def __init__(self, total: int | None, desc: str, *, initial: int = 0, unit: str = "it", enabled: bool = True,
                 min_interval: float = MIN_INTERVAL, heartbeat: float = HEARTBEAT):
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.n = self.start_n = initial
        self.fields: dict[str, Any] = {}
        self.min_interval, self.heartbeat = min_interval, heartbeat
        self._t0 = self._last_line = time.monotonic()
        self._lines = 0
        self._lock = threading.Lock()
        self._bar = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if not enabled:
            return
        if _bars_enabled():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, leave=False)
        if heartbeat and heartbeat > 0:
            self._thread = threading.Thread(target=self._beat, daemon=True)
            self._thread.start()

    # -- the loop's calls ----------------------------------------------------------------------------
    def update(self, n: int = 1, **fields: Any) -> None:
        if not self.enabled:
            return
        with self._lock:
            self.n += n
            self.fields.update({k: v for k, v in fields.items() if v is not None})
            if fields:
                metrics.active().log(self.desc, self.n, **fields)
            if self._bar is not None:
                self._bar.update(n)
                if self.fields:
                    self._bar.set_postfix({k: _format_value(v) for k, v in self.fields.items()}, refresh=False)
            now = time.monotonic()
            done = self.total is not None and self.n >= self.total
            if now - self._last_line >= self.min_interval or (done and (self._lines or now - self._t0 >= 2.0)):
                self._emit()

    def set(self, **fields: Any) -> None:
        """Update the shown values without a step (they are logged at the current step)."""
        if self.enabled:
            with self._lock:
                self.fields.update(fields)
                metrics.active().log(self.desc, self.n, **fields)

    def record(self, **fields: Any) -> None:
        """Log scalars at the current step to the experiment loggers only (not shown in the line)."""
        if self.enabled:
            metrics.active().log(self.desc, self.n, **fields)

    def note(self, text: str) -> None:
        """A line that always shows (above the bar on a terminal)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
            log.info(text, extra={"progress": True})
        else:
            log.info(text)

    def close(self) -> None:
        if not self.enabled:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- lines ---------------------------------------------------------------------------------------
    def line(self) -> str:
        parts = [self.desc, f"{self.n}/{self.total}" if self.total is not None else f"{self.n} {self.unit}"]
        parts += [f"{k} {_format_value(v)}" for k, v in self.fields.items()]
        elapsed = time.monotonic() - self._t0
        done = self.n - self.start_n
        if self.total is not None and done > 0 and self.n < self.total:
            parts.append(f"eta {format_seconds(elapsed / done * (self.total - self.n))}")
        elif self.total is not None and self.n >= self.total:
            parts.append(f"took {format_seconds(elapsed)}")
        return " ".join(parts)

    def _emit(self) -> None:
        self._last_line = time.monotonic()
        self._lines += 1
        log.info(self.line(), extra={"progress": True})

    def _beat(self) -> None:
        while not self._stop.wait(min(self.heartbeat, 5.0)):
            with self._lock:
                if time.monotonic() - self._last_line >= self.heartbeat:
                    self._emit()

"""Experiment loggers: every scalar a training loop reports, as CSV, TensorBoard events or a W&B run.

Why one place: every loop already reports its numbers through :class:`mkdt.progress.Progress`
(``update(n, loss=..., lr=...)``). While a stage's body runs, the stage contract makes a
:class:`Metrics` sink for the stage folder *active*, and every ``Progress`` forwards its numeric fields
to it, tagged with the loop's name and step (``distill`` step 40 ``loss`` 0.87). So teacher, experts,
distillation, KRR-ST and pre-training all log without code of their own, and a new loop logs too.

Which loggers (a runtime setting, never part of a stage's identity): ``--log csv,tensorboard`` on the
command line, ``run.log`` in a run document, or ``MKDT_LOG``; default ``csv``; ``none`` for none.

* ``csv`` -> ``<stage folder>/metrics.csv`` with columns ``time,series,step,name,value`` (one scalar a
  row, appended and flushed per row, so a resumed stage continues the same file; always available).
* ``tensorboard`` -> ``<stage folder>/tensorboard/`` event files (tag ``<series>/<name>``), through
  ``torch.utils.tensorboard``; needs ``pip install tensorboard``.
* ``wandb`` -> a Weights & Biases run per stage, offline by default (files under ``<stage folder>/wandb``;
  ``WANDB_MODE=online`` and a login to upload, ``WANDB_PROJECT`` names the project, default ``mkdt``);
  needs ``pip install wandb``.

Asking for a logger that is not installed is a one-line error before anything runs. Only rank 0 logs.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from mkdt.errors import ConfigError

ENV_LOG = "MKDT_LOG"
LOGGERS = ("csv", "tensorboard", "wandb")
DEFAULT_LOGGERS = ("csv",)
CSV_FILE = "metrics.csv"
CSV_COLUMNS = ("time", "series", "step", "name", "value")
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
_MODULE = {"tensorboard": "tensorboard", "wandb": "wandb"}
_INSTALL = {"tensorboard": "pip install tensorboard", "wandb": "pip install wandb"}


# ----------------------------------------------------------------------------------------------
# the setting
# ----------------------------------------------------------------------------------------------
def parse_loggers(value: Any, where: str = "--log") -> tuple[str, ...]:
    """``"csv,tensorboard"`` (or a list) -> ``("csv", "tensorboard")``; ``none``/``off``/empty -> ``()``.

    An unknown name, or a logger whose package is not installed, is a :class:`ConfigError`.
    """
    if value is None:
        return DEFAULT_LOGGERS
    items = value.split(",") if isinstance(value, str) else list(value)
    names = [str(v).strip().lower() for v in items if str(v).strip()]
    if not names or names in (["none"], ["off"]):
        return ()
    from mkdt.config import did_you_mean

    out: list[str] = []
    for name in names:
        if name not in LOGGERS:
            raise ConfigError(f"{where}: unknown logger '{name}'{did_you_mean(name, LOGGERS)}; choose from "
                              f"{', '.join(LOGGERS)} (comma-separated) or none")
        if name in _MODULE and importlib.util.find_spec(_MODULE[name]) is None:
            raise ConfigError(f"{where}: logger '{name}' needs the {_MODULE[name]} package, which is not installed; "
                              f"`{_INSTALL[name]}` or leave it out")
        if name not in out:
            out.append(name)
    return tuple(out)


def configured_loggers() -> tuple[str, ...]:
    """The loggers chosen by ``MKDT_LOG`` (set by ``--log`` and ``run.log``), default ``csv``."""
    raw = os.environ.get(ENV_LOG)
    return parse_loggers(raw if raw is not None and raw.strip() else None, ENV_LOG)


# ----------------------------------------------------------------------------------------------
# loggers
# ----------------------------------------------------------------------------------------------
_TAG = re.compile(r"[^A-Za-z0-9_.\-/]+")


def tag(series: str, name: str) -> str:
    """``"pretrain mkdt", "loss"`` -> ``"pretrain_mkdt/loss"`` (a tag TensorBoard and W&B both accept)."""
    return f"{_TAG.sub('_', series).strip('_') or 'metrics'}/{_TAG.sub('_', name).strip('_')}"


def scalar(value: Any) -> float | None:
    """A number (bool, int, float, one-element tensor/array) as a float; anything else ``None`` (not logged)."""
    if isinstance(value, (bool, int, float)):
        return float(value)
    item = getattr(value, "item", None)
    if callable(item):
        try:
            value = item()
        except (TypeError, ValueError, RuntimeError):  # more than one element
            return None
        return float(value) if isinstance(value, (bool, int, float)) else None
    return None


class CsvLogger:
    """``metrics.csv``: one row per scalar, appended and flushed (a kill loses at most the row being written;
    a torn last line is cut off when the file is opened again)."""

    def __init__(self, folder: Path):
        self.path = folder / CSV_FILE
        self._fh: io.TextIOWrapper | None = None
        self._writer: Any = None

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.path.is_file() or self.path.stat().st_size == 0
        if not fresh:
            _cut_torn_line(self.path)
        self._fh = open(self.path, "a", encoding="utf-8", newline="")
        self._writer = csv.writer(self._fh)
        if fresh:
            self._writer.writerow(CSV_COLUMNS)

    def log(self, series: str, step: int, values: Mapping[str, float]) -> None:
        if self._fh is None:
            self._open()
        now = f"{time.time():.3f}"
        for name, value in values.items():
            self._writer.writerow((now, series, step, name, repr(value)))
        self._fh.flush()  # type: ignore[union-attr]

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _cut_torn_line(path: Path) -> None:
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as fh:
            fh.truncate(data.rfind(b"\n") + 1)


class TensorBoardLogger:
    """Event files in ``<folder>/tensorboard`` (``tensorboard --logdir RUN_DIR`` shows every stage)."""

    def __init__(self, folder: Path):
        self.folder = folder / TENSORBOARD_DIR
        self._writer: Any = None

    def log(self, series: str, step: int, values: Mapping[str, float]) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.folder))
        for name, value in values.items():
            self._writer.add_scalar(tag(series, name), value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None


class WandbLogger:
    """One W&B run per stage (offline unless ``WANDB_MODE`` says otherwise); each series has its own step axis."""

    def __init__(self, folder: Path, name: str, config: Mapping[str, Any] | None):
        self.folder, self.name, self.config = folder, name, dict(config or {})
        self._run: Any = None
        self._series: set[str] = set()

    def log(self, series: str, step: int, values: Mapping[str, float]) -> None:
        import wandb

        if self._run is None:
            (self.folder / WANDB_DIR).mkdir(parents=True, exist_ok=True)
            self._run = wandb.init(project=os.environ.get("WANDB_PROJECT", "mkdt"), name=self.name,
                                   dir=str(self.folder / WANDB_DIR), config=self.config,
                                   mode=os.environ.get("WANDB_MODE", "offline"))
        step_key = tag(series, "step")
        if series not in self._series:
            self._run.define_metric(step_key)
            self._run.define_metric(step_key[: -len("step")] + "*", step_metric=step_key)
            self._series.add(series)
        self._run.log({step_key: step, **{tag(series, k): v for k, v in values.items()}})

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


class Metrics:
    """A stage's metrics sink: ``log(series, step, loss=..., lr=...)`` goes to every chosen logger.

    Nothing is written until the first scalar arrives, so a stage that logs nothing leaves no files.
    """

    def __init__(self, folder: str | os.PathLike | None, loggers: tuple[str, ...] = DEFAULT_LOGGERS,
                 name: str = "mkdt", config: Mapping[str, Any] | None = None):
        self.folder = Path(folder) if folder is not None else None
        self.loggers = tuple(loggers) if self.folder is not None else ()
        self._sinks: list[Any] = []
        if self.folder is not None:
            for kind in self.loggers:
                if kind == "csv":
                    self._sinks.append(CsvLogger(self.folder))
                elif kind == "tensorboard":
                    self._sinks.append(TensorBoardLogger(self.folder))
                elif kind == "wandb":
                    self._sinks.append(WandbLogger(self.folder, name, config))

    @property
    def enabled(self) -> bool:
        return bool(self._sinks)

    def log(self, series: str, step: int, /, **fields: Any) -> None:
        """Log the numeric ``fields`` (others are skipped; any name, ``step`` too) of loop ``series`` at ``step``."""
        if not self._sinks:
            return
        values = {k: v for k, v in ((k, scalar(v)) for k, v in fields.items()) if v is not None and math.isfinite(v)}
        if not values:
            return
        for sink in self._sinks:
            sink.log(series, int(step), values)

    def close(self) -> None:
        for sink in self._sinks:
            sink.close()

    def __enter__(self) -> "Metrics":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


NULL = Metrics(None)
_active: list[Metrics] = []


def active() -> Metrics:
    """The sink of the stage whose body is running in this process (a no-op sink outside a stage)."""
    return _active[-1] if _active else NULL


@contextlib.contextmanager
def activate(metrics: Metrics) -> Iterator[Metrics]:
    """Make ``metrics`` the active sink while the block runs; closed afterwards."""
    _active.append(metrics)
    try:
        yield metrics
    finally:
        _active.remove(metrics)
        metrics.close()


def read_csv(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a ``metrics.csv`` with ``step`` as int and ``value`` as float (for reports and tests)."""
    with open(path, encoding="utf-8", newline="") as fh:
        return [{**row, "step": int(row["step"]), "value": float(row["value"])} for row in csv.DictReader(fh)]

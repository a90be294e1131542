"""The stage contract: when a stage runs, resumes, extends, is reused or restored — decided in one place.

Every stage is a :class:`Stage`: a config class, a body ``fn(config, run) -> summary`` that writes into
``run.folder``, and what identifies its result. :func:`run_stage` wraps the body:

* **Identity.** A stage's *key* digests its config minus the settings that cannot change its result
  (the run folder, threads, checkpoint cadence, logging; the device only as the device type it resolves
  to) with the *identities* of its input files instead of their paths: a file inside a finished stage
  folder is identified by that stage's record, any other file by its sha256. So a moved or copied run
  folder, an absolute instead of a relative ``--out`` or ``--device cpu`` where ``auto`` meant the CPU
  is the same run. Settings counting independent units (experts, probe seeds) are kept apart as *units*.
* **Metrics.** While the body runs, :mod:`mkdt.metrics` logs every number its loops report (CSV,
  TensorBoard, W&B: ``--log`` / ``run.log`` / ``MKDT_LOG``, a runtime setting outside every key).
* **Record.** ``stage.json`` says ``running`` while the body works and ``done`` after it, with the key,
  units, inputs, outputs (names and sizes, checked before a finished stage is trusted), summary and
  measurements. Paths in it are relative to the run folder.
* **Decision** (:func:`decide`): the same key and units and intact outputs -> *reuse*; outputs missing
  -> run again in place; the same key with more units (or more iterations) -> *extend* in place; an
  interrupted run of the same key -> *resume*; a kept earlier version of the same key -> *restore* it.
  Otherwise the previous output is moved aside to ``<folder>.stale.<n>`` when the new run starts, and
  moved back if that run fails or is interrupted before it completes. The newest ``keep_versions``
  (default 3, ``MKDT_KEEP_VERSIONS`` / ``--keep-versions``) earlier versions are kept.

Under torchrun every rank runs the body; rank 0 alone decides, moves folders and writes the record.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from mkdt.artifacts import atomic_write_text, environment_info, file_sha256, load_json, remove_orphans, save_json
from mkdt.config import dump_yaml, to_dict, validate
from mkdt.distributed import DistContext, barrier, broadcast_object, init_distributed
from mkdt.errors import ConfigError, MkdtError, io_error
from mkdt.layout import STAGE_RECORD, CONFIG_FILE, RunLayout
from mkdt.metrics import Metrics, activate, configured_loggers
from mkdt.progress import Progress, log, log_to_file
from mkdt.runtime import Meter, resolve_device, torch_threads

RECORD_VERSION = 2
DEFAULT_KEEP_VERSIONS = 3
ENV_KEEP_VERSIONS = "MKDT_KEEP_VERSIONS"
# In every config: never part of a stage's identity (the device enters as its resolved type instead).
RUNTIME_FIELDS = ("out", "device", "threads")
# In a DataConfig: where the decode cache lives and whether a download is allowed change no pixel.
DATA_RUNTIME_FIELDS = ("cache_dir", "download")

Body = Callable[[Any, "StageRun"], Mapping[str, Any] | None]
Units = Callable[[Mapping[str, Any], Mapping[str, Any]], bool]


def _never(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    return False


def _no_inputs(config: Any, layout: RunLayout) -> dict[str, Path]:
    return {}


@dataclass(frozen=True)
class Stage:
    """One stage: its command/section name, config class, body and what identifies its result.

    ``folder(config, layout)``: the stage's own folder. ``inputs(config, layout)``: the files and
    folders it reads (resolved from the config or the layout); ``input_fields`` are the config keys
    holding those paths (replaced by the inputs' identities in the key). ``runtime``: dotted config
    keys that cannot change the result. ``units``: dotted keys counting independent units;
    ``extends(old, new)`` says whether a finished run with units ``old`` can be extended (or shrunk) in
    place to ``new``. ``torchrun``: the stage can run under ``torchrun`` with several processes.
    ``cached=False``: always run afresh (e.g. the installation check). ``shown``: dotted keys a plan prints.
    ``added``: (dotted key, value) of settings added after runs were made: at that value a key is left out of
    the identity, so the earlier runs keep theirs; any other value is part of it.
    """

    name: str
    config: type
    body: Body
    help: str
    folder: Callable[[Any, RunLayout], Path]
    inputs: Callable[[Any, RunLayout], Mapping[str, Path | None]] = _no_inputs
    input_fields: tuple[str, ...] = ()
    runtime: tuple[str, ...] = ()
    units: tuple[str, ...] = ()
    extends: Units = _never
    torchrun: bool = False
    cached: bool = True
    shown: tuple[str, ...] = ()  # the settings a plan (--dry-run) prints for this stage
    added: tuple[tuple[str, Any], ...] = ()

    @property
    def section(self) -> str:
        """The run-document section and ``--set`` prefix: the command with ``_`` for ``-``."""
        return self.name.replace("-", "_")

    def __call__(self, config: Any) -> "StageResult":
        return run_stage(self, config)


@dataclass
class StageResult:
    """What a stage call returns on every rank: where its outputs are and what it did."""

    stage: str
    folder: Path
    status: str  # ran | resumed | extended | repaired | reused | restored
    summary: dict[str, Any]
    outputs: dict[str, Path]
    measure: dict[str, Any] = field(default_factory=dict)

    def output(self, role: str) -> Path:
        if role not in self.outputs:
            raise MkdtError(f"{self.folder}: stage {self.stage} recorded no output '{role}'")
        return self.outputs[role]


@dataclass
class StageRun:
    """What the body gets besides its config: its folder, the run layout, the process context and the
    stage's identity (checkpoints record it and are resumed only under it)."""

    stage: Stage
    config: Any
    layout: RunLayout
    folder: Path
    dist: DistContext
    key: str
    status: str  # run | resume | extend | repair
    previous_units: dict[str, Any] | None
    outputs: dict[str, Path] = field(default_factory=dict)
    # the experiment loggers' sink (mkdt.metrics): every Progress forwards its fields to it; a body may
    # also log scalars of its own with ``run.metrics.log(series, step, name=value)``
    metrics: Metrics = field(default_factory=lambda: Metrics(None))

    @property
    def device(self):
        return self.dist.device

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    @property
    def resumed(self) -> bool:
        return self.status != "run"

    def path(self, name: str) -> Path:
        return self.folder / name

    def output(self, role: str, name: str) -> Path:
        """Declare ``name`` (in the stage folder) as the output ``role``; returns its path."""
        path = self.folder / name
        self.outputs[role] = path
        return path

    def rel(self, path: str | os.PathLike) -> str:
        return self.layout.rel(path)

    def progress(self, total: int | None, desc: str | None = None, **kwargs: Any) -> Progress:
        return Progress(total, desc or self.stage.name, enabled=self.dist.is_main, **kwargs)

    def note(self, text: str) -> None:
        if self.dist.is_main:
            log.info(f"{self.stage.name}: {text}")


@dataclass
class Decision:
    """What :func:`run_stage` will do (``decide`` has no side effects; ``mkdt run --dry-run`` shows it)."""

    action: str  # reuse | restore | resume | extend | repair | run
    reason: str
    key: str
    units: dict[str, Any]
    inputs: dict[str, Any]
    identity: dict[str, Any]
    folder: Path
    record: dict[str, Any] | None = None  # the record that is reused / extended / resumed
    version: Path | None = None  # the kept version to bring back (restore, or resume/extend of it)


# ----------------------------------------------------------------------------------------------
# settings of the engine itself
# ----------------------------------------------------------------------------------------------
def keep_versions() -> int:
    raw = os.environ.get(ENV_KEEP_VERSIONS, "")
    if not raw.strip():
        return DEFAULT_KEEP_VERSIONS
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{ENV_KEEP_VERSIONS}={raw!r} must be a whole number of versions to keep (>= 0)") from None
    if value < 0:
        raise ConfigError(f"{ENV_KEEP_VERSIONS}={raw!r} must be >= 0")
    return value


# ----------------------------------------------------------------------------------------------
# identity
# ----------------------------------------------------------------------------------------------
def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _pop(tree: dict, dotted: str) -> Any:
    node = tree
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.get(p)
        if not isinstance(node, dict):
            return None
    return node.pop(parts[-1], None)


def _put(tree: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[last] = value


def _normalise_data(tree: Any) -> Any:
    """DataConfig sections: root as a real path, download/cache settings dropped."""
    from mkdt.data import DataConfig

    names = {f.name for f in dataclasses.fields(DataConfig)}
    if isinstance(tree, dict):
        if set(tree) == names:
            out = {k: v for k, v in tree.items() if k not in DATA_RUNTIME_FIELDS}
            if out.get("root"):
                out["root"] = os.path.realpath(os.path.expanduser(str(out["root"])))
            return out
        return {k: _normalise_data(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_normalise_data(v) for v in tree]
    return tree


def producer_of(path: Path) -> tuple[Path, dict] | None:
    """The finished stage folder holding ``path`` (the nearest ancestor with a ``done`` record)."""
    for folder in [path, *path.parents] if path.is_dir() else path.parents:
        record_path = folder / STAGE_RECORD
        if record_path.is_file():
            record = _read_record_quietly(record_path)
            if record is not None and record.get("status") == "done":
                return folder, record
            return None
    return None


def input_identity(path: Path | None) -> str | None:
    """A file or folder as its producing stage's output identity plus the path inside it, or its sha256."""
    if path is None or not path.exists():
        return None
    found = producer_of(path)
    if found is not None:
        folder, record = found
        gone = missing_outputs(folder, record)
        if gone:
            raise MkdtError(f"{folder / gone[0]}: an output recorded by stage {record.get('stage')} is missing or "
                            f"changed; run that stage again (`mkdt {record.get('stage')}` with its settings)")
        inner = path.resolve().relative_to(folder.resolve()).as_posix()
        return f"{record['output_id']}/{inner}"
    if path.is_file():
        return "sha256:" + file_sha256(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    return "tree:" + digest([[p.relative_to(path).as_posix(), file_sha256(p)] for p in files])


def identify(stage: Stage, config: Any, layout: RunLayout) -> tuple[str, dict, dict, dict]:
    """(key, units, inputs, identity) of ``config``: see the module docstring."""
    tree = to_dict(config)
    for name in (*RUNTIME_FIELDS, *stage.runtime, *stage.input_fields):
        _pop(tree, name)
    units = {name: _pop(tree, name) for name in stage.units}
    for name, value in stage.added:
        kept = _pop(tree, name)
        if kept != value:
            _put(tree, name, kept)
    tree = _normalise_data(tree)
    if hasattr(config, "device"):
        tree["device_type"] = resolve_device(config.device).type
    inputs = {name: input_identity(path) for name, path in stage.inputs(config, layout).items()}
    identity = {"stage": stage.name, "config": tree, "inputs": inputs}
    return digest(identity), units, inputs, identity


def _first_difference(old: Any, new: Any, prefix: str = "") -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new), key=str):
            found = _first_difference(old.get(k), new.get(k), f"{prefix}{k}.")
            if found:
                return found
        return None
    if old != new:
        return f"{prefix[:-1]}: {old!r} -> {new!r}"
    return None


# ----------------------------------------------------------------------------------------------
# records and versions
# ----------------------------------------------------------------------------------------------
def _read_record_quietly(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("record_version") == RECORD_VERSION else None


def read_record(folder: Path) -> dict | None:
    """The folder's record; a record that is not one (wrong JSON type, an older format) is a one-line error."""
    path = folder / STAGE_RECORD
    if not path.is_file():
        return None
    record = load_json(path)
    if not isinstance(record, dict):
        raise MkdtError(f"{path}: not a stage record (holds {type(record).__name__}); move the folder away or "
                        f"delete {path} to run the stage again")
    if record.get("record_version") != RECORD_VERSION or record.get("status") not in ("running", "done"):
        return {"status": "foreign"}
    return record


def missing_outputs(folder: Path, record: Mapping[str, Any]) -> list[str]:
    """Recorded outputs that are gone or have another size than recorded."""
    bad = []
    for role, entry in (record.get("outputs") or {}).items():
        path = folder / entry["path"]
        if not path.is_file() or path.stat().st_size != entry.get("bytes"):
            bad.append(entry["path"])
    return bad


def recorded_outputs(folder: Path, prefix: str = "") -> list[Path] | None:
    """The outputs a finished stage in ``folder`` recorded (roles starting with ``prefix``), in role order;
    ``None`` when the folder holds no record (e.g. files made by hand). A stage still running (or
    interrupted) there is an error: its outputs are not complete."""
    record = _read_record_quietly(folder / STAGE_RECORD)
    if record is None:
        return None
    if record.get("status") != "done":
        raise MkdtError(f"{folder}: the {record.get('stage')} stage there has not finished; run it again "
                        f"(`mkdt {record.get('stage')}`) to complete it")
    return [folder / entry["path"] for role, entry in sorted(record.get("outputs", {}).items())
            if role.startswith(prefix)]


def versions(folder: Path) -> list[tuple[int, Path]]:
    """Earlier outputs kept beside ``folder`` as ``<name>.stale.<n>``, oldest first."""
    found = []
    if folder.parent.is_dir():
        pattern = re.compile(re.escape(folder.name) + r"\.stale\.(\d+)")
        for p in folder.parent.iterdir():
            m = pattern.fullmatch(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p))
    return sorted(found)


def _next_version(folder: Path) -> Path:
    taken = versions(folder)
    n = taken[-1][0] + 1 if taken else 1
    return folder.with_name(f"{folder.name}.stale.{n}")


def _nonempty(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir())


def decide(stage: Stage, config: Any) -> Decision:
    """What :func:`run_stage` would do for ``config`` now (no side effects)."""
    layout = RunLayout(config.out)
    folder = stage.folder(config, layout)
    key, units, inputs, identity = identify(stage, config, layout)

    def decision(action: str, reason: str, record: dict | None = None, version: Path | None = None) -> Decision:
        return Decision(action, reason, key, units, inputs, identity, folder, record, version)

    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder}: a file is in the way of the stage folder; move it away or choose another --out")
    current = read_record(folder) if folder.is_dir() else None
    if not stage.cached:
        return decision("run", "always runs")
    if current and current.get("key") == key:
        if current["status"] == "done":
            if current.get("units") == units:
                gone = missing_outputs(folder, current)
                if not gone:
                    return decision("reuse", "done before", current)
                return decision("repair", f"recorded output {gone[0]} is missing or changed; running again",
                                current)
            if stage.extends(current.get("units") or {}, units):
                return decision("extend", f"extending {_units_text(current.get('units'), units)}", current)
        elif current["status"] == "running":
            return decision("resume", "resuming the interrupted run", current)
    for _, path in reversed(versions(folder)):
        kept = _read_record_quietly(path / STAGE_RECORD)
        if not kept or kept.get("key") != key:
            continue
        if kept["status"] == "done" and kept.get("units") == units and not missing_outputs(path, kept):
            return decision("restore", f"restoring the finished output kept in {path.name}", kept, path)
        if kept["status"] == "done" and stage.extends(kept.get("units") or {}, units):
            return decision("extend", f"extending the output kept in {path.name} "
                                      f"({_units_text(kept.get('units'), units)})", kept, path)
        if kept["status"] == "running":
            return decision("resume", f"resuming the interrupted run kept in {path.name}", kept, path)
    if current is None and _nonempty(folder):
        return decision("resume", "resuming the unrecorded work found in the folder")
    if current and current.get("status") in ("done", "running") and current.get("identity"):
        change = _first_difference(current["identity"], identity) or "settings changed"
        return decision("run", f"settings changed ({change})")
    if _nonempty(folder):
        return decision("run", "the folder holds outputs of another mkdt version or settings")
    return decision("run", "not run before")


def _units_text(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> str:
    old = old or {}
    parts = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in new.items() if old.get(k) != v]
    return ", ".join(parts) or "same units"


def missing_inputs(stage: Stage, config: Any, made: tuple[Path, ...] = ()) -> list[tuple[str, Path]]:
    """Inputs of ``config`` that do not exist and are not inside one of the folders ``made`` (the folders of
    steps that run before it): ``(name, path)`` pairs, data folders and archives included."""
    layout = RunLayout(config.out)
    found = [(name, path) for name, path in stage.inputs(config, layout).items() if path is not None]
    found += [("data", path) for path in data_roots(config)]
    return [(name, path) for name, path in found
            if not path.exists() and not any(_inside(path, folder) for folder in made)]


def check_inputs(stage: Stage, config: Any) -> None:
    """A stage run on its own: every input must exist before it starts (a ConfigError, exit 2)."""
    resolve_device(config.device)
    gone = missing_inputs(stage, config)
    if gone:
        name, path = gone[0]
        hint = f"run `mkdt {name}` first or set its path" if name in ("teacher", "targets", "experts", "init") \
            else "create it or set its path"
        raise ConfigError(f"{path}: {stage.name} input '{name}' not found; {hint}")


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def data_roots(config: Any) -> list[Path]:
    """Data folders/archives a config reads that must exist (sources allowed to download are left out)."""
    from mkdt.data import DataConfig

    found: list[Path] = []

    def walk(node: Any) -> None:
        if isinstance(node, DataConfig):
            if node.root and not node.download:
                found.append(Path(node.root).expanduser())
        elif dataclasses.is_dataclass(node) and not isinstance(node, type):
            for f in dataclasses.fields(node):
                walk(getattr(node, f.name))
        elif isinstance(node, (list, tuple)):
            for item in node:
                walk(item)

    walk(config)
    return found


# ----------------------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------------------
def _write_record(folder: Path, record: Mapping[str, Any]) -> None:
    save_json(folder / STAGE_RECORD, record)


def _move(src: Path, dest: Path) -> None:
    try:
        src.rename(dest)
    except OSError as exc:
        raise io_error(src, exc) from None


def _prepare(stage: Stage, config: Any, d: Decision) -> tuple[str, Path | None]:
    """Move folders for the decision (rank 0). Returns the body's status and the folder moved aside (to
    put back if the new run fails)."""
    folder = d.folder
    moved: Path | None = None
    if d.version is not None:  # bring a kept version back; what is in the folder now is kept in turn
        if _nonempty(folder):
            moved = _next_version(folder)
            _move(folder, moved)
        elif folder.is_dir():
            folder.rmdir()
        _move(d.version, folder)
        if d.action == "restore":
            return "restore", moved
    elif d.action == "run" and stage.cached and _nonempty(folder):
        moved = _next_version(folder)
        _move(folder, moved)
        log.info(f"{stage.name}: the previous output is kept as {moved.name} until the new run completes")
    elif d.action == "run" and not stage.cached and folder.is_dir():
        shutil.rmtree(folder)
    return {"run": "run", "resume": "resume", "extend": "extend", "repair": "repair"}.get(d.action, d.action), moved


def _put_back(stage: Stage, folder: Path, moved: Path) -> None:
    """The new run did not complete: keep what it did as a version and bring the previous output back."""
    try:
        if _nonempty(folder):
            partial = _next_version(folder)
            folder.rename(partial)
        elif folder.is_dir():
            folder.rmdir()
        moved.rename(folder)
        log.warning(f"{stage.name}: the new run did not complete; the previous output is back in {folder}")
    except OSError as exc:  # never hide the original error; say where things are
        log.warning(f"{stage.name}: could not move {moved} back to {folder} ({exc}); it is still there")


def _prune(folder: Path) -> None:
    keep = keep_versions()
    old = versions(folder)
    for _, path in old[: max(0, len(old) - keep)]:
        shutil.rmtree(path, ignore_errors=True)


def _record(stage: Stage, config: Any, d: Decision, run: StageRun, summary: Mapping[str, Any],
            measure: Mapping[str, Any], status: str) -> dict[str, Any]:
    layout = run.layout
    outputs = {role: {"path": p.relative_to(run.folder).as_posix(), "bytes": p.stat().st_size}
               for role, p in run.outputs.items()} if status == "done" else {}
    return {
        "record_version": RECORD_VERSION, "stage": stage.name, "status": status, "key": d.key, "units": d.units,
        "output_id": digest([d.key, d.units]), "identity": d.identity,
        "inputs": {name: {"path": layout.rel(p) if p is not None else None, "identity": d.inputs.get(name)}
                   for name, p in stage.inputs(config, layout).items()},
        "outputs": outputs, "summary": dict(summary), "measure": dict(measure),
        "device": str(run.device), "world_size": run.dist.world_size, "environment": environment_info(),
        "config": to_dict(config),
    }


def _result(stage: Stage, folder: Path, status: str, record: Mapping[str, Any]) -> StageResult:
    outputs = {role: folder / entry["path"] for role, entry in (record.get("outputs") or {}).items()}
    return StageResult(stage.name, folder, status, dict(record.get("summary") or {}), outputs,
                       dict(record.get("measure") or {}))


STATUS_WORDS = {"run": "ran", "resume": "resumed", "extend": "extended", "repair": "repaired"}


def run_stage(stage: Stage, config: Any, **hooks: Any) -> StageResult:
    """Run ``stage`` on ``config`` under the contract of the module docstring; every rank returns the result.

    ``hooks`` are passed to the body (e.g. callbacks tests use to interrupt a run).
    """
    validate(config, f"{stage.section}.")
    dctx = init_distributed(config.device)
    layout = RunLayout(config.out)
    decision = None
    if dctx.is_main:
        try:
            layout.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise io_error(layout.root, exc) from None
        log_to_file(layout.log_file)
        decision = decide(stage, config)
        log.info(f"{stage.name}: {decision.reason}")
        if decision.action in ("reuse", "restore"):
            if decision.action == "restore":
                _prepare(stage, config, decision)
            decision = dataclasses.replace(decision, record=read_record(decision.folder) or decision.record)
    decision = broadcast_object(decision, dctx)
    folder = decision.folder
    if decision.action in ("reuse", "restore"):
        status = "reused" if decision.action == "reuse" else "restored"
        return _result(stage, folder, status, decision.record or {})
    moved = None
    if dctx.is_main:
        body_status, moved = _prepare(stage, config, decision)
    else:
        body_status = {"run": "run", "resume": "resume", "extend": "extend", "repair": "repair"}[decision.action]
    previous_units = (decision.record or {}).get("units") if decision.action in ("extend", "repair", "resume") else None
    run = StageRun(stage, config, layout, folder, dctx, decision.key, body_status, previous_units)
    try:
        if dctx.is_main:
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise io_error(folder, exc) from None
            remove_orphans(folder)
            _write_record(folder, _record(stage, config, decision, run, {}, {}, "running"))
            atomic_write_text(folder / CONFIG_FILE, dump_yaml(config))
        barrier(dctx)
        if dctx.is_main:
            run.metrics = Metrics(folder, configured_loggers(), name=f"{layout.root.name}/{stage.name}",
                                  config=to_dict(config))
        with Meter(children=False) as meter, torch_threads(getattr(config, "threads", 0)), activate(run.metrics):
            summary = stage.body(config, run, **hooks) or {}
        barrier(dctx)
        record = None
        if dctx.is_main:
            measure = {**meter.as_dict(), "world_size": dctx.world_size}
            record = _record(stage, config, decision, run, summary, measure, "done")
            _write_record(folder, record)
            _prune(folder)
    except BaseException:
        if dctx.is_main:
            if moved is not None:
                _put_back(stage, folder, moved)
            elif folder.is_dir() and {p.name for p in folder.iterdir()} <= {STAGE_RECORD, CONFIG_FILE}:
                shutil.rmtree(folder, ignore_errors=True)  # failed before any work: leave nothing behind
                for parent in folder.parents:
                    if parent == layout.root or not parent.is_relative_to(layout.root):
                        break
                    with contextlib.suppress(OSError):
                        parent.rmdir()  # only when empty
        raise
    record = broadcast_object(record, dctx)
    return _result(stage, folder, STATUS_WORDS[body_status], record)


def recorded_result(stage: Stage, config: Any) -> StageResult | None:
    """The finished result of ``config`` if the stage would reuse it (for the pipeline after a torchrun
    launch, and for reports); ``None`` otherwise."""
    d = decide(stage, config)
    if d.action != "reuse":
        return None
    return _result(stage, d.folder, "reused", d.record or {})

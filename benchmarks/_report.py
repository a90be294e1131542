"""What every benchmark does with its figures: ``benchmarks/results/<name>.json`` and its own section of
``docs/RESULTS.md`` (between ``<!-- <name>:start -->`` and ``<!-- <name>:end -->``), both written atomically."""

from __future__ import annotations

import datetime as dt
import os
import shlex
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
RESULTS_MD = ROOT / "docs" / "RESULTS.md"


def portable(value: Any) -> Any:
    """Absolute paths of this machine (in strings, lists and mappings) as paths relative to the repository,
    e.g. ``/…/shared/data/x.tar.gz`` -> ``../shared/data/x.tar.gz``: committed figures name no machine."""
    if isinstance(value, str):
        def rel(token: str) -> str:
            if token.startswith("/") and len(token) > 1:
                return os.path.relpath(token, ROOT)
            key, sep, rest = token.partition("=")  # key=/abs/path
            return f"{key}={rel(rest)}" if sep and rest.startswith("/") else token
        return " ".join(rel(t) for t in value.split(" "))
    if isinstance(value, list):
        return [portable(v) for v in value]
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    return value


def command_line(argv: list[str] | None = None) -> str:
    """The command that produced the figures, as a user would type it from the project root."""
    args = sys.argv[1:] if argv is None else argv
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(ROOT)
    except ValueError:
        pass
    return portable(" ".join(shlex.quote(a) for a in ["python", str(script), *args]))


def now() -> str:
    """UTC timestamp, seconds precision."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def results_path(name: str) -> Path:
    return RESULTS_DIR / f"{name}.json"


def write_results_json(name: str, payload: dict[str, Any]) -> Path:
    """``benchmarks/results/<name>.json`` (must already hold ``command`` and ``date``)."""
    from mkdt.artifacts import save_json

    missing = [k for k in ("command", "date") if k not in payload]
    if missing:
        raise ValueError(f"benchmark results for {name} lack {missing}: every figure needs its command and date")
    path = results_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_json(path, portable(payload))
    return path


def section_markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def replace_section(name: str, markdown: str, path: Path = RESULTS_MD) -> None:
    """Replace only this benchmark's section of RESULTS.md (re-read just before writing; appended if new).

    ``markdown`` is the section body without the markers.
    """
    from mkdt.artifacts import atomic_write_text

    start, end = section_markers(name)
    text = f"{start}\n{portable(markdown.strip())}\n{end}"
    current = path.read_text("utf-8") if path.is_file() else "# Results\n"
    if start in current and end in current:
        head, rest = current.split(start, 1)
        updated = head + text + rest.split(end, 1)[1]
    else:
        updated = current.rstrip("\n") + "\n\n" + text + "\n"
    atomic_write_text(path, updated)


def machine() -> dict[str, Any]:
    """The CPU a figure was measured on (model, the vector / matrix flags that change speeds), its cores and
    the load average when called: speeds are comparable only within one machine and one run."""
    model, flags = "?", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name") and model == "?":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags |= {flag for flag in line.split(":", 1)[1].split()
                              if flag == "avx2" or flag.startswith(("avx512", "amx"))}
    except OSError:
        pass
    load = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    return {"cpu": model, "flags": sorted(flags), "cores": os.cpu_count(), "load_average": load}

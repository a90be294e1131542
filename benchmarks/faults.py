"""Fault-injection audit: SIGKILL at many points of a small pipeline, and every bad input the tests know.

    python benchmarks/faults.py --kills 15

Runs ``tests/test_faults.py`` with ``MKDT_FAULT_KILLS`` kills (each at a random point of the tiny digits
pipeline, the next run resuming from what the kill left) and records: the number of kills, whether every
tensor of the final run equals an uninterrupted run's, orphan temporary files left, and how many bad-input
cases gave one line, a non-zero exit and no lost work. Writes ``benchmarks/results/faults.json`` and its
section of ``docs/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402

NAME = "faults"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=15, help="SIGKILLs at random points of one run (default 15)")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    command, date = _report.command_line(argv), _report.now()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        junit, kill_report = Path(tmp) / "junit.xml", Path(tmp) / "kills.json"
        env = {**os.environ, "MKDT_FAULT_KILLS": str(args.kills), "MKDT_FAULT_REPORT": str(kill_report)}
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                        str(_report.ROOT / "tests" / "test_faults.py")], env=env, cwd=_report.ROOT)
        seconds = time.perf_counter() - t0
        cases = [(case.get("name"), "pass" if not list(case) else case[0].tag)
                 for case in ET.parse(junit).getroot().iter("testcase")]
        kills = json.loads(kill_report.read_text()) if kill_report.is_file() else {}
    killed = [c for c in cases if c[0].startswith("test_killed_runs")]
    bad = [c for c in cases if not c[0].startswith(("test_killed_runs", "test_sigterm"))]
    payload = {"command": command, "date": date, "load_average_before": round(load, 2),
               "seconds": round(seconds, 1),
               "kills": kills.get("kills"), "kill_points": kills.get("kill_points"),
               "kills_identical": bool(killed) and killed[0][1] == "pass",
               "files_compared": kills.get("files_compared"), "tensors_compared": kills.get("tensors_compared"),
               "orphan_temp_files": kills.get("orphan_temp_files"),
               "bad_inputs": len(bad), "bad_inputs_one_line": sum(1 for _, r in bad if r == "pass"),
               "cases": dict(cases)}
    lines = ["## Fault injection (`benchmarks/faults.py`)", "",
             f"Command: `{command}` — {date}, load average {payload['load_average_before']} before, "
             f"{payload['seconds']} s.", "",
             f"- SIGKILL of a tiny digits pipeline at {payload['kills']} points spread over every stage (each in its "
             f"own run folder, the next run resuming from what the kill left): every result tensor identical to an "
             f"uninterrupted run's: {'yes' if payload['kills_identical'] else 'NO'} ({payload['files_compared']} "
             f"files, {payload['tensors_compared']} tensors each time); orphan temporary files left: "
             f"{payload['orphan_temp_files']}.",
             f"- Bad inputs with one line naming the file or key, a non-zero exit and no finished work lost: "
             f"{payload['bad_inputs_one_line']}/{payload['bad_inputs']} (tests/test_faults.py; the config and I/O "
             f"cases of tests/test_cli.py, tests/test_pipeline.py and tests/test_artifacts.py add more).", "",
             "| case | result |", "|---|---|"]
    lines += [f"| {name} | {result} |" for name, result in cases]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        _report.write_results_json(NAME, payload)
        _report.replace_section(NAME, text)
    return 0 if payload["kills_identical"] and payload["bad_inputs_one_line"] == payload["bad_inputs"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

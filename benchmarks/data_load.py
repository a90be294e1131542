"""Benchmark: loading an image set with an empty decode cache, then again from the cache.

Why: every stage loads the same data, so the second and later loads are the ones that matter; this
shows what the first decode costs and that cached loads take a fraction of a second.

    python benchmarks/data_load.py --path ../shared/data/cifar10-jpeg.tar.gz [--cache-dir DIR]

Prints a markdown table, writes ``benchmarks/results/data_load.json`` and replaces its own section of
``docs/RESULTS.md`` (between ``<!-- data_load:start -->`` and ``<!-- data_load:end -->``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from mkdt.artifacts import atomic_write_text, save_json
from mkdt.data import load_dataset
from mkdt.errors import MkdtError

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- data_load:start -->", "<!-- data_load:end -->"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--path", required=True, help="dataset root, e.g. ../shared/data/cifar10-jpeg.tar.gz")
    p.add_argument("--source", default="imagefolder", help="data source name (default: imagefolder)")
    p.add_argument("--splits", default="train,test", help="comma-separated splits (default: train,test)")
    p.add_argument("--cache-dir", help="an absent or empty folder for the cache (kept); default: a temporary one")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "data_load.json"))
    p.add_argument("--doc", default=str(REPO / "docs" / "RESULTS.md"))
    return p.parse_args(argv)


def empty_cache_dir(requested: str | None) -> tuple[Path, bool]:
    """The cache folder and whether to delete it afterwards; a non-empty folder would not be 'first'."""
    if requested is None:
        return Path(tempfile.mkdtemp(prefix="mkdt-bench-cache-")), True
    path = Path(requested)
    if path.exists() and any(path.iterdir()):
        raise MkdtError(f"{path}: not empty; pass an absent or empty --cache-dir so the first load decodes")
    return path, False


def timed_loads(source: str, root: str, splits: list[str], cache: Path) -> dict[str, dict[str, Any]]:
    """Per split: seconds to load, seconds to also read every pixel, size and fingerprint."""
    out = {}
    for split in splits:
        start, cpu_start = time.perf_counter(), time.process_time()
        ds = load_dataset(source, root=root, split=split, cache_dir=str(cache))
        loaded, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        int(ds.images.sum())  # touch every page of a memory-mapped cache entry
        touched = time.perf_counter() - start
        out[split] = {"n": len(ds), "shape": list(ds.images.shape[1:]), "seconds": loaded, "cpu_seconds": cpu,
                      "seconds_with_read": touched, "fingerprint": ds.fingerprint()}
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    cache, temporary = empty_cache_dir(args.cache_dir)
    try:
        first = timed_loads(args.source, args.path, splits, cache)
        cached = timed_loads(args.source, args.path, splits, cache)
    finally:
        if temporary:
            shutil.rmtree(cache, ignore_errors=True)
    for split in splits:
        if first[split]["fingerprint"] != cached[split]["fingerprint"]:
            raise SystemExit(f"cached {split} differs from the decoded one; the cache is broken")
    return {
        "path": str(Path(args.path).resolve()),
        "source": args.source,
        "splits": {s: {"n": first[s]["n"], "shape": first[s]["shape"], "fingerprint": first[s]["fingerprint"],
                       "first_s": round(first[s]["seconds"], 3),
                       "first_cpu_s": round(first[s]["cpu_seconds"], 3),
                       "cached_s": round(cached[s]["seconds"], 4),
                       "cached_read_all_s": round(cached[s]["seconds_with_read"], 4)} for s in splits},
        "total": {"n": sum(first[s]["n"] for s in splits),
                  "first_s": round(sum(first[s]["seconds"] for s in splits), 3),
                  "first_cpu_s": round(sum(first[s]["cpu_seconds"] for s in splits), 3),
                  "cached_s": round(sum(cached[s]["seconds"] for s in splits), 4),
                  "cached_read_all_s": round(sum(cached[s]["seconds_with_read"] for s in splits), 4)},
        "machine": machine_info(),
    }


def machine_info() -> dict[str, Any]:
    import torchvision

    info: dict[str, Any] = {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                            "torchvision": torchvision.__version__, "torch_threads": torch.get_num_threads()}
    if hasattr(os, "getloadavg"):
        info["load_average_1min"] = round(os.getloadavg()[0], 2)  # the machine may be shared
    return info


def table(results: dict[str, Any]) -> str:
    head = ["split", "images", "first load (s)", "first load, CPU (s)", "cached load (s)",
            "cached + read all pixels (s)"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    rows = [(s, r) for s, r in results["splits"].items()] + [("**total**", results["total"])]
    for name, r in rows:
        cells = [name, f"{r['n']:,}", f"{r['first_s']:.2f}", f"{r['first_cpu_s']:.2f}", f"{r['cached_s']:.3f}",
                 f"{r['cached_read_all_s']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def doc_section(command: str, date: str, results: dict[str, Any]) -> str:
    m = results["machine"]
    load = f", 1-min load average {m['load_average_1min']}" if "load_average_1min" in m else ""
    return "\n".join([
        START,
        "## Data loading (`benchmarks/data_load.py`)",
        "",
        f"`{command}` — {date}; {m['cpus']} CPUs{load}; torch {m['torch']}, torchvision {m['torchvision']}.",
        "",
        f"Source `{results['source']}` reading `{Path(results['path']).name}`. *First* = empty cache: decode "
        "and write the cache (for a tar archive the first split's load decodes every split in one pass, so "
        "later splits are already cached); its CPU time is shown too because the machine may be shared "
        "(wall time then grows with the load average). *Cached* = memory-mapped `.npy` entries; the last "
        "column also reads every pixel once.",
        "",
        table(results),
        END,
    ])


def update_doc(path: Path, section: str) -> None:
    """Replace this benchmark's section (or append it); other sections are left untouched."""
    text = path.read_text("utf-8") if path.is_file() else "# Results\n"
    if START in text and END in text and text.index(START) < text.index(END):
        head, rest = text.split(START, 1)
        tail = rest.split(END, 1)[1]
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    atomic_write_text(path, text)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    command = "python benchmarks/data_load.py " + " ".join(shlex.quote(a) for a in argv)
    date = dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()
    try:
        results = run(args)
    except MkdtError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(table(results))
    save_json(args.results, {"command": command, "date": date, "results": results})
    update_doc(Path(args.doc), doc_section(command, date, results))
    print(f"\nwrote {args.results} and the data_load section of {args.doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The paper's CIFAR-10 2% experiment at the scale of a 2-core CPU: does MKDT beat its baselines?

    python benchmarks/cifar10_cpu.py --data ../shared/data/cifar10-jpeg.tar.gz

Runs ``mkdt run --preset cifar10-cpu`` (teacher imported from the committed
``benchmarks/assets/cifar10-cpu-teacher.safetensors`` unless ``--train-teacher``) into ``--out``:
targets -> KD experts -> high-loss / random initial sets -> MKDT distillation (from both) -> SAS and
KRR-ST -> KD pre-training of a fresh ConvNet on each 1,000-image set (and on all 50,000 images) -> linear
probes on CIFAR-10 (1% and 5% labels, seeds 0-2, protocols ``paper`` and ``converged``) and transfer
probes on Fashion-MNIST and digits. Re-running resumes (finished stages are skipped).

Writes ``benchmarks/results/cifar10_cpu.json`` (shape: ``{"command", "date", "stages": {name: {"seconds",
"peak_mb"}}, "results": {method: {downstream: {protocol: {label_percent: {"mean", "std", "seeds"}}}}}}``,
accuracies in percent) and the ``cifar10_cpu`` section of ``docs/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402

NAME = "cifar10_cpu"
METHODS = ("none", "random", "high_loss", "sas", "krr_st", "mkdt_random_init", "mkdt", "full")
EXTRA_METHODS = ("krr_st_own_recipe", "mtt_ssl")  # opt in with --methods
DOWNSTREAM = ("cifar10", "fashion_mnist", "digits")
DEFAULT_TEACHER = _report.ROOT / "benchmarks" / "assets" / "cifar10-cpu-teacher.safetensors"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="CIFAR-10 image folder or tar (e.g. ../shared/data/cifar10-jpeg.tar.gz)")
    p.add_argument("--fashion-mnist", default=None,
                   help="folder with the Fashion-MNIST IDX files (default: fashion-mnist beside --data)")
    p.add_argument("--out", default="runs/cifar10-cpu", help="run directory (resumed if it exists)")
    p.add_argument("--teacher", default=str(DEFAULT_TEACHER), help="teacher file to import (safetensors)")
    p.add_argument("--train-teacher", action="store_true", help="train the cifar10-cpu teacher instead of importing")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS + EXTRA_METHODS,
                   help="methods to run (default: the eight of the issue; extras: %(choices)s)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the stages' own settings)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="run-document override, e.g. distill.iterations=250")
    p.add_argument("--quick", action="store_true",
                   help="plumbing check on 2,000 images with tiny settings; writes nothing under benchmarks/ or docs/")
    p.add_argument("--no-write", action="store_true", help="do not write the results JSON / RESULTS.md")
    p.add_argument("--rewrite-docs", action="store_true", help="only re-write the RESULTS.md section from the JSON")
    return p.parse_args(argv)


QUICK = [
    "experts.num_experts=1", "experts.keep_epochs=2", "init.epoch=1", "init.num_experts=1", "distill.iterations=3",
    "distill.max_start_epoch=1", "distill.expert_epochs=1", "distill.syn_steps=2", "distill.checkpoint_every=2",
    "distill.validation_experts=0",
    "krr_st.iterations=3", "krr_st.pool_size=2", "krr_st.max_online_steps=3", "pretrain.schedule.epochs=1",
    "pretrain/full.schedule.epochs=1", "probe.seeds=[0]", "probe.percents=[5]", "probe.converged_max_iterations=50",
]


def run_document(args: argparse.Namespace) -> dict:
    """The ``cifar10-cpu`` run preset with this machine's paths (absolute) and the benchmark's choices."""
    from mkdt.pipeline import load_run_document

    data = Path(args.data).expanduser().resolve()
    fashion = Path(args.fashion_mnist).expanduser().resolve() if args.fashion_mnist else data.parent / "fashion-mnist"
    overrides = [*(QUICK if args.quick else []), *args.overrides]
    doc = load_run_document("cifar10-cpu", [], overrides, {"out": args.out})
    doc["data"] = {**doc.get("data", {}), "root": str(data)}
    doc["run"] = {**doc.get("run", {}), "methods": list(args.methods)}
    probe = doc.setdefault("probe", {})
    probe["downstream"] = [{"name": "imagefolder", "root": str(data)}, {"name": "idx", "root": str(fashion)},
                           {"name": "digits"}]
    if args.quick:
        doc["data"]["indices"] = list(range(0, 50000, 25))
        probe["downstream"] = [{"name": "digits"}]
    teacher = doc.setdefault("teacher", {})
    if args.train_teacher:
        teacher["monitor"] = {**teacher.get("monitor", {}), "name": "imagefolder", "root": str(data), "split": "test"}
    else:
        path = Path(args.teacher).expanduser().resolve()
        if not path.is_file():
            raise SystemExit(f"{path}: teacher file not found; pass --teacher FILE or --train-teacher")
        teacher["import_path"] = str(path)
    return doc


def downstream_names(doc: dict) -> dict[str, str]:
    """Probe result keys (labels derived from the data configs) -> the benchmark's downstream names."""
    from mkdt.config import resolve
    from mkdt.evaluate import ProbeConfig
    from mkdt.evaluate.probing import unique_labels

    cfg = resolve(ProbeConfig, preset=doc.get("preset"), section="probe", docs=[doc])
    return dict(zip(unique_labels(cfg.downstream), DOWNSTREAM))


def collect(out: Path, state: dict, names: dict[str, str]) -> dict[str, Any]:
    """Stage costs from pipeline.json and probe accuracies from each method's results.json."""
    stages = {name: {"seconds": (step.get("measure") or {}).get("seconds"),
                     "peak_mb": (step.get("measure") or {}).get("peak_mb")}
              for name, step in state["steps"].items()}
    results: dict[str, Any] = {}
    for method in state.get("methods", []):
        path = out / "probe" / method / "results.json"
        if not path.is_file():
            continue
        summary = json.loads(path.read_text("utf-8"))["summary"]
        per_set: dict[str, Any] = {}
        for label, protocols in summary.items():
            per_set[names.get(label, label)] = {
                protocol: {pct: {"mean": cell["mean"], "std": cell["std"], "seeds": cell["accuracies"],
                                 "collapsed": cell.get("collapsed", False)}
                           for pct, cell in by_pct.items()}
                for protocol, by_pct in protocols.items()}
        results[method] = per_set
    return {"stages": stages, "results": results}


def verdict(results: dict[str, Any]) -> list[dict[str, Any]]:
    """MKDT (high-loss init) vs random subset and vs KRR-ST on the CIFAR-10 probe, per protocol and label
    fraction. "Beats by more than the spread": mean difference > std(MKDT) + std(other) (seed std, ddof 1)."""
    rows = []
    mkdt = results.get("mkdt", {}).get("cifar10", {})
    for other in ("random", "krr_st"):
        base = results.get(other, {}).get("cifar10", {})
        for protocol, by_pct in mkdt.items():
            for pct, cell in by_pct.items():
                ref = base.get(protocol, {}).get(pct)
                if ref is None or cell["mean"] is None or ref["mean"] is None:
                    continue
                diff = cell["mean"] - ref["mean"]
                spread = (cell["std"] or 0.0) + (ref["std"] or 0.0)
                rows.append({"versus": other, "protocol": protocol, "label_percent": pct,
                             "difference": round(diff, 2), "spread": round(spread, 2), "beats": diff > spread})
    return rows


def fmt(cell: dict | None) -> str:
    if not cell or cell.get("mean") is None:
        return "-"
    text = f"{cell['mean']:.2f} ± {cell['std'] or 0:.2f}"
    return text + (" (collapsed)" if cell.get("collapsed") else "")


def seeds_sentence(report: dict[str, Any]) -> str:
    seeds = report.get("eval_seeds")
    if seeds:
        return (f"Linear-probe accuracy (%), mean ± std (ddof 1) over evaluation seeds {', '.join(map(str, seeds))}: "
                f"each seed pre-trains its own encoder on the method's set and draws its own labelled subset, so "
                f"the spread includes the pre-training's randomness.")
    return ("Linear-probe accuracy (%), mean ± std over probe seeds 0-2 (the labelled subset changes; "
            "pre-training is seed 0).")


def markdown(report: dict[str, Any]) -> str:
    lines = ["## CIFAR-10 2% on CPU (`benchmarks/cifar10_cpu.py`)", "",
             f"Run {report['date']}: `{report['command']}` ({report.get('cpus')} CPUs, "
             f"{report.get('processes', 1)} torchrun process(es) for experts / distill / probe, torch threads "
             f"{report.get('threads')} in the pipeline's own process, whole run {report.get('total_minutes')} min as the sum of its stages"
             f"{', teacher imported' if report.get('teacher_imported') else ', teacher trained'}).", "",
             seeds_sentence(report), ""]
    results = report["results"]
    methods = [m for m in METHODS + EXTRA_METHODS if m in results]
    for downstream in DOWNSTREAM:
        cols = [(p, pct) for p in ("paper", "converged") for pct in ("1", "5")]
        if not any(downstream in results[m] for m in methods):
            continue
        lines += [f"**{downstream}**", "", "| method | " + " | ".join(f"{p} {pct}%" for p, pct in cols) + " |",
                  "|---|" + "---|" * len(cols)]
        for m in methods:
            cells = results[m].get(downstream, {})
            lines.append(f"| {m} | " + " | ".join(fmt(cells.get(p, {}).get(pct)) for p, pct in cols) + " |")
        lines.append("")
    if report.get("verdict"):
        lines += ["MKDT (high-loss init) on the CIFAR-10 probe, difference in points (spread = sum of the two "
                  "seed stds):", "", "| versus | protocol | labels | difference | spread | beats by more than spread |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {v['versus']} | {v['protocol']} | {v['label_percent']}% | {v['difference']:+.2f} | "
                  f"{v['spread']:.2f} | {'yes' if v['beats'] else 'no'} |" for v in report["verdict"]]
        lines.append("")
    lines += ["Time and peak memory per stage:", "", "| stage | seconds | peak MB |", "|---|---|---|"]
    lines += [f"| {name} | {s['seconds']} | {s['peak_mb']} |" for name, s in report["stages"].items()]
    for note in report.get("notes", []):
        lines += ["", note]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.rewrite_docs:
        _report.replace_section(NAME, markdown(json.loads(_report.results_path(NAME).read_text("utf-8"))))
        return 0
    import os

    import torch

    from mkdt.pipeline import run_pipeline
    from mkdt.progress import setup_logging

    setup_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    command, date = _report.command_line(argv), _report.now()
    doc = run_document(args)
    t0 = time.perf_counter()
    state = run_pipeline(doc)
    out = Path(str(doc["out"]))
    report = {"command": command, "date": date, "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
              "teacher_imported": not args.train_teacher, "out": str(out), "eval_seeds": state.get("eval_seeds"),
              "processes": (doc.get("run") or {}).get("processes", 1),
              "last_invocation_minutes": round((time.perf_counter() - t0) / 60, 1),
              **collect(out, state, downstream_names(doc))}
    # stages finished by an earlier invocation keep their recorded cost
    report["total_minutes"] = round(sum(s["seconds"] or 0 for s in report["stages"].values()) / 60, 1)
    report["verdict"] = verdict(report["results"])
    previous = _report.results_path(NAME)
    if previous.is_file() and not args.quick:  # notes (what was tried) are kept across real runs
        report["notes"] = json.loads(previous.read_text("utf-8")).get("notes", [])
    print(markdown(report))
    if not (args.quick or args.no_write):
        _report.write_results_json(NAME, report)
        _report.replace_section(NAME, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

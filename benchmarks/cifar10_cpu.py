"""The paper's CIFAR-10 2% experiment at the scale of a 2-core CPU: does MKDT beat its baselines?

    python benchmarks/cifar10_cpu.py --data ../shared/data/cifar10-jpeg.tar.gz
    python benchmarks/cifar10_cpu.py --data ../shared/data/cifar10-jpeg.tar.gz --source fashion-mnist

Runs ``mkdt run --preset cifar10-cpu`` (teacher imported from the committed
``benchmarks/assets/cifar10-cpu-teacher.safetensors`` unless ``--train-teacher``) into ``--out``:
targets -> KD experts -> high-loss / random initial sets -> MKDT distillation (from both) -> SAS and
KRR-ST -> KD pre-training of a fresh ConvNet on each 1,000-image set (and on all 50,000 images) -> linear
probes on CIFAR-10 (1% and 5% labels, seeds 0-2, protocols ``paper`` and ``converged``) and transfer
probes on Fashion-MNIST and digits. Re-running resumes (finished stages are skipped). The variant
(``balanced_lowres``, docs/RESULTS.md "Beyond MKDT") runs beside them and is compared with MKDT.

``--source fashion-mnist``: the same experiment with Fashion-MNIST as the set to distil (``mkdt run --preset
fmnist-cpu``: its own teacher, imported from ``benchmarks/assets/fmnist-cpu-teacher.safetensors`` unless
``--train-teacher``), probed on Fashion-MNIST and CIFAR-10; writes ``fmnist_cpu.json`` and its section.

Writes ``benchmarks/results/cifar10_cpu.json`` (shape: ``{"command", "date", "variant", "stages": {name:
{"seconds", "peak_mb"}}, "results": {method: {downstream: {protocol: {label_percent: {"mean", "std",
"seeds"}}}}}}``, accuracies in percent) and the ``cifar10_cpu`` section of ``docs/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402

VARIANT = "balanced_lowres"
ASSETS = _report.ROOT / "benchmarks" / "assets"


@dataclass(frozen=True)
class Source:
    """One source set's benchmark: its results name, run preset, default methods, downstream names (in the
    preset's probe order) and committed teacher."""

    name: str
    title: str
    preset: str
    methods: tuple[str, ...]
    downstream: tuple[str, ...]
    teacher: Path


SOURCES = {
    "cifar10": Source("cifar10_cpu", "CIFAR-10 2% on CPU", "cifar10-cpu",
                      ("none", "random", "high_loss", "sas", "krr_st", "mkdt_random_init", "mkdt", VARIANT, "full"),
                      ("cifar10", "fashion_mnist", "digits"), ASSETS / "cifar10-cpu-teacher.safetensors"),
    "fashion-mnist": Source("fmnist_cpu", "Fashion-MNIST as the source, 2% on CPU", "fmnist-cpu",
                            ("none", "random", "high_loss", "krr_st", "mkdt", VARIANT, "full"),
                            ("fashion_mnist", "cifar10"), ASSETS / "fmnist-cpu-teacher.safetensors"),
}
ALL_METHODS = ("none", "random", "high_loss", "sas", "krr_st", "mkdt_random_init", "mkdt", VARIANT, "random_lowres",
               "full", "krr_st_own_recipe", "mtt_ssl")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="CIFAR-10 image folder or tar (e.g. ../shared/data/cifar10-jpeg.tar.gz)")
    p.add_argument("--fashion-mnist", default=None,
                   help="folder with the Fashion-MNIST IDX files (default: fashion-mnist beside --data)")
    p.add_argument("--source", choices=tuple(SOURCES), default="cifar10",
                   help="the set to distil (fashion-mnist: read from --fashion-mnist)")
    p.add_argument("--out", default=None, help="run directory (resumed if it exists; default runs/<preset>)")
    p.add_argument("--teacher", default=None, help="teacher file to import (default: the source's committed one)")
    p.add_argument("--train-teacher", action="store_true", help="train the source's teacher instead of importing")
    p.add_argument("--methods", nargs="+", default=None, choices=ALL_METHODS,
                   help="methods to run (default: the source's list)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the stages' own settings)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="run-document override, e.g. distill.iterations=250")
    p.add_argument("--quick", action="store_true",
                   help="plumbing check on 2,000 images with tiny settings; writes nothing under benchmarks/ or docs/")
    p.add_argument("--no-write", action="store_true", help="do not write the results JSON / RESULTS.md")
    p.add_argument("--rewrite-docs", action="store_true", help="only re-write the RESULTS.md section from the JSON")
    args = p.parse_args(argv)
    source = SOURCES[args.source]
    args.methods = args.methods or list(source.methods)
    args.out = args.out or f"runs/{source.preset}"
    args.teacher = args.teacher or str(source.teacher)
    return args


QUICK = [
    "experts.num_experts=1", "experts.keep_epochs=2", "init.epoch=1", "init.num_experts=1", "distill.iterations=3",
    "distill.max_start_epoch=1", "distill.expert_epochs=1", "distill.syn_steps=2", "distill.checkpoint_every=2",
    "distill.validation_experts=0",
    "krr_st.iterations=3", "krr_st.pool_size=2", "krr_st.max_online_steps=3", "pretrain.schedule.epochs=1",
    "pretrain/full.schedule.epochs=1", "probe.seeds=[0]", "probe.percents=[5]", "probe.converged_max_iterations=50",
]


def run_document(args: argparse.Namespace) -> dict:
    """The source's run preset with this machine's paths (absolute) and the benchmark's choices."""
    from mkdt.pipeline import load_run_document

    source = SOURCES[args.source]
    cifar = Path(args.data).expanduser().resolve()
    fashion = Path(args.fashion_mnist).expanduser().resolve() if args.fashion_mnist else cifar.parent / "fashion-mnist"
    roots = {"imagefolder": str(cifar), "idx": str(fashion)}
    overrides = [*(QUICK if args.quick else []), *args.overrides]
    doc = load_run_document(source.preset, [], overrides, {"out": args.out})
    doc["data"] = {**doc.get("data", {}), "root": roots[doc["data"]["name"]]}
    doc["run"] = {**doc.get("run", {}), "methods": list(args.methods)}
    probe = doc.setdefault("probe", {})
    probe["downstream"] = [{**d, "root": roots[d["name"]]} if d.get("name") in roots else d
                           for d in probe.get("downstream", [])]
    if args.quick:
        doc["data"]["indices"] = list(range(0, 50000, 25))
        probe["downstream"] = [{"name": "digits"}]
    teacher = doc.setdefault("teacher", {})
    if args.train_teacher:
        monitor = teacher.get("monitor") or {"name": doc["data"]["name"], "split": "test"}
        teacher["monitor"] = {**monitor, "root": roots[monitor["name"]]}
    else:
        path = Path(args.teacher).expanduser().resolve()
        if not path.is_file():
            raise SystemExit(f"{path}: teacher file not found; pass --teacher FILE or --train-teacher")
        teacher["import_path"] = str(path)
    return doc


def downstream_names(doc: dict, source: Source) -> dict[str, str]:
    """Probe result keys (labels derived from the data configs) -> the benchmark's downstream names."""
    from mkdt.config import resolve
    from mkdt.evaluate import ProbeConfig
    from mkdt.evaluate.probing import unique_labels

    cfg = resolve(ProbeConfig, preset=doc.get("preset"), section="probe", docs=[doc])
    return dict(zip(unique_labels(cfg.downstream), source.downstream))


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


def compare(results: dict[str, Any], downstream: str, method: str, other: str, margin: float = 0.0
            ) -> list[dict[str, Any]]:
    """``method`` vs ``other`` on one downstream set, per protocol and label fraction. "beats": the mean
    difference exceeds ``margin`` and the spread (std(method) + std(other), seed std ddof 1)."""
    rows = []
    mine = results.get(method, {}).get(downstream, {})
    base = results.get(other, {}).get(downstream, {})
    for protocol, by_pct in mine.items():
        for pct, cell in by_pct.items():
            ref = base.get(protocol, {}).get(pct)
            if ref is None or cell["mean"] is None or ref["mean"] is None:
                continue
            diff = cell["mean"] - ref["mean"]
            spread = (cell["std"] or 0.0) + (ref["std"] or 0.0)
            rows.append({"method": method, "versus": other, "downstream": downstream, "protocol": protocol,
                         "label_percent": pct, "difference": round(diff, 2), "spread": round(spread, 2),
                         "beats": diff > max(spread, margin)})
    return rows


def verdict(results: dict[str, Any], downstream: str) -> list[dict[str, Any]]:
    """MKDT vs the random subset and KRR-ST, and the variant vs MKDT (by >= 2 points and the spread)."""
    rows = [row for other in ("random", "krr_st") for row in compare(results, downstream, "mkdt", other)]
    return rows + compare(results, downstream, VARIANT, "mkdt", margin=2.0)


def gains_kept(results: dict[str, Any], downstreams: tuple[str, ...]) -> list[dict[str, Any]]:
    """The share of full-data pre-training's gain each set keeps: (m - base) / (full - base) for base = none
    (no pre-training) and base = random (the random subset), per downstream / protocol / labels."""
    rows = []
    full = results.get("full", {})
    for method in ("mkdt", VARIANT):
        for downstream in downstreams:
            for protocol, by_pct in results.get(method, {}).get(downstream, {}).items():
                for pct, cell in by_pct.items():
                    row = {"method": method, "downstream": downstream, "protocol": protocol, "label_percent": pct}
                    top = full.get(downstream, {}).get(protocol, {}).get(pct, {}).get("mean")
                    for base in ("none", "random"):
                        low = results.get(base, {}).get(downstream, {}).get(protocol, {}).get(pct, {}).get("mean")
                        ok = None not in (top, low, cell["mean"]) and abs(top - low) > 1e-9
                        row[f"of_full_over_{base}"] = round((cell["mean"] - low) / (top - low), 3) if ok else None
                        row[f"full_minus_{base}"] = round(top - low, 2) if None not in (top, low) else None
                    rows.append(row)
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
    source = SOURCES[report.get("source", "cifar10")]
    lines = [f"## {source.title} (`benchmarks/cifar10_cpu.py`)", "",
             f"Run {report['date']}: `{report['command']}` ({report.get('cpus')} CPUs, "
             f"{report.get('processes', 1)} torchrun process(es) for experts / distill / probe, torch threads "
             f"{report.get('threads')} in the pipeline's own process, whole run {report.get('total_minutes')} min as "
             f"the sum of its stages{', teacher imported' if report.get('teacher_imported') else ', teacher trained'}"
             f"; {_machine_text(report.get('machine'))}).", "", seeds_sentence(report), ""]
    results = report["results"]
    methods = [m for m in ALL_METHODS if m in results]
    for downstream in source.downstream:
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
        lines += [f"Differences in points on the {source.downstream[0]} probe (spread = sum of the two seed stds; the "
                  f"variant `{VARIANT}` must beat MKDT by at least 2 points and the spread):", "",
                  "| method | versus | protocol | labels | difference | spread | beats |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {v['method']} | {v['versus']} | {v['protocol']} | {v['label_percent']}% | {v['difference']:+.2f} | "
                  f"{v['spread']:.2f} | {'yes' if v['beats'] else 'no'} |" for v in report["verdict"]]
        lines.append("")
    if report.get("gains_kept"):
        lines += ["Share of full-data pre-training's gain a set keeps: (set - base) / (full - base), base = no "
                  "pre-training (`none`) or the random subset:", "",
                  "| set | downstream | protocol | labels | full - none | of it kept | full - random | of it kept |",
                  "|---|---|---|---|---|---|---|---|"]
        for g in report["gains_kept"]:
            lines.append(f"| {g['method']} | {g['downstream']} | {g['protocol']} | {g['label_percent']}% | "
                         f"{_num(g['full_minus_none'])} | {_pct(g['of_full_over_none'])} | "
                         f"{_num(g['full_minus_random'])} | {_pct(g['of_full_over_random'])} |")
        lines.append("")
    if report.get("variant_cost"):
        c = report["variant_cost"]
        lines += [f"Cost of making the sets: MKDT's distillation {c['mkdt_distill_seconds']} s; the variant's "
                  f"selection {c['variant_seconds']} s ({c['ratio']}x MKDT's distillation; both need the experts "
                  f"and the init step's losses).", ""]
    lines += ["Time and peak memory per stage:", "", "| stage | seconds | peak MB |", "|---|---|---|"]
    lines += [f"| {name} | {s['seconds']} | {s['peak_mb']} |" for name, s in report["stages"].items()]
    for note in report.get("notes", []):
        lines += ["", note]
    return "\n".join(lines) + "\n"


def _machine_text(machine: dict | None) -> str:
    if not machine:
        return "machine not recorded"
    return f"{machine['cpu']}, {' '.join(machine['flags']) or 'no AVX'}, load average at the end {machine['load_average']}"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def variant_cost(stages: dict[str, Any]) -> dict[str, Any] | None:
    distill = (stages.get("distill") or {}).get("seconds")
    mine = (stages.get(f"subset/{VARIANT}") or {}).get("seconds")
    if not distill or mine is None:
        return None
    return {"mkdt_distill_seconds": distill, "variant_seconds": mine, "ratio": round(mine / distill, 3)}


def main(argv: list[str] | None = None) -> int:
    from mkdt.cli import guarded

    return guarded(lambda: run(argv), lambda: "benchmarks/cifar10_cpu.py")


def run(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    source = SOURCES[args.source]
    if args.rewrite_docs:
        _report.replace_section(source.name,
                                markdown(json.loads(_report.results_path(source.name).read_text("utf-8"))))
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
    report = {"command": command, "date": date, "source": args.source, "variant": VARIANT,
              "cpus": os.cpu_count(), "machine": _report.machine(), "threads": torch.get_num_threads(),
              "teacher_imported": not args.train_teacher, "out": str(out),
              "eval_seeds": state.get("eval_seeds"), "processes": (doc.get("run") or {}).get("processes", 1),
              "last_invocation_minutes": round((time.perf_counter() - t0) / 60, 1),
              **collect(out, state, downstream_names(doc, source))}
    # stages finished by an earlier invocation keep their recorded cost
    report["total_minutes"] = round(sum(s["seconds"] or 0 for s in report["stages"].values()) / 60, 1)
    report["verdict"] = verdict(report["results"], source.downstream[0])
    report["gains_kept"] = gains_kept(report["results"], source.downstream)
    report["variant_cost"] = variant_cost(report["stages"])
    previous = _report.results_path(source.name)
    if previous.is_file() and not args.quick:  # notes (what was tried) are kept across real runs
        report["notes"] = json.loads(previous.read_text("utf-8")).get("notes", [])
    print(markdown(report))
    if not (args.quick or args.no_write):
        _report.write_results_json(source.name, report)
        _report.replace_section(source.name, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

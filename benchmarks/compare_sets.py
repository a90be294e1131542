"""Experiment tool: pre-train the cifar10-cpu student on each given set and linear-probe it on CIFAR-10
(both protocols, 1% / 5% labels), one encoder per seed as the benchmark's ``run.eval_seeds`` does.

The probe uses the VALIDATION protocol by default (labelled subsets and accuracy both from the train split:
a fixed held-out 10%, see ``mkdt.evaluate.probing``), the one to choose settings on; ``--evaluation test``
is for final configurations only.

For the questions the CIFAR-10 benchmark raises (does this distillation setting beat its initial set?)
without re-running the whole pipeline: give the sets written by ``mkdt init`` / ``mkdt distill`` /
``mkdt export``. Every encoder and probe goes through the stages' own code (``mkdt.evaluate.pretrain`` / ``probe`` at the cifar10-cpu presets), so the numbers are the
pipeline's numbers.

    python benchmarks/compare_sets.py --data ../shared/data/cifar10-jpeg.tar.gz --out runs/compare \\
        --subset random=runs/x/init/random.safetensors --distilled mkdt=runs/x/distill/synthetic.safetensors

Writes ``benchmarks/results/compare_sets[_validation].json`` and its section of ``docs/RESULTS.md`` unless
``--no-write``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import _report

from mkdt.config import resolve
from mkdt.progress import setup_logging
from mkdt.evaluate import (PretrainConfig, ProbeConfig, combine_probe_results, markdown_table, pretrain, probe,
                           results_table)

NAME = "compare_sets"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="CIFAR-10 image folder or tar (e.g. ../shared/data/cifar10-jpeg.tar.gz)")
    p.add_argument("--out", required=True, help="work folder for encoders and probe results (resumed if it exists)")
    p.add_argument("--subset", action="append", default=[], metavar="NAME=FILE",
                   help="a real subset (pre-trained with lr 0.1 and its teacher targets)")
    p.add_argument("--distilled", action="append", default=[], metavar="NAME=FILE",
                   help="a distilled set (pre-trained with its learned lr)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one encoder and probe seed each")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-write", action="store_true", help="only print the table")
    p.add_argument("--evaluation", choices=("validation", "test"), default="validation",
                   help="validation (held-out 10%% of the train split; for choosing) or test (final configurations)")
    p.add_argument("--pretrain-set", action="append", default=[], metavar="KEY=VALUE",
                   help="pre-training setting for every set, e.g. schedule.epochs=80")
    p.add_argument("--tag", default="", help="suffix of the results JSON and RESULTS.md section, so one "
                   "comparison does not replace another (e.g. --tag 80ep)")
    args = p.parse_args(argv)
    if not args.subset and not args.distilled:
        p.error("give at least one --subset or --distilled NAME=FILE")
    return args


def named_sets(args: argparse.Namespace) -> list[tuple[str, str, Path]]:
    """(name, pretrain kind, file) in the order given; names must be unique and files must exist."""
    sets = []
    for kind, items in (("subset", args.subset), ("distilled", args.distilled)):
        for item in items:
            name, sep, file = item.partition("=")
            if not sep or not name or not file:
                raise SystemExit(f"--{kind} {item!r}: expected NAME=FILE")
            path = Path(file).expanduser().resolve()
            if not path.is_file():
                raise SystemExit(f"{path}: set file not found (--{kind} {name}=...)")
            sets.append((name, kind, path))
    names = [n for n, _, _ in sets]
    if len(set(names)) != len(names):
        raise SystemExit(f"set names must be unique, got {names}")
    return sets


def evaluate_set(name: str, kind: str, path: Path, args: argparse.Namespace) -> dict:
    """One encoder per seed, each probed on that seed's labelled subsets; merged like the pipeline's."""
    out = Path(args.out).expanduser().resolve()
    parts = []
    for seed in args.seeds:
        run = f"{name}_seed{seed}"
        common = {"out": str(out), "seed": seed, "device": args.device, "name": run}
        encoder = pretrain(resolve(PretrainConfig, preset="cifar10-cpu", section="pretrain",
                                   values={**common, "kind": kind, "source": str(path)},
                                   overrides=args.pretrain_set)).outputs["encoder"]
        result = probe(resolve(ProbeConfig, preset="cifar10-cpu", section="probe",
                               values={**common, "encoder": str(encoder), "seeds": [seed], "percents": [1.0, 5.0],
                                       "evaluation": args.evaluation,
                                       "downstream": [{"name": "imagefolder",
                                                       "root": str(Path(args.data).resolve())}]}))
        parts.append(result.outputs["results"])
    merged = name if args.evaluation == "test" else f"{name}-validation"
    return combine_probe_results(parts, out / "probe" / merged / "results.json", merged)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    sets = named_sets(args)
    results = {name: evaluate_set(name, kind, path, args) for name, kind, path in sets}
    table = markdown_table(results_table(results), [name for name, _, _ in sets])
    print(f"{args.evaluation} protocol\n{table}")
    if args.no_write:
        return 0
    command, date = _report.command_line(argv), _report.now()
    name = NAME if args.evaluation == "test" else f"{NAME}_validation"
    name = f"{name}_{args.tag}" if args.tag else name
    payload = {"command": command, "date": date, "machine": _report.machine(), "evaluation": args.evaluation,
               "seeds": args.seeds,
               "pretrain_overrides": args.pretrain_set,
               "sets": {name: {"kind": kind, "file": str(path)} for name, kind, path in sets},
               "results": {name: res["summary"] for name, res in results.items()}}
    _report.write_results_json(name, payload)
    where = ("the CIFAR-10 test split" if args.evaluation == "test"
             else "a held-out 10% of the CIFAR-10 train split (validation protocol)")
    _report.replace_section(name, "\n".join([
        f"## Comparing sets on the CIFAR-10 probe, {args.evaluation} protocol"
        f"{' (' + args.tag + ')' if args.tag else ''} (`benchmarks/compare_sets.py`)", "",
        f"Accuracy on {where}.", "",
        "Linear-probe accuracy (%) of the cifar10-cpu student pre-trained on each set, mean ± std over "
        f"seeds {', '.join(map(str, args.seeds))} (each seed: its own encoder and its own labelled subset).", "",
        f"Command: `{command}`  ", f"Date: {date}", "",
        "Sets: " + "; ".join(f"`{name}` ({kind}) {path}" for name, kind, path in sets), "",
        table]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

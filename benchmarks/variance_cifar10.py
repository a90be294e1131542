"""Benchmark: trajectory variance of KD vs SSL training on CIFAR-10 (the paper's Figure 1a, CPU-sized).

Why: MKDT rests on the claim that knowledge-distillation trajectories (MSE to a teacher's
representations) are far more reproducible than SSL trajectories from the same initialisation, which
is what makes them matchable. This measures it with ``mkdt.baselines.analyze_variance`` on a random
subset of the CIFAR-10 training images, for four training recipes from one student initialisation:
KD with the paper's Figure-1 supervised recipe (SGD lr 0.01, no momentum), KD with MKDT's expert recipe
(SGD lr 0.1, momentum 0.9, wd 1e-4), KD with SSL's optimiser (Adam lr 1e-3: separates the objective's
effect from the optimiser's), and Barlow Twins (Adam lr 1e-3) with SimCLR-style augmentations.

    python benchmarks/variance_cifar10.py --data ../shared/data/cifar10-jpeg.tar.gz [--targets FILE | --teacher FILE]

Targets: ``--targets`` = a teacher-targets file for the whole training split; ``--teacher`` = a teacher
state file (mkdt metadata) to encode the subset with; neither = a fixed random-init ResNet-18 (width 16)
encoder (said so in the results). Writes ``benchmarks/results/variance_cifar10.json``, a plot beside it
and the ``variance_cifar10`` section of ``docs/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

from mkdt.artifacts import atomic_path, atomic_write_text, load_tensors, read_metadata, save_json
from mkdt.baselines import VarianceConfig, analyze_variance
from mkdt.baselines.variance import OptimConfig
from mkdt.data import DataConfig, load_dataset
from mkdt.data.imageset import ImageSet, normalize
from mkdt.errors import MkdtError
from mkdt.formats import load_targets, save_targets
from mkdt.models import ModelConfig, build_model
from mkdt.runtime import Meter, derive_seed, generator, seeded

ROOT = Path(__file__).resolve().parents[1]
RESULTS_JSON = ROOT / "benchmarks" / "results" / "variance_cifar10.json"
RESULTS_PNG = ROOT / "benchmarks" / "results" / "variance_cifar10.png"
RESULTS_MD = ROOT / "docs" / "RESULTS.md"
START, END = "<!-- variance_cifar10:start -->", "<!-- variance_cifar10:end -->"
STUDENT = ModelConfig(name="convnet", width=32, depth=3, norm="instancenorm", pool="avgpool")
RECIPES = {
    "kd_paper": ("kd", OptimConfig("sgd", lr=0.01, momentum=0.0, weight_decay=0.0, batch_size=256)),
    "kd_expert": ("kd", OptimConfig("sgd", lr=0.1, momentum=0.9, weight_decay=1e-4, batch_size=256)),
    "kd_adam": ("kd", OptimConfig("adam", lr=1e-3, momentum=0.0, weight_decay=1e-6, batch_size=256)),
    "ssl": ("ssl", OptimConfig("adam", lr=1e-3, momentum=0.0, weight_decay=1e-6, batch_size=256)),
}
LABELS = {"kd_paper": "KD, paper Fig. 1 recipe (SGD 0.01)", "kd_expert": "KD, MKDT expert recipe (SGD 0.1, m 0.9)",
          "kd_adam": "KD, SSL's optimiser (Adam 1e-3)", "ssl": "SSL, Barlow Twins (Adam 1e-3)"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="CIFAR-10 image folder or tar, e.g. ../shared/data/cifar10-jpeg.tar.gz")
    p.add_argument("--targets", help="teacher targets for the whole training split (from `mkdt targets`)")
    p.add_argument("--teacher", help="teacher state file (mkdt metadata) to encode the subset with")
    p.add_argument("--images", type=int, default=5000, help="random training images used (default 5000)")
    p.add_argument("--trajectories", type=int, default=4, help="trajectories per recipe (default 4)")
    p.add_argument("--lengths", default="10,20,40", help="trajectory lengths in iterations (default 10,20,40)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=str(ROOT / "runs" / "benchmarks" / "variance_cifar10"), help="run directory")
    p.add_argument("--no-write", action="store_true", help="do not write the results JSON / RESULTS.md")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# targets
# ----------------------------------------------------------------------------------------------
def subset_config(args: argparse.Namespace) -> DataConfig:
    """The training split restricted to ``--images`` seeded random images."""
    total = len(load_dataset(DataConfig(name="imagefolder", root=args.data, split="train")))
    if args.images > total:
        raise MkdtError(f"--images {args.images} is more than the {total} training images")
    gen = generator(derive_seed(args.seed, "variance_cifar10", "images"))
    idx = torch.sort(torch.randperm(total, generator=gen)[: args.images]).values.tolist()
    return DataConfig(name="imagefolder", root=args.data, split="train", indices=idx)


@torch.no_grad()
def encode(model: torch.nn.Module, data: ImageSet, mean, std, batch: int = 500) -> torch.Tensor:
    model.eval()
    return torch.cat([model(normalize(chunk, mean, std)) for chunk in data.images.split(batch)])


def make_targets(args: argparse.Namespace, out: Path) -> tuple[DataConfig, str, dict[str, Any], int | None]:
    """(data config, targets path, description of the teacher, max_images for the stage)."""
    if args.targets:
        full = DataConfig(name="imagefolder", root=args.data, split="train")
        meta = read_metadata(args.targets)
        return full, str(Path(args.targets).resolve()), {"source": "targets file", "path": args.targets,
                                                         "teacher": meta.get("teacher", meta.get("model"))}, args.images
    data_cfg = subset_config(args)
    data = load_dataset(data_cfg)
    path = out / "targets" / "targets.safetensors"
    if args.teacher:
        meta = read_metadata(args.teacher)
        if "model" not in meta:
            raise MkdtError(f"{args.teacher}: no model metadata; pass a teacher written by `mkdt teacher`")
        model = build_model(ModelConfig(**meta["model"]), in_channels=3, resolution=32)
        model.load_state_dict(load_tensors(args.teacher))
        mean, std = tuple(meta.get("mean", data.mean)), tuple(meta.get("std", data.std))
        info = {"source": "teacher file", "path": args.teacher, "model": meta["model"]}
    else:
        with seeded(derive_seed(args.seed, "variance_cifar10", "random-teacher")):
            model = build_model(ModelConfig(name="resnet18", width=16), in_channels=3, resolution=32)
        mean, std = data.mean, data.std
        info = {"source": "fixed random-init ResNet-18 width 16 (no trained teacher given)",
                "model": {"name": "resnet18", "width": 16}}
    if not path.is_file() or load_targets(path).fingerprint != data.fingerprint() or \
            read_metadata(path).get("teacher_info") != info:
        values = encode(model, data, mean, std)
        save_targets(path, values, data.fingerprint(), data_name=data.name, mean=list(data.mean),
                     std=list(data.std), teacher_info=info)
    values = load_targets(path).values
    info["target_dim"] = int(values.shape[1])
    info["target_std"] = round(float(values.std()), 4)
    return data_cfg, str(path), info, None


# ----------------------------------------------------------------------------------------------
# runs
# ----------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    lengths = [int(v) for v in args.lengths.split(",")]
    data_cfg, targets_path, teacher, max_images = make_targets(args, out)
    results: dict[str, Any] = {}
    for name, (objective, optim) in RECIPES.items():
        cfg = VarianceConfig(data=data_cfg, targets=targets_path, max_images=max_images, model=STUDENT,
                             objectives=[objective], num_trajectories=args.trajectories, lengths=lengths,
                             unit="iterations", seed=args.seed, device=args.device, out=str(out / name),
                             **{objective: optim})
        res = analyze_variance(cfg)  # a finished recipe is re-used, not re-run
        report = json.loads(res.outputs["report"].read_text())
        results[name] = {"objective": objective, "optimizer": dataclasses.asdict(optim),
                         "stage_seconds": res.measure.get("seconds"), "stage_peak_mb": res.measure.get("peak_mb"),
                         **report["objectives"][objective]}
        print(f"{name}: variance {results[name]['encoder']['variance']} normalized "
              f"{results[name]['encoder']['normalized']}", flush=True)
    return {"teacher": teacher, "images": args.images, "lengths": lengths, "unit": "iterations",
            "trajectories": args.trajectories, "student": dataclasses.asdict(STUDENT), "recipes": results,
            "augment": "mkdt.ssl AugmentConfig defaults (crop 0.2-1, flip, jitter 0.8, grayscale 0.2)",
            "barlow_twins_lambda": 1 / 128, "seed": args.seed}


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, res in results["recipes"].items():
        axes[0].plot(results["lengths"], res["encoder"]["variance"], marker="o", label=LABELS[name])
        axes[1].plot(results["lengths"], res["encoder"]["normalized"], marker="o", label=LABELS[name])
    axes[0].set_yscale("log")
    axes[0].set_ylabel("mean per-parameter variance")
    axes[1].set_ylabel("variance / squared displacement")
    for ax in axes:
        ax.set_xlabel("trajectory length (iterations)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"CIFAR-10 ({results['images']} images), ConvNet-D3 w32, {results['trajectories']} runs per "
                 f"recipe from one init", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def markdown(record: dict[str, Any]) -> str:
    r = record["results"]
    lines = [START, "## Trajectory variance, KD vs SSL (`benchmarks/variance_cifar10.py`)", "",
             f"`{record['command']}` — {record['date']}; {r['machine']['cpus']} CPUs, 1-min load average "
             f"{r['machine']['load_average_1min']}, torch threads {r['machine']['torch_threads']}; "
             f"{r['compute_seconds'] / 60:.1f} min of training in total, peak RSS "
             f"{max(x['stage_peak_mb'] for x in r['recipes'].values()):.0f} MB.", "",
             f"**Teacher targets: {r['teacher']['source']}** ({r['teacher']['target_dim']}-d, std "
             f"{r['teacher']['target_std']}). {r['images']} random CIFAR-10 training images; student ConvNet-D3 "
             f"width 32 (instance norm); {r['trajectories']} trajectories per recipe from ONE initialisation, "
             f"differing only in batch order (and augmentations for SSL); batch 256 for all recipes. Variance = "
             f"mean over the encoder's parameters of the across-run variance; normalised = total variance / "
             f"mean squared distance travelled from the init (unit-free).", "",
             "| recipe | " + " | ".join(f"var @ {n} it" for n in r["lengths"]) + " | "
             + " | ".join(f"normalised @ {n} it" for n in r["lengths"]) + " | s / trajectory |",
             "|---|" + "---:|" * (2 * len(r["lengths"]) + 1)]
    for name, res in r["recipes"].items():
        lines.append(f"| {LABELS[name]} | " + " | ".join(f"{v:.2e}" for v in res["encoder"]["variance"]) + " | "
                     + " | ".join(f"{v:.3g}" for v in res["encoder"]["normalized"]) + " | "
                     + f"{res['seconds_per_trajectory']:.0f} |")
    lines += ["", r["finding"], "", f"Plot: `benchmarks/results/{RESULTS_PNG.name}`.", END]
    return "\n".join(lines)


def finding(results: dict[str, Any]) -> str:
    """What was measured, whichever way it fell: normalised and absolute spread, SSL against each KD recipe."""
    recipes = results["recipes"]
    ssl = recipes["ssl"]["encoder"]
    kd_names = [n for n in recipes if n != "ssl"]
    higher_norm = all(s > max(recipes[n]["encoder"]["normalized"][i] for n in kd_names)
                      for i, s in enumerate(ssl["normalized"]))
    text = ("Finding: relative to the distance travelled, SSL trajectories spread more than every KD recipe at "
            "every length" if higher_norm else
            "Finding: relative to the distance travelled, SSL trajectories do NOT spread more than every KD "
            "recipe at every length")
    parts = []
    for name in kd_names:
        kd = recipes[name]["encoder"]
        norm = ", ".join(_ratio(s, k) for s, k in zip(ssl["normalized"], kd["normalized"]))
        absolute = ", ".join(_ratio(s, k) for s, k in zip(ssl["variance"], kd["variance"]))
        parts.append(f"SSL / {LABELS[name]}: normalised {norm}; absolute {absolute}")
    return (text + ". Ratios SSL / KD by length (absolute ratios below 1: that KD recipe spreads more in "
            "absolute terms, because it moves further). " + "; ".join(parts) + ".")


def _ratio(a: float, b: float) -> str:
    if b <= 0:
        return "inf"
    r = a / b
    return f"{r:,.0f}x" if r >= 100 else f"{r:.3g}x"


def write_section(text: str) -> None:
    """Replace only this benchmark's section of docs/RESULTS.md (re-read right before writing)."""
    current = RESULTS_MD.read_text("utf-8") if RESULTS_MD.is_file() else "# Results\n"
    if START in current and END in current:
        head, rest = current.split(START, 1)
        new = head + text + rest.split(END, 1)[1]
    else:
        new = current.rstrip("\n") + "\n\n" + text + "\n"
    atomic_write_text(RESULTS_MD, new)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not Path(args.data).exists():
        print(f"{args.data}: not found; pass the CIFAR-10 image folder or tar with --data", file=sys.stderr)
        return 2
    if args.targets and args.teacher:
        print("pass --targets or --teacher, not both", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    argv_text = " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    try:
        with Meter() as meter:
            results = run(args)
    except MkdtError as exc:
        print(f"variance_cifar10: error: {exc}", file=sys.stderr)
        return 1
    results["invocation"] = meter.as_dict()
    results["compute_seconds"] = round(sum(r["stage_seconds"] for r in results["recipes"].values()), 1)
    results["finding"] = finding(results)
    results["machine"] = {"cpus": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2),
                          "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                          "python": platform.python_version()}
    record = {"command": f"python benchmarks/variance_cifar10.py {argv_text}",
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "results": results}
    print(results["finding"])
    if not args.no_write:
        save_json(RESULTS_JSON, record)
        plot(results, RESULTS_PNG)
        write_section(markdown(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

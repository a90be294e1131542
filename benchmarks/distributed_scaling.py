"""Experts per hour and distillation iterations per minute with 1 and 2 processes (torchrun, gloo, CPU).

    python benchmarks/distributed_scaling.py --data ../shared/data/cifar10-jpeg.tar.gz
    python benchmarks/distributed_scaling.py --data ../shared/data/cifar10-jpeg.tar.gz --quick   # smoke run

CIFAR-10-sized work on a subset of the training images (``data.indices``): targets are a fixed random
projection of the pixels to 128 dimensions (no teacher needed), the students are the ``cifar10-cpu``
presets' (ConvNet depth 3, width 32, instance norm). Each measurement runs the real stage through
``torchrun --standalone --nproc_per_node=P -m mkdt ...`` with ``OMP_NUM_THREADS=1`` per worker:

* experts: ``--experts`` experts on ``--images`` images (``keep_epochs`` 4), rate = experts / stage wall time;
* distill: ``--iterations`` iterations on a random ``--syn-images`` initial set drawn from the subset, matching
  the experts of the 1-process run; rate from the per-iteration times of the log (first iteration excluded).
  With P processes every iteration matches P trajectories, so trajectories per minute are also given.

Whole run about 4-6 minutes on an idle 2-core machine. Writes ``benchmarks/results/distributed_scaling.json``
and its section of ``docs/RESULTS.md`` (``--no-write``: print only).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402

NAME = "distributed_scaling"
TARGET_DIM = 128
PROCESSES = (1, 2)
FULL = {"images": 2500, "experts": 4, "iterations": 8, "syn_images": 1000, "syn_steps": None, "batch_syn": None}
QUICK = {"images": 300, "experts": 2, "iterations": 3, "syn_images": 100, "syn_steps": 2, "batch_syn": 50}


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------
def data_section(data: Path, images: int) -> dict:
    return {"name": "imagefolder", "root": str(data), "split": "train", "indices": list(range(images))}


def write_targets(out: Path, data_cfg: dict) -> dict:
    """Targets = tanh of a fixed random projection of the normalised pixels: learnable, no teacher needed."""
    import torch

    from mkdt.data import DataConfig, load_dataset
    from mkdt.formats import save_targets
    from mkdt.runtime import generator

    data = load_dataset(DataConfig(**data_cfg))
    x = data.normalize().flatten(1)
    w = torch.randn(x.shape[1], TARGET_DIM, generator=generator(0)) / x.shape[1] ** 0.5
    save_targets(out / "targets" / "targets.safetensors", torch.tanh(2 * x @ w), data.fingerprint(),
                 data_name=data.name, mean=list(data.mean), std=list(data.std))
    return {"images": len(data), "shape": list(data.images.shape[1:]), "fingerprint": data.fingerprint()}


def write_init(path: Path, out: Path, data_cfg: dict, size: int) -> None:
    """A random initial set of ``size`` images of the subset with their targets (what ``mkdt init random`` draws)."""
    import torch

    from mkdt.data import DataConfig, load_dataset
    from mkdt.formats import SyntheticSet, load_targets, save_synthetic
    from mkdt.runtime import generator

    data = load_dataset(DataConfig(**data_cfg))
    targets = load_targets(out / "targets" / "targets.safetensors", fingerprint=data.fingerprint()).values
    idx = torch.randperm(len(data), generator=generator(1))[:size]
    save_synthetic(path, SyntheticSet(data.normalize()[idx], targets[idx], data.mean, data.std, indices=idx,
                                      meta={"fingerprint": data.fingerprint(), "data_name": data.name}))


# ----------------------------------------------------------------------------------------------
# one measured stage under torchrun
# ----------------------------------------------------------------------------------------------
def torchrun(processes: int, stage: str, config: Path, out: Path) -> float:
    """Run ``mkdt <stage> --preset cifar10-cpu --config <config>`` with ``processes`` workers; wall seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           "-m", "mkdt", stage, "--preset", "cifar10-cpu", "--config", str(config), "--out", str(out),
           "--device", "cpu"]
    print(f"  {stage} with {processes} process(es) ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=_report.ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{stage} with {processes} processes failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return wall


def write_config(path: Path, section: str, values: dict) -> Path:
    path.write_text(json.dumps({section: values}, indent=1))  # YAML is a superset of JSON
    return path


def measure_experts(root: Path, processes: int, sizes: dict, data_cfg: dict) -> dict:
    out = root / f"experts-p{processes}"
    shutil.copytree(root / "source" / "targets", out / "targets")
    config = write_config(root / f"experts-p{processes}.yaml", "experts",
                          {"data": data_cfg, "num_experts": sizes["experts"]})
    wall = torchrun(processes, "experts", config, out)
    record = json.loads((out / "experts" / "stage.json").read_text("utf-8"))
    summary = record["summary"]
    stage_seconds = record["measure"]["seconds"]
    return {"stage": "experts", "processes": processes, "world_size": record["world_size"],
            "experts": sizes["experts"], "images": sizes["images"], "epochs_trained": summary["trained_epochs"],
            "stage_seconds": round(stage_seconds, 2), "process_wall_seconds": round(wall, 2),
            "experts_per_hour": round(3600 * sizes["experts"] / stage_seconds, 1),
            "experts_per_hour_per_process": summary["experts_per_hour"],
            "final_loss_mean": summary["final_loss_mean"]}


def measure_distill(root: Path, processes: int, sizes: dict, init: Path, experts: Path) -> dict:
    out = root / f"distill-p{processes}"
    values = {"init": str(init), "experts_dir": str(experts), "iterations": sizes["iterations"],
              "checkpoint_every": sizes["iterations"], "grid_images": 16,
              "trajectories": processes,  # each process matches one trajectory per update
              "validation_experts": 0}  # throughput only: no held-out experts (the quick run trains 2)
    values.update({k: sizes[k] for k in ("syn_steps", "batch_syn") if sizes[k] is not None})
    config = write_config(root / f"distill-p{processes}.yaml", "distill", values)
    wall = torchrun(processes, "distill", config, out)
    record = json.loads((out / "distill" / "stage.json").read_text("utf-8"))
    summary = record["summary"]
    rows = [json.loads(line) for line in (out / "distill" / "log.jsonl").read_text("utf-8").splitlines()]
    timed = [r["seconds"] for r in rows[1:]] or [r["seconds"] for r in rows]
    per_iteration = statistics.mean(timed)
    return {"stage": "distill", "processes": processes, "world_size": record["world_size"],
            "iterations": len(rows), "trajectories_per_iteration": summary["trajectories_per_update"],
            "syn_images": sizes["syn_images"], "seconds_per_iteration": round(per_iteration, 3),
            "iteration_seconds": timed, "stage_seconds": record["measure"]["seconds"],
            "process_wall_seconds": round(wall, 2),
            "iterations_per_minute": round(60 / per_iteration, 2),
            "trajectories_per_minute": round(60 * summary["trajectories_per_update"] / per_iteration, 2),
            "loss_last10": summary["loss_last10"]}


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
def machine() -> dict:
    import torch

    cpu = "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "platform": platform.platform()}


def speedups(results: list[dict]) -> None:
    """Add each row's rate relative to the 1-process row of the same stage."""
    key = {"experts": "experts_per_hour", "distill": "trajectories_per_minute"}
    base = {r["stage"]: r[key[r["stage"]]] for r in results if r["processes"] == 1}
    for r in results:
        if r["stage"] in base:
            r["speedup"] = round(r[key[r["stage"]]] / base[r["stage"]], 2)


def markdown(report: dict) -> str:
    s, m = report["sizes"], report["machine"]
    lines = [
        "## Distributed scaling (`benchmarks/distributed_scaling.py`)",
        "",
        f"Command: `{report['command']}` — {report['date']}, {m['cpu']}, {m['cores']} cores, torch {m['torch']}, "
        f"load average {report['loadavg_before']} before / {report['loadavg_after']} after. "
        f"`torchrun --standalone --nproc_per_node=P`, gloo, `OMP_NUM_THREADS=1` per worker. CIFAR-10 training "
        f"subset of {s['images']} images (3x32x32), 128-d random-projection targets, `cifar10-cpu` presets "
        f"(ConvNet depth 3, width 32). Experts: {s['experts']} experts x {report['results'][0]['epochs_trained']} "
        f"epochs, rate = experts / stage wall time. Distill: {s['syn_images']} synthetic images, "
        f"{s['iterations']} iterations, rate from per-iteration times (first excluded); with P processes an "
        f"iteration matches P trajectories (one per rank, gradients averaged in one all-reduce).",
        "",
        "| stage | processes | work | stage wall s | rate | trajectories / min | speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        if r["stage"] == "experts":
            lines.append(f"| experts | {r['processes']} | {r['experts']} experts | {r['stage_seconds']} | "
                         f"{r['experts_per_hour']} experts / h | | {r.get('speedup', '')}x |")
        else:
            lines.append(f"| distill | {r['processes']} | {r['iterations']} iterations | {r['stage_seconds']} | "
                         f"{r['iterations_per_minute']} iterations / min | {r['trajectories_per_minute']} | "
                         f"{r.get('speedup', '')}x |")
    lines += ["", "Speed-up: experts per hour, or matched trajectories per minute, relative to 1 process."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path,
                        help="CIFAR-10 image folder or archive, e.g. ../shared/data/cifar10-jpeg.tar.gz (required "
                             "unless --render)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny smoke run (1-3 minutes, mostly process start-up; nothing written)")
    parser.add_argument("--images", type=int, help=f"training images used (default {FULL['images']})")
    parser.add_argument("--experts", type=int, help=f"experts per measurement (default {FULL['experts']})")
    parser.add_argument("--iterations", type=int, help=f"distillation iterations (default {FULL['iterations']})")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write results files")
    parser.add_argument("--render", action="store_true",
                        help="only re-write the docs/RESULTS.md section from the saved JSON (no measuring)")
    args = parser.parse_args(argv)
    if args.render:
        _report.replace_section(NAME, markdown(json.loads(_report.results_path(NAME).read_text("utf-8"))))
        return 0
    if args.data is None or not args.data.exists():
        parser.error(f"--data must be an existing CIFAR-10 folder or archive, got {args.data}")
    sizes = dict(QUICK if args.quick else FULL)
    for key in ("images", "experts", "iterations"):
        if getattr(args, key) is not None:
            sizes[key] = getattr(args, key)
    if sizes["syn_images"] > sizes["images"]:
        parser.error(f"--images must be at least {sizes['syn_images']} (the synthetic set is drawn from them)")
    command, date = _report.command_line(argv), _report.now()
    load_before = round(os.getloadavg()[0], 2)
    results = []
    with tempfile.TemporaryDirectory(prefix="mkdt-scaling-") as tmp:
        root = Path(tmp)
        data_cfg = data_section(args.data.resolve(), sizes["images"])
        print("preparing targets (decodes the archive into the data cache the first time) ...", file=sys.stderr)
        source = write_targets(root / "source", data_cfg)
        for p in PROCESSES:
            results.append(measure_experts(root, p, sizes, data_cfg))
        init = root / "init.safetensors"
        write_init(init, root / "source", data_cfg, sizes["syn_images"])
        for p in PROCESSES:
            results.append(measure_distill(root, p, sizes, init, root / "experts-p1" / "experts"))
    speedups(results)
    report = {"command": command, "date": date, "machine": machine(), "sizes": sizes, "data": str(args.data),
              "source": source, "processes": list(PROCESSES), "loadavg_before": load_before,
              "loadavg_after": round(os.getloadavg()[0], 2), "results": results}
    print(json.dumps(report, indent=1), file=sys.stderr)
    print(markdown(report))
    if not (args.no_write or args.quick):
        _report.write_results_json(NAME, report)
        _report.replace_section(NAME, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

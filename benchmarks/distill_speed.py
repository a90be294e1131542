"""Speed and memory of ``mkdt distill`` at the paper's shapes, the authors' reference shapes and cifar10-cpu.

Every configuration runs the real stage function (``mkdt.distill.distill``) in its own process (a
clean peak RSS) on synthetic random experts and a random initial set of the right shapes (1000
images 3x32x32, 512-d targets), and reports seconds per iteration, peak resident memory, the FLOPs of
one iteration (torch's ``flop_counter`` formulas for convs and matmuls, at syn_steps 1 and 2,
extrapolated linearly, since every inner step costs the same) and the achieved GFLOP/s beside a
2048x2048 fp32 matmul peak measured in the same process just before. The load average is recorded:
the machine's 2 cores are shared, so compare ratios measured in one run.

    python benchmarks/distill_speed.py                 # all configurations
    python benchmarks/distill_speed.py --only w32-plain-syn10-b128 --iterations 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS_JSON = ROOT / "benchmarks" / "results" / "distill_speed.json"
RESULTS_MD = ROOT / "docs" / "RESULTS.md"
START, END = "<!-- distill_speed:start -->", "<!-- distill_speed:end -->"

# name, shape and, where they exist, the authors' loop timed on this project's 2-core machine (given to the
# project with the method's reference numbers; see the distill_speed section of docs/RESULTS.md).
CONFIGS = [
    {"name": "paper-cifar-memory-saving", "width": 128, "syn_steps": 40, "batch_syn": 256, "memory_saving": True,
     "iterations": 1},
    {"name": "paper-cifar-plain-syn10", "width": 128, "syn_steps": 10, "batch_syn": 256, "memory_saving": False,
     "iterations": 2, "authors": {"seconds_per_iteration": 41.0, "peak_gb": 9.8}},
    {"name": "paper-cifar-memory-saving-syn10", "width": 128, "syn_steps": 10, "batch_syn": 256,
     "memory_saving": True, "iterations": 2},
    {"name": "w32-plain-syn10-b128", "width": 32, "syn_steps": 10, "batch_syn": 128, "memory_saving": False,
     "iterations": 4, "authors": {"seconds_per_iteration": 1.26, "peak_gb": 3.25}},
    {"name": "w32-memory-saving-syn10-b128", "width": 32, "syn_steps": 10, "batch_syn": 128, "memory_saving": True,
     "iterations": 4},
    {"name": "cifar10-cpu", "preset": "cifar10-cpu", "iterations": 4},
]


# ----------------------------------------------------------------------------------------------
# child: one configuration
# ----------------------------------------------------------------------------------------------
def matmul_rates(size: int = 2048, trials: int = 5) -> tuple[float, float]:
    """fp32 matmul (size x size) GFLOP/s: the best wall-clock rate over ``trials`` and the best rate
    per CPU-second (what the process gets when it runs, i.e. less sensitive to time-slicing)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    flops = 2 * size**3 * 2
    best_wall = best_cpu = 0.0
    for _ in range(trials):
        t0, c0 = time.perf_counter(), time.process_time()
        a @ b
        a @ b
        best_wall = max(best_wall, flops / (time.perf_counter() - t0) / 1e9)
        best_cpu = max(best_cpu, flops / max(time.process_time() - c0, 1e-9) / 1e9)
    return best_wall, best_cpu


def make_inputs(root: Path, cfg, n_images: int = 1000, target_dim: int = 512, n_experts: int = 2) -> None:
    """Random experts (displaced random walks from a real init) and a random initial set of the right shape."""
    import torch

    from mkdt.formats import SyntheticSet, save_synthetic, save_trajectory
    from mkdt.models import build_model
    from mkdt.models.functional import ParamLayout, flat_parameters
    from mkdt.runtime import generator, seeded

    epochs = cfg.max_start_epoch + cfg.expert_epochs
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    for e in range(n_experts):
        with seeded(e):
            net = build_model(cfg.model, in_channels=3, resolution=32, head_dim=target_dim)
        g = generator(100 + e)
        params = [flat_parameters(net)]
        for _ in range(epochs - 1):
            params.append(params[-1] + 0.01 * torch.randn(params[-1].shape, generator=g))
        save_trajectory(root / "experts" / f"expert_{e:04d}.safetensors", torch.stack(params), list(range(epochs)),
                        ParamLayout.of(net), model=cfg.model.to_dict(), in_channels=3, resolution=32,
                        head_dim=target_dim, mean=list(mean), std=list(std))
    g = generator(7)
    save_synthetic(root / "init" / "high_loss.safetensors",
                   SyntheticSet(torch.randn(n_images, 3, 32, 32, generator=g),
                                torch.randn(n_images, target_dim, generator=g), mean, std))


def flop_counting_mode():
    """A dispatch mode summing torch's own FLOP formulas (``flop_counter.flop_registry``, the ones
    FlopCounterMode uses) over every op; FlopCounterMode itself also tracks modules with backward hooks,
    which ``autograd.grad`` on recomputed steps (the memory-saving path) does not support."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class FlopCount(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                self.total += formula(*args, **kwargs, out_val=out)
            return out

    return FlopCount()


def count_iteration_flops(cfg, memory_saving: bool) -> float:
    """FLOPs of one outer iteration: measured at syn_steps 1 and 2, extrapolated to cfg.syn_steps."""
    import torch

    from mkdt.distill import matching, memory
    from mkdt.models import build_model
    from mkdt.models.functional import ParamLayout, flat_parameters
    from mkdt.runtime import generator

    net = build_model(cfg.model, in_channels=3, resolution=32, head_dim=512)
    layout = ParamLayout.of(net)
    theta0 = flat_parameters(net)
    g = generator(1)
    images = torch.randn(1000, 3, 32, 32, generator=g).requires_grad_(True)
    targets = torch.randn(1000, 512, generator=g).requires_grad_(True)
    lr = torch.tensor(0.1).requires_grad_(True)
    counts = []
    for steps in (1, 2):
        plan = matching.plan_steps(1000, cfg.batch_syn, steps, generator(2))
        problem = matching.Problem(net, layout, theta0, theta0 + 0.01, images, targets, lr, plan)
        with flop_counting_mode() as counter:
            (memory.match_memory_saving if memory_saving else matching.match_plain)(problem)
        counts.append(counter.total)
    return counts[0] + (cfg.syn_steps - 1) * (counts[1] - counts[0])


def plain_estimate_gb(cfg) -> float:
    """The stage's own estimate of the plain path's memory (one measured step x syn_steps)."""
    import torch

    from mkdt.distill import matching, memory
    from mkdt.models import build_model
    from mkdt.models.functional import ParamLayout, flat_parameters
    from mkdt.runtime import generator

    net = build_model(cfg.model, in_channels=3, resolution=32, head_dim=512)
    layout = ParamLayout.of(net)
    theta0 = flat_parameters(net)
    images = torch.randn(1000, 3, 32, 32).requires_grad_(True)
    targets = torch.randn(1000, 512).requires_grad_(True)
    plan = matching.plan_steps(1000, cfg.batch_syn, 1, generator(2))
    problem = matching.Problem(net, layout, theta0, theta0 + 0.01, images, targets,
                               torch.tensor(0.1).requires_grad_(True), plan)
    return memory.estimate_plain_bytes(problem, cfg.syn_steps) / 2**30


def run_child(spec: dict) -> dict:
    import torch

    from mkdt.config import resolve
    from mkdt.distill import DistillConfig, distill
    from mkdt.distill.config import memory_saving_mode

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))  # also for the matmul peak and the FLOP count
    load_before = os.getloadavg()[0]
    peak_wall, peak_cpu = matmul_rates()
    with tempfile.TemporaryDirectory(prefix="mkdt-bench-") as tmp:
        root = Path(tmp)
        values = {"out": str(root), "device": "cpu", "iterations": spec["iterations"],
                  "checkpoint_every": spec["iterations"], "grid_images": 16, "threads": spec.get("threads") or 0}
        if "preset" in spec:
            cfg = resolve(DistillConfig, preset=spec["preset"], section="distill", values=values)
        else:
            cfg = resolve(DistillConfig, section="distill", values={
                **values, "model": {"name": "convnet", "depth": 3, "width": spec["width"]},
                "syn_steps": spec["syn_steps"], "batch_syn": spec["batch_syn"],
                "memory_saving": spec["memory_saving"]})
        make_inputs(root, cfg, n_experts=cfg.validation_experts + 2)
        rss_setup_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t0 = time.perf_counter()
        result = distill(cfg)
        wall = time.perf_counter() - t0
        rows = [json.loads(line) for line in (root / "distill" / "log.jsonl").read_text().splitlines()]
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    load_after = os.getloadavg()[0]
    after_wall, after_cpu = matmul_rates()
    peak_wall, peak_cpu = max(peak_wall, after_wall), max(peak_cpu, after_cpu)
    seconds = [r["seconds"] for r in rows]
    timed = seconds[1:] if len(seconds) > 1 else seconds
    per_it = sum(timed) / len(timed)
    cpu = [r["cpu_seconds"] for r in rows]
    cpu_timed = cpu[1:] if len(cpu) > 1 else cpu
    used_memory_saving = result.summary["memory_saving"]
    flops = count_iteration_flops(cfg, used_memory_saving)
    cpu_per_it = sum(cpu_timed) / len(cpu_timed)
    out = {
        "name": spec["name"],
        "width": cfg.model.width, "depth": cfg.model.depth, "syn_steps": cfg.syn_steps, "batch_syn": cfg.batch_syn,
        "memory_saving": used_memory_saving, "memory_saving_setting": memory_saving_mode(cfg.memory_saving),
        "threads": torch.get_num_threads(),
        "iterations_timed": len(timed), "seconds_per_iteration": round(per_it, 3),
        "cpu_seconds_per_iteration": round(cpu_per_it, 3),
        "iteration_seconds": seconds, "stage_wall_seconds": round(wall, 1),
        "peak_rss_gb": round(peak_rss_mb / 1024, 3), "rss_before_distill_gb": round(rss_setup_mb / 1024, 3),
        "gflop_per_iteration": round(flops / 1e9, 1), "achieved_gflops": round(flops / per_it / 1e9, 1),
        "matmul_peak_gflops": round(peak_wall, 1),
        "fraction_of_matmul_peak": round(flops / per_it / 1e9 / peak_wall, 3),
        "achieved_gflop_per_cpu_s": round(flops / cpu_per_it / 1e9, 1),
        "matmul_gflop_per_cpu_s": round(peak_cpu, 1),
        "fraction_of_matmul_per_cpu_s": round(flops / cpu_per_it / 1e9 / peak_cpu, 3),
        "loadavg_before": round(load_before, 2), "loadavg_after": round(load_after, 2),
    }
    if not used_memory_saving:
        out["plain_estimate_gb"] = round(plain_estimate_gb(cfg), 3)
    if "preset" in spec:
        out["preset"] = spec["preset"]
        out["preset_iterations"] = resolve(DistillConfig, preset=spec["preset"], section="distill").iterations
        out["projected_preset_minutes"] = round(out["preset_iterations"] * per_it / 60, 1)
    if "authors" in spec:
        out["authors"] = spec["authors"]
        out["time_ratio_vs_authors"] = round(per_it / spec["authors"]["seconds_per_iteration"], 3)
    return out


# ----------------------------------------------------------------------------------------------
# parent: run every configuration in its own process, write JSON and the RESULTS.md section
# ----------------------------------------------------------------------------------------------
def run_isolated(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"name": spec["name"], "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(lines[-1])


def machine() -> dict:
    import torch

    cpu = "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": round(os.sysconf("SC_PAGE_SIZE") *
                                                                 os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "platform": platform.platform()}


def markdown(report: dict) -> str:
    lines = [
        START,
        "## Distillation speed (`benchmarks/distill_speed.py`)",
        "",
        f"Command: `{report['command']}` — {report['date']}, {report['machine']['cpu']}, "
        f"{report['machine']['cores']} cores (shared with other jobs; load average recorded per row), "
        f"torch {report['machine']['torch']}. Random experts and a random 1000-image initial set of the "
        "real shapes (3x32x32, 512-d targets); ConvNet depth 3, instancenorm; per-iteration time excludes "
        "the first iteration when more than one ran. CPU s = process CPU time per iteration (less disturbed by "
        "other jobs than wall time). FLOPs: torch's FlopCounterMode formulas (convs, matmuls). Matmul: "
        "2048x2048 fp32, best of 5 trials before and after the run in the same process; % of matmul compares "
        "FLOPs per CPU-second of the distillation with those of the matmul.",
        "",
        "| configuration | width | syn_steps | batch | path | threads | s / iteration | CPU s / iteration | "
        "peak RSS GB | GFLOP / it | GFLOP/s (wall) | matmul GFLOP/s (wall) | GFLOP per CPU s | "
        "matmul GFLOP per CPU s | % of matmul (per CPU s) | load | authors (s, GB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['name']} | error: {r['error']} |||||||||||||||")
            continue
        authors = r.get("authors")
        ref = f"{authors['seconds_per_iteration']}, {authors['peak_gb']}" if authors else ""
        path = "memory-saving" if r["memory_saving"] else "plain"
        lines.append(
            f"| {r['name']} | {r['width']} | {r['syn_steps']} | {r['batch_syn']} | {path} | {r['threads']} | "
            f"{r['seconds_per_iteration']} | {r['cpu_seconds_per_iteration']} | {r['peak_rss_gb']} | "
            f"{r['gflop_per_iteration']} | {r['achieved_gflops']} | {r['matmul_peak_gflops']} | "
            f"{r['achieved_gflop_per_cpu_s']} | {r['matmul_gflop_per_cpu_s']} | "
            f"{100 * r['fraction_of_matmul_per_cpu_s']:.0f} | "
            f"{r['loadavg_before']}-{r['loadavg_after']} | {ref} |")
    by_name = {r["name"]: r for r in report["results"] if "error" not in r}
    for plain, saving in (("paper-cifar-plain-syn10", "paper-cifar-memory-saving-syn10"),
                          ("w32-plain-syn10-b128", "w32-memory-saving-syn10-b128")):
        if plain in by_name and saving in by_name:
            a, b = by_name[plain], by_name[saving]
            lines.append("")
            lines.append(f"Memory-saving / plain at width {a['width']}, syn_steps {a['syn_steps']}, "
                         f"batch {a['batch_syn']}: "
                         f"{b['seconds_per_iteration'] / a['seconds_per_iteration']:.2f}x wall time, "
                         f"{b['cpu_seconds_per_iteration'] / a['cpu_seconds_per_iteration']:.2f}x CPU time, "
                         f"{b['gflop_per_iteration'] / a['gflop_per_iteration']:.2f}x FLOPs, "
                         f"{b['peak_rss_gb'] / a['peak_rss_gb']:.2f}x peak memory.")
    notes = [r for r in report["results"] if "projected_preset_minutes" in r]
    for r in notes:
        lines.append("")
        lines.append(f"`{r['preset']}` preset: {r['preset_iterations']} iterations x {r['seconds_per_iteration']} s "
                     f"= {r['projected_preset_minutes']} min projected.")
    estimates = [r for r in report["results"] if "plain_estimate_gb" in r]
    if estimates:
        lines.append("")
        lines.append("Plain-path memory estimate used by `memory_saving: auto` (one measured step x syn_steps) vs "
                     "the measured growth of peak RSS during the stage: "
                     + "; ".join(f"{r['name']} {r['plain_estimate_gb']} GB estimated / "
                                 f"{r['peak_rss_gb'] - r['rss_before_distill_gb']:.2f} GB measured"
                                 for r in estimates) + ".")
    lines.append(END)
    return "\n".join(lines)


def write_markdown_section(text: str) -> None:
    """Replace only this benchmark's section of docs/RESULTS.md (re-read just before writing)."""
    from mkdt.artifacts import atomic_write_text

    current = RESULTS_MD.read_text("utf-8") if RESULTS_MD.is_file() else "# Results\n"
    if START in current and END in current:
        head, rest = current.split(START, 1)
        tail = rest.split(END, 1)[1]
        updated = head + text + tail
    else:
        updated = current.rstrip("\n") + "\n\n" + text + "\n"
    atomic_write_text(RESULTS_MD, updated)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--only", action="append", help="run only these configurations (repeatable)")
    parser.add_argument("--iterations", type=int, help="iterations per configuration (default: per config)")
    parser.add_argument("--threads", type=int, help="torch threads in each configuration (default: torch's)")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write results files")
    parser.add_argument("--render", action="store_true",
                        help="only re-write the docs/RESULTS.md section from the saved JSON (no measuring)")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))))
        return 0
    if args.render:
        write_markdown_section(markdown(json.loads(RESULTS_JSON.read_text("utf-8"))))
        return 0
    specs = [dict(s) for s in CONFIGS if not args.only or s["name"] in args.only]
    results = []
    for spec in specs:
        if args.iterations:
            spec["iterations"] = args.iterations
        if args.threads:
            spec["threads"] = args.threads
        print(f"running {spec['name']} ...", file=sys.stderr, flush=True)
        results.append(run_isolated(spec))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    command = "python benchmarks/distill_speed.py" + ("" if argv is None and len(sys.argv) == 1
                                                      else " " + " ".join(sys.argv[1:] if argv is None else argv))
    report = {"command": command, "date": dt.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
              "results": results}
    print(markdown(report))
    if not args.no_write:
        from mkdt.artifacts import save_json

        save_json(RESULTS_JSON, report)
        write_markdown_section(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

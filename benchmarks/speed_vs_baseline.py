"""The fast inner loop (``distill.fast_inner``) against the reference path, side by side in one process.

For each shape, the same random matching problem (ConvNet depth 3, random 3x32x32 set of 1000 images,
512-d targets, theta* a small perturbation of theta_0) is matched by the reference path and by the fast
path, both through ``mkdt.distill.loop.match_problem`` (the dispatch a run uses; the reference is
selected by passing no fast student, as ``fast_inner: false`` does), alternating, ``--repeats`` times
each after one warm-up. Reported: CPU seconds per iteration (process time, the issue's "per CPU-second"
measure; less disturbed by other jobs than wall time), wall seconds, their ratios reference / fast
(> 1: the fast path is faster), and the fast path's largest relative gradient difference to the
reference (a check that both computed the same thing). The load average is recorded: the machine's
cores may be shared, so compare ratios of one run only.

    python benchmarks/speed_vs_baseline.py                        # the issue-20 shapes (slow: minutes)
    python benchmarks/speed_vs_baseline.py --precision bf16       # the fast path under bf16 autocast
    python benchmarks/speed_vs_baseline.py --quick --no-write     # seconds: a smoke run, writes nothing
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402

NAME = "speed_vs_baseline"
# issue 20's shapes: w32 10x128 and 80x16 (the cifar10-cpu preset) on the plain path, and the paper's width
# 128 at 40 x 256 on the memory-saving path (the only one that fits there)
SHAPES = [
    {"name": "w32-syn10-b128-plain", "width": 32, "syn_steps": 10, "batch_syn": 128, "memory_saving": False},
    {"name": "w32-syn80-b16-plain", "width": 32, "syn_steps": 80, "batch_syn": 16, "memory_saving": False},
    {"name": "w128-syn40-b256-memory-saving", "width": 128, "syn_steps": 40, "batch_syn": 256,
     "memory_saving": True},
]
QUICK = [
    {"name": "quick-w8-syn3-b8-plain", "width": 8, "syn_steps": 3, "batch_syn": 8, "memory_saving": False},
    {"name": "quick-w8-syn3-b8-memory-saving", "width": 8, "syn_steps": 3, "batch_syn": 8, "memory_saving": True},
]


def make_problem(shape: dict, n_images: int, target_dim: int = 512):
    """A random matching problem of the shape (seeded: the same for both paths)."""
    import torch

    from mkdt.distill import matching
    from mkdt.models import ModelConfig, build_model
    from mkdt.models.functional import ParamLayout, flat_parameters
    from mkdt.runtime import generator, seeded

    with seeded(0):
        net = build_model(ModelConfig(name="convnet", depth=3, width=shape["width"]), in_channels=3, resolution=32,
                          head_dim=target_dim)
    layout = ParamLayout.of(net)
    g = generator(1)
    theta0 = flat_parameters(net)
    theta_star = theta0 + 0.01 * torch.randn(theta0.shape, generator=g)
    images = torch.randn(n_images, 3, 32, 32, generator=g).requires_grad_(True)
    targets = torch.randn(n_images, target_dim, generator=g).requires_grad_(True)
    lr = torch.tensor(0.1).requires_grad_(True)
    plan = matching.plan_steps(n_images, shape["batch_syn"], shape["syn_steps"], generator(2))
    return matching.Problem(net, layout, theta0, theta_star, images, targets, lr, plan)


def measure(shape: dict, args: argparse.Namespace) -> dict:
    import torch

    from mkdt.distill import fast
    from mkdt.distill.loop import match_problem
    from mkdt.ssl.train import autocast_dtype

    problem = make_problem(shape, args.images)
    amp = autocast_dtype(args.precision, torch.device("cpu"), native_only=True)
    student = fast.FastStudent(problem.student, problem.layout, amp_dtype=amp, channels_last=args.channels_last,
                               hand_norm=args.hand_norm)
    paths = {"reference": None, "fast": student}
    results = {name: match_problem(problem, s, shape["memory_saving"]) for name, s in paths.items()}  # warm-up
    errors = [float((a - b).norm() / a.norm().clamp_min(1e-30))
              for a, b in zip(results["reference"].grads(), results["fast"].grads())]
    cpu: dict[str, list[float]] = {name: [] for name in paths}
    wall: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.repeats):
        for name, s in paths.items():
            t0, c0 = time.perf_counter(), time.process_time()
            match_problem(problem, s, shape["memory_saving"])
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    med = {name: (statistics.median(cpu[name]), statistics.median(wall[name])) for name in paths}
    return {
        **shape, "precision": "bf16" if amp == torch.bfloat16 else "fp32", "channels_last": args.channels_last,
        "hand_norm": args.hand_norm, "hand_written_forward": student.hand_written, "repeats": args.repeats,
        "reference_cpu_s": round(med["reference"][0], 4), "fast_cpu_s": round(med["fast"][0], 4),
        "reference_wall_s": round(med["reference"][1], 4), "fast_wall_s": round(med["fast"][1], 4),
        "speedup_cpu": round(med["reference"][0] / med["fast"][0], 3),
        "speedup_wall": round(med["reference"][1] / med["fast"][1], 3),
        "loss_reference": float(results["reference"].loss), "loss_fast": float(results["fast"].loss),
        "max_grad_rel_diff": max(errors) if errors else None,
    }


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "## Fast inner loop vs reference (`benchmarks/speed_vs_baseline.py`)",
        "",
        f"Command: `{report['command']}` — {report['date']}, {m['cpu']} ({', '.join(m['flags'])}), {m['cores']} "
        f"cores, load average {m['load_average']}, torch {report['torch']}, {report['threads']} thread(s). "
        "Both paths in one process on the same random problem, alternating; medians of the repeats. "
        "Speed-up = reference / fast (CPU seconds: process time per iteration).",
        "",
        "| shape | path | precision | reference CPU s | fast CPU s | speed-up (CPU) | speed-up (wall) | "
        "max grad rel. diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        path = "memory-saving" if r["memory_saving"] else "plain"
        diff = "" if r["max_grad_rel_diff"] is None else f"{r['max_grad_rel_diff']:.1e}"
        lines.append(f"| {r['name']} | {path} | {r['precision']} | {r['reference_cpu_s']} | {r['fast_cpu_s']} | "
                     f"{r['speedup_cpu']}x | {r['speedup_wall']}x | {diff} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (width 8, 3 steps of 8 images): a smoke run")
    parser.add_argument("--only", action="append", help="run only these shapes (repeatable)")
    parser.add_argument("--repeats", type=int, default=3, help="timed iterations per path and shape")
    parser.add_argument("--images", type=int, default=1000, help="synthetic set size")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "auto"),
                        help="the fast path's autocast (distill.precision)")
    parser.add_argument("--channels-last", action="store_true", help="fast path: channels-last activations")
    parser.add_argument("--hand-norm", action="store_true", help="fast path: instance norm by hand, not torch's")
    parser.add_argument("--no-write", action="store_true", help="print only; write no results files")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.images = min(args.repeats, 1), min(args.images, 64)

    import torch

    torch.set_num_threads(args.threads)
    shapes = [s for s in (QUICK if args.quick else SHAPES) if not args.only or s["name"] in args.only]
    results = []
    for shape in shapes:
        print(f"running {shape['name']} ...", file=sys.stderr, flush=True)
        results.append(measure(shape, args))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    report = {"command": _report.command_line(argv), "date": _report.now(), "machine": _report.machine(),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "results": results}
    text = markdown(report)
    print(text)
    if not args.no_write:
        _report.write_results_json(NAME, report)
        _report.replace_section(NAME, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

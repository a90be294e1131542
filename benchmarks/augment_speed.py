"""Benchmark: the batched SSL views (``mkdt.ssl.BatchAugment``) against per-image torchvision and, when
installed, ``kornia.augmentation``, for one 256 x 3 x 32 x 32 batch on one CPU thread.

Why: the teacher, SSL experts and MTT-SSL draw two views of every batch; after the colour jitter became
torchvision's HSV definition this records what a view costs, what the jitter alone costs, and what the
alternatives would cost on the same machine.

    python benchmarks/augment_speed.py [--repeats 20]

Prints a markdown table, writes ``benchmarks/results/augment_speed.json`` and replaces its own section of
``docs/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402

from mkdt.ssl import AugmentConfig, BatchAugment  # noqa: E402
from mkdt.ssl.augment import color_jitter  # noqa: E402

NAME = "augment_speed"
MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


def timed(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, dict[str, float]]:
    """Median and minimum milliseconds of each callable, run round-robin (the 2 cores are shared: load that
    comes and goes then slows every candidate alike)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: {"median_ms": round(1000 * statistics.median(t), 2), "min_ms": round(1000 * min(t), 2)}
            for name, t in times.items()}


def measure(repeats: int, batch: int) -> dict[str, dict[str, float]]:
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, generator=g)
    x = pixels.float() / 255
    aug = BatchAugment(AugmentConfig(), MEAN, STD)
    params = aug.sample(batch, 32, 32, torch.Generator().manual_seed(1))
    from torchvision.transforms import v2

    per_image = v2.Compose([v2.RandomResizedCrop(32, scale=(0.2, 1.0), antialias=True), v2.RandomHorizontalFlip(),
                            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), v2.RandomGrayscale(0.2),
                            v2.Normalize(MEAN, STD)])
    fns: dict[str, Callable[[], object]] = {
        "mkdt BatchAugment, one view (crop, flip, jitter p 0.8, grayscale p 0.2)":
            lambda: aug(pixels, torch.Generator().manual_seed(2)),
        "mkdt colour jitter alone (HSV hue, per-image order)": lambda: color_jitter(x, params),
        "torchvision v2, image by image (same recipe)": lambda: torch.stack([per_image(im) for im in x]),
    }
    try:
        import kornia
        import kornia.augmentation as K
    except ImportError:
        return timed(fns, repeats)
    batched = torch.nn.Sequential(K.RandomResizedCrop((32, 32), scale=(0.2, 1.0)), K.RandomHorizontalFlip(),
                                  K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8), K.RandomGrayscale(p=0.2),
                                  K.Normalize(torch.tensor(MEAN), torch.tensor(STD)))
    fns[f"kornia {kornia.__version__} augmentation, batched (same recipe)"] = lambda: batched(x)
    return timed(fns, repeats)


def markdown(report: dict) -> str:
    lines = ["## Batched SSL views: mkdt vs torchvision vs kornia", "",
             f"`{report['command']}` ({report['date']}, torch {report['torch']}, {report['threads']} thread, "
             f"batch {report['batch']} x 3 x 32 x 32, {report['repeats']} repeats round-robin, load average "
             f"{report['load_average'][0]:.1f} on 2 shared cores)", "",
             "| one view of the batch | median ms | min ms |", "|---|---:|---:|"]
    lines += [f"| {name} | {v['median_ms']} | {v['min_ms']} |" for name, v in report["rows"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    report = {"command": _report.command_line(argv), "date": _report.now(), "torch": torch.__version__,
              "threads": 1, "batch": args.batch, "repeats": args.repeats, "machine": platform.machine(), "load_average": list(os.getloadavg()),
              "rows": measure(args.repeats, args.batch)}
    print(markdown(report))
    if not args.no_write:
        _report.write_results_json(NAME, report)
        _report.replace_section(NAME, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

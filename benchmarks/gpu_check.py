"""One GPU, a few minutes: the paper's shapes measured on CUDA (time per unit of work and peak GPU memory).

    python benchmarks/gpu_check.py              # on a machine with CUDA; writes benchmarks/results/gpu_check.json
    python benchmarks/gpu_check.py --device cpu --quick --no-write   # the same code path at toy sizes (tests)

Measures, with synthetic data of the real shapes (nothing to download): a distillation iteration at CIFAR-10 2%
(ConvNet width 128, 40 steps of 256 images; plain and memory-saving path) and at TinyImageNet 2% (depth 4, 64 px,
10 steps of 256; when memory allows), one expert epoch (ConvNet width 128 on 50,000 images), a teacher epoch
(ResNet-18 width 64, Barlow Twins, 50,000 images; timed over the first steps and extrapolated) and a linear probe
(paper and converged protocol on 2,048-d features). Each part records seconds and peak GPU memory; one that runs out
of memory is recorded as such and the others still run. Without CUDA it prints one line and exits 0.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402

NAME = "gpu_check"
FULL = {"images": 50_000, "syn_images": 1_000, "width": 128, "batch": 256, "teacher_width": 64, "teacher_steps": 30,
        "probe_rows": 5_000, "feature_dim": 2_048, "tiny_syn_images": 2_000, "iterations": 2}
QUICK = {"images": 512, "syn_images": 64, "width": 8, "batch": 32, "teacher_width": 8, "teacher_steps": 2,
         "probe_rows": 200, "feature_dim": 64, "tiny_syn_images": 64, "iterations": 2}


def peak_reset(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)


def measured(name: str, device, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``fn()`` with its peak memory; out-of-memory is a result, not a crash."""
    import torch

    peak_reset(device)
    t0 = time.perf_counter()
    try:
        out = fn()
    except torch.OutOfMemoryError:
        return {"part": name, "status": "out of memory", "peak_gb": peak_gb(device)}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"part": name, "status": "ok", "wall_seconds": round(time.perf_counter() - t0, 2),
            "peak_gb": peak_gb(device), **out}


def distill_iteration(device, sizes: dict, depth: int, resolution: int, syn_steps: int, syn_images: int,
                      memory_saving: bool) -> dict[str, Any]:
    """Seconds per distillation iteration through the stage itself, on random experts of the real shape."""
    import json

    import torch

    from mkdt.distill import DistillConfig, distill
    from mkdt.formats import SyntheticSet, save_synthetic, save_trajectory
    from mkdt.models import ModelConfig, build_model
    from mkdt.models.functional import ParamLayout, flat_parameters
    from mkdt.runtime import generator, seeded

    model = ModelConfig(name="convnet", depth=depth, width=sizes["width"])
    with tempfile.TemporaryDirectory(prefix="mkdt-gpu-") as tmp:
        root = Path(tmp)
        mean, std, dim = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 512
        for e in range(2):
            with seeded(e):
                net = build_model(model, in_channels=3, resolution=resolution, head_dim=dim)
            g = generator(100 + e)
            params = [flat_parameters(net)]
            for _ in range(3):
                params.append(params[-1] + 0.01 * torch.randn(params[-1].shape, generator=g))
            save_trajectory(root / "experts" / f"expert_{e:04d}.safetensors", torch.stack(params), list(range(4)),
                            ParamLayout.of(net), model=model.to_dict(), in_channels=3, resolution=resolution,
                            head_dim=dim, mean=list(mean), std=list(std))
        g = generator(7)
        save_synthetic(root / "init" / "high_loss.safetensors",
                       SyntheticSet(torch.randn(syn_images, 3, resolution, resolution, generator=g),
                                    torch.randn(syn_images, dim, generator=g), mean, std))
        config = DistillConfig(out=str(root), device=str(device), model=model, iterations=sizes["iterations"],
                               syn_steps=syn_steps, batch_syn=sizes["batch"], expert_epochs=2, max_start_epoch=2,
                               memory_saving=memory_saving, checkpoint_every=sizes["iterations"], grid_images=4)
        peak_reset(device)
        distill(config)
        rows = [json.loads(line) for line in (root / "distill" / "log.jsonl").read_text().splitlines()]
    timed = rows[1:] or rows
    return {"seconds_per_iteration": round(sum(r["seconds"] for r in timed) / len(timed), 3)}


def expert_epoch(device, sizes: dict) -> dict[str, Any]:
    import torch

    from mkdt.models import build_model
    from mkdt.runtime import generator
    from mkdt.training import RegressionSchedule, train_regression

    g = generator(0)
    images = torch.randn(sizes["images"], 3, 32, 32, generator=g).to(device)
    targets = torch.randn(sizes["images"], 512, generator=g).to(device)
    model = build_model("convnet", depth=3, width=sizes["width"], head_dim=512).to(device)
    t0 = time.perf_counter()
    train_regression(model, images, targets, RegressionSchedule(epochs=1, batch_size=sizes["batch"]), generator(1))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {"seconds_per_epoch": round(time.perf_counter() - t0, 2), "images": sizes["images"]}


def teacher_epoch(device, sizes: dict) -> dict[str, Any]:
    import torch

    from mkdt.models import ModelConfig, build_model
    from mkdt.ssl import AugmentConfig, BatchAugment, ObjectiveConfig, SSLSchedule, SSLTrainer

    model = build_model(ModelConfig(name="resnet18", width=sizes["teacher_width"], norm="batchnorm"))
    steps, batch = sizes["teacher_steps"], sizes["batch"]
    images = torch.randint(0, 256, (steps * batch, 3, 32, 32), dtype=torch.uint8)
    trainer = SSLTrainer(model, ObjectiveConfig(), SSLSchedule(epochs=1, batch_size=batch, warmup_epochs=0),
                         BatchAugment(AugmentConfig(), (0.5,) * 3, (0.25,) * 3), seed=0, device=device)
    t0 = time.perf_counter()
    trainer.fit(images.to(device) if device.type == "cuda" else images)
    per_step = (time.perf_counter() - t0) / steps
    return {"seconds_per_step": round(per_step, 4),
            "seconds_per_epoch_50k": round(per_step * 50_000 / batch, 1)}


def probe_fit(device, sizes: dict) -> dict[str, Any]:
    import torch

    from mkdt.evaluate import fit_logistic
    from mkdt.runtime import generator

    g = generator(0)
    x = torch.randn(sizes["probe_rows"], sizes["feature_dim"], generator=g).to(device)
    y = torch.randint(0, 10, (sizes["probe_rows"],), generator=g).to(device)
    t0 = time.perf_counter()
    fit_logistic(x, y, 10, reg=1e-3, max_iter=20)
    paper = time.perf_counter() - t0
    t0 = time.perf_counter()
    fit_logistic(x, y, 10, reg=1e-3, max_iter=2000, line_search="strong_wolfe", standardise=True)
    return {"paper_seconds": round(paper, 2), "converged_seconds": round(time.perf_counter() - t0, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (the same code path, for tests)")
    p.add_argument("--quick", action="store_true", help="toy sizes (seconds on a CPU)")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine; nothing measured")
        return 0
    from mkdt.runtime import resolve_device

    device = resolve_device(args.device)
    sizes = QUICK if args.quick else FULL
    command, date = _report.command_line(argv), _report.now()
    cifar_steps, tiny_steps = (4, 2) if args.quick else (40, 10)
    parts = [
        measured("distill cifar10-2pct plain", device,
                 lambda: distill_iteration(device, sizes, 3, 32, cifar_steps, sizes["syn_images"], False)),
        measured("distill cifar10-2pct memory-saving", device,
                 lambda: distill_iteration(device, sizes, 3, 32, cifar_steps, sizes["syn_images"], True)),
        measured("distill tinyimagenet-2pct memory-saving", device,
                 lambda: distill_iteration(device, sizes, 4, 64, tiny_steps, sizes["tiny_syn_images"], True)),
        measured("expert epoch (ConvNet w128, 50k images)", device, lambda: expert_epoch(device, sizes)),
        measured("teacher epoch (ResNet-18 w64, Barlow Twins)", device, lambda: teacher_epoch(device, sizes)),
        measured("linear probe (5k x 2048, 10 classes)", device, lambda: probe_fit(device, sizes)),
    ]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    payload = {"command": command, "date": date, "device": name, "torch": torch.__version__,
               "cuda": torch.version.cuda, "quick": args.quick, "parts": parts}
    lines = ["## GPU check (`benchmarks/gpu_check.py`)", "", f"Command: `{command}` — {date}, {name}.", "",
             "| part | status | seconds | peak GPU GB |", "|---|---|---|---|"]
    for part in parts:
        figures = {k: v for k, v in part.items() if k.endswith("seconds") or k.startswith("seconds")}
        lines.append(f"| {part['part']} | {part['status']} | {figures} | {part.get('peak_gb')} |")
    text = "\n".join(lines)
    print(text)
    if not args.no_write and not args.quick:
        _report.write_results_json(NAME, payload)
        _report.replace_section(NAME, text)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())

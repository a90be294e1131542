"""What a planned step will cost before it runs: distillation memory (plain vs memory-saving) and, where this
project measured a rate on the same kind of machine, its time (for ``mkdt run --dry-run``).

Memory is measured, not guessed: one unrolled step of a student with the configured architecture on a
random batch of the configured shape counts the bytes autograd keeps (the plain path keeps ``syn_steps`` of
them; the memory-saving path one, plus ``syn_steps`` parameter vectors). Times come only from benchmark
results recorded with the machine they ran on (``benchmarks/results/*.json`` of a source checkout).
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch

from mkdt.runtime import generator, seeded

# Training-split sizes of the built-in sources with a fixed size (for sizes given as fractions).
SOURCE_SIZES = {"cifar10": 50_000, "cifar100": 50_000, "tinyimagenet": 100_000, "digits": 1_437}
SOURCE_RESOLUTIONS = {"cifar10": 32, "cifar100": 32, "tinyimagenet": 64, "digits": 8}
RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def source_size(data: Any) -> int | None:
    if data.indices is not None:
        return len(data.indices)
    return SOURCE_SIZES.get(data.name)


def source_shape(data: Any) -> tuple[int, int]:
    """(channels, resolution) the source's images will have (3 channels unless set; the source's own size)."""
    return data.channels or (1 if data.name in ("digits", "idx") else 3), \
        data.resolution or SOURCE_RESOLUTIONS.get(data.name, 32)


def distill_memory_gb(config: Any, channels: int, resolution: int, target_dim: int) -> dict[str, float]:
    """Estimated extra memory of one distillation update on each path (GB), measured on the CPU."""
    from mkdt.distill import matching, memory
    from mkdt.models import build_model
    from mkdt.models.functional import ParamLayout, flat_parameters

    with seeded(0):
        student = build_model(config.model, in_channels=channels, resolution=resolution, head_dim=target_dim)
    layout = ParamLayout.of(student)
    theta = flat_parameters(student).detach()

    def step_bytes(batch: int) -> int:
        g = generator(0)
        images = torch.randn(batch, channels, resolution, resolution, generator=g).requires_grad_(True)
        targets = torch.randn(batch, target_dim, generator=g).requires_grad_(True)
        problem = matching.Problem(student, layout, theta, theta + 0.01, images, targets,
                                   torch.tensor(config.lr_init, requires_grad=True),
                                   matching.plan_steps(batch, batch, 1, g))
        return memory.measure_step_bytes(problem)

    # activations grow linearly with the batch: two small batches give the line, read at batch_syn (seconds, not
    # the minute a paper-size step takes on a CPU)
    small, large = 4, 8
    a, b = step_bytes(small), step_bytes(large)
    step = max(b, b + (b - a) * (config.batch_syn - large) / (large - small))
    params = theta.numel() * theta.element_size()
    return {"plain_gb": round(config.syn_steps * step / 2**30, 2),
            "memory_saving_gb": round((step + (config.syn_steps + 2) * params) / 2**30, 2)}


def _this_cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def distill_seconds_per_iteration(config: Any, device: torch.device, memory_saving: bool
                                  ) -> tuple[float, str] | None:
    """A measured seconds-per-iteration for this shape on this kind of CPU, and where it comes from."""
    path = RESULTS / "distill_speed.json"
    if device.type != "cpu" or not path.is_file():
        return None
    try:
        record = json.loads(path.read_text("utf-8"))
    except ValueError:
        return None
    if record.get("machine", {}).get("cpu") not in (_this_cpu(), None):
        return None
    for row in record.get("results", []):
        same = (row.get("width") == (config.model.width or 128) and row.get("depth") == config.model.depth
                and row.get("syn_steps") == config.syn_steps and row.get("batch_syn") == config.batch_syn
                and bool(row.get("memory_saving")) == memory_saving)
        if same:
            per = row["seconds_per_iteration"] * config.trajectories
            return per, f"benchmarks/results/distill_speed.json ({record.get('date', '?')[:10]}, {row['name']})"
    return None

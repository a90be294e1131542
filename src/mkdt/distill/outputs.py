"""Human-readable outputs of a distillation run: image grids and the loss curve (PNG, written atomically)."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torchvision.utils import make_grid

from mkdt.artifacts import atomic_write_bytes
from mkdt.data.imageset import denormalize


def png_bytes(image: torch.Tensor) -> bytes:
    """A uint8 C x H x W tensor (1 or 3 channels) as PNG bytes (Pillow; torchvision's encoder is deprecated)."""
    from PIL import Image

    array = image.detach().cpu().permute(1, 2, 0).numpy()
    picture = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return buf.getvalue()


def to_uint8(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalised float images -> uint8 pixels (denormalised, clamped, rounded)."""
    return (denormalize(images.detach().cpu(), mean, std) * 255).round().to(torch.uint8)


def save_grid(path: Path, images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
              limit: int = 100) -> None:
    """The first ``limit`` images as one PNG grid; tiny images are enlarged (nearest) to >= 32 px."""
    x = denormalize(images[:limit].detach().float().cpu(), mean, std)
    if x.shape[0] == 0:
        return
    scale = max(1, 32 // x.shape[-1])
    if scale > 1:
        x = F.interpolate(x, scale_factor=scale, mode="nearest")
    grid = make_grid(x, nrow=max(1, math.ceil(math.sqrt(x.shape[0]))), padding=2, pad_value=1.0)
    atomic_write_bytes(path, png_bytes((grid * 255).round().to(torch.uint8)))


def moving_average(values: list[float], window: int) -> list[float]:
    out, total, queue = [], 0.0, []
    for v in values:
        queue.append(v)
        total += v
        if len(queue) > window:
            total -= queue.pop(0)
        out.append(total / len(queue))
    return out


def save_loss_curve(path: Path, log: list[dict[str, Any]], validation: list[dict[str, Any]] | None = None) -> None:
    """Matching loss per iteration (and a moving average, and the held-out experts' loss when there is
    one) plus the learned lr, as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in log if not r.get("skipped") and r.get("loss") is not None]
    fig = Figure(figsize=(9, 3.5))
    FigureCanvasAgg(fig)
    ax_loss, ax_lr = fig.subplots(1, 2)
    if rows:
        its = [r["iteration"] for r in rows]
        losses = [r["loss"] for r in rows]
        ax_loss.plot(its, losses, lw=0.6, alpha=0.5, label="loss")
        ax_loss.plot(its, moving_average(losses, max(1, len(losses) // 50)), lw=1.5, label="moving average")
    if validation:
        ax_loss.plot([r["iteration"] for r in validation], [r["val_loss"] for r in validation], "o-", lw=1.5,
                     ms=3, label="held-out experts")
    if rows or validation:
        ax_loss.legend()
    if rows:
        ax_lr.plot(its, [r["lr"] for r in rows], lw=1.2)
    ax_loss.set(xlabel="iteration", ylabel="||θ_N-θ*||² / ||θ_0-θ*||²", title="trajectory-matching loss")
    ax_lr.set(xlabel="iteration", ylabel="learned inner lr", title="learned lr")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(path, buf.getvalue())


def mean_abs_pixel_change(initial: torch.Tensor, final: torch.Tensor, std: Sequence[float]) -> float:
    """Mean |final - initial| in [0, 1] pixel units (normalised differences times the channel std)."""
    s = torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
    diff = (final.detach().cpu().double() - initial.detach().cpu().double()) * s
    return float(diff.abs().mean())

"""The run report: one self-contained HTML file (images embedded) plus the same table in markdown.

It shows the result chart (mean ± std over seeds on an axis that spans the results) and table, how to read
them, the distillation loss (raw and smoothed) beside the held-out experts' loss, the learned lr over the
iterations, the initial and distilled images with their difference, and the time and peak memory of every
step. It only reads what the stages wrote (``pipeline.json``, ``probe/<method>/results.json``, the distill
folder's log and sets), so it can be regenerated at any time; figures go to ``report_files/``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any, Mapping

from mkdt.artifacts import atomic_write_bytes, atomic_write_text, load_json, remove_orphans
from mkdt.errors import MkdtError
from mkdt.layout import RunLayout

SMOOTH_WINDOW = 10  # iterations averaged by the smoothed loss curve (at most a fifth of the run)

DIGITS_NOTE = (
    "This run is on scikit-learn's 8x8 digits (1,437 training images, upsampled): a check that every stage "
    "works end to end in a few minutes, not evidence for the method. On digits a randomly initialised ConvNet "
    "is already a strong feature extractor, so <b>none</b> (no pre-training) is as good as any pre-training "
    "here, and the methods differ by less than their spread over seeds (the error bars; see docs/RESULTS.md, "
    "demo). What digits <em>can</em> show: the pipeline runs, the training loss falls, the images move away "
    "from the initial ones, and whether the held-out experts' loss falls too (if it stays flat while the "
    "training loss falls, the set fits the experts it was fitted to, not fresh networks: train more experts). "
    "What it <em>cannot</em> show: that MKDT beats a random subset or no pre-training. That needs CIFAR-10 "
    "and larger, where a fresh encoder does need pre-training (docs/RESULTS.md, the CIFAR-10 benchmark).")

HOW_TO_READ = [
    "<b>Chart</b>: linear-probe test accuracy of an encoder pre-trained on each method's set, mean ± std over "
    "the probe seeds; the axis starts near the lowest result (stated on it), so small differences show: "
    "compare the gaps with the error bars before reading a ranking into them.",
    "<b>Methods</b>: <code>none</code> = a randomly initialised encoder (no pre-training); "
    "<code>random</code> / <code>high_loss</code> = real subsets of the same size as the distilled set; "
    "<code>mkdt</code> = the distilled set.",
    "<b>Loss curves</b>: the trajectory-matching loss of each update (faint) and its moving average; the "
    "held-out experts' loss (when distill.validation_experts &gt; 0) is the part of the progress that carries "
    "over to networks the set was not fitted to.",
    "<b>Images</b>: the initial set (real images chosen by the experts' loss), the distilled set, and their "
    "difference (distilled minus initial, in pixel units; red brighter, blue darker).",
]


# ----------------------------------------------------------------------------------------------
# reading the run
# ----------------------------------------------------------------------------------------------
def probe_results(layout: RunLayout, methods: list[str], recorded: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Each method's probe results: where the pipeline recorded them, else ``probe/<method>``."""
    results = {}
    for method in methods:
        path = layout.at(recorded[method]) if recorded and method in recorded else layout.probe_results(method)
        if path.is_file():
            results[method] = load_json(path)
    return results


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text("utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a torn last line of an interrupted run
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def distill_sets(layout: RunLayout) -> tuple[Any, Any] | None:
    """(initial, distilled) synthetic sets of the run's distillation, or ``None`` when there is none."""
    from mkdt.formats import load_synthetic

    path = layout.distilled()
    if not path.is_file():
        return None
    try:
        final = load_synthetic(path)
        init = final.meta.get("init")
        if not init or not layout.at(init).is_file():
            return None
        return load_synthetic(layout.at(init)), final
    except MkdtError:
        return None


# ----------------------------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------------------------
def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())
    return path


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average over ``window`` values (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def curves_figure(log: list[dict[str, Any]], validation: list[dict[str, Any]], path: Path) -> Path | None:
    """Left: matching loss per update (faint), smoothed, and the held-out experts' loss; right: the learned lr."""
    rows = [r for r in log if r.get("loss") is not None and not r.get("skipped")]
    if not rows:
        return None
    its = [r["iteration"] for r in rows]
    losses = [float(r["loss"]) for r in rows]
    window = max(1, min(SMOOTH_WINDOW, len(losses) // 5 or 1))
    fig = _figure(10, 3.6)
    ax_loss, ax_lr = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    ax_loss.plot(its, losses, lw=0.7, alpha=0.35, color="C0", label="training loss (each update)")
    ax_loss.plot(its, smooth(losses, window), lw=2.0, color="C0", label=f"training loss, mean of {window}")
    if validation:
        ax_loss.plot([r["iteration"] for r in validation], [r["val_loss"] for r in validation], "o-", ms=4, lw=1.5,
                     color="C3", label="held-out experts")
    ax_loss.set(xlabel="iteration", ylabel="matching loss", title="trajectory-matching loss")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(fontsize=8, loc="best")
    lr_rows = [r for r in log if r.get("lr") is not None]
    ax_lr.plot([r["iteration"] for r in lr_rows], [float(r["lr"]) for r in lr_rows], lw=1.6, color="C2")
    ax_lr.set(xlabel="iteration", ylabel="inner lr", title="learned inner learning rate")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def _grid(images, mean, std, limit: int):
    """The first ``limit`` images as one H x W (x 3) array in [0, 1] for imshow."""
    from torchvision.utils import make_grid

    from mkdt.data.imageset import denormalize

    x = denormalize(images[:limit].detach().float().cpu(), mean, std)
    nrow = max(1, math.ceil(math.sqrt(len(x))))
    grid = make_grid(x, nrow=nrow, padding=1, pad_value=1.0)
    array = grid.permute(1, 2, 0).numpy() if x.shape[1] == 3 else grid[0].numpy()
    return array


def images_figure(initial: Any, final: Any, path: Path, limit: int = 64) -> Path:
    """Initial | distilled | difference (distilled - initial in pixel units, mean over channels)."""
    import numpy as np
    import torch

    limit = min(limit, len(initial), len(final))
    first = _grid(initial.images, initial.mean, initial.std, limit)
    second = _grid(final.images, final.mean, final.std, limit)
    std = torch.tensor(final.std).view(1, -1, 1, 1)
    diff = ((final.images[:limit] - initial.images[:limit]).float() * std).mean(dim=1, keepdim=True)
    from torchvision.utils import make_grid

    nrow = max(1, math.ceil(math.sqrt(limit)))
    diff_grid = make_grid(diff, nrow=nrow, padding=1, pad_value=0.0)[0].numpy()
    scale = float(np.abs(diff_grid).max()) or 1e-6
    fig = _figure(12, 4.4)
    axes = fig.subplots(1, 3)
    gray = None if first.ndim == 3 else "gray"
    axes[0].imshow(first, cmap=gray, vmin=0, vmax=1, interpolation="nearest")
    axes[0].set_title(f"initial set (first {limit})", fontsize=10)
    axes[1].imshow(second, cmap=gray, vmin=0, vmax=1, interpolation="nearest")
    axes[1].set_title("distilled set", fontsize=10)
    shown = axes[2].imshow(diff_grid, cmap="RdBu_r", vmin=-scale, vmax=scale, interpolation="nearest")
    axes[2].set_title("difference (distilled - initial)", fontsize=10)
    for ax in axes:
        ax.set_axis_off()
    bar = fig.colorbar(shown, ax=axes[2], fraction=0.046, pad=0.03)
    bar.set_label("pixel change (0-1 scale)", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------
# html
# ----------------------------------------------------------------------------------------------
def _image_tag(path: Path | None, caption: str, css: str = "") -> str:
    if path is None or not path.is_file():
        return f"<p><em>{html.escape(caption)}: not available</em></p>"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure{css}><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _md_to_html_table(markdown: str) -> str:
    lines = [ln for ln in markdown.strip().splitlines() if ln.startswith("|")]
    if len(lines) < 2:
        return f"<pre>{html.escape(markdown)}</pre>"
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    head, body = rows[0], rows[2:]
    out = ["<table><thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr></thead><tbody>"]
    out += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body]
    out.append("</tbody></table>")
    return "\n".join(out)


def stage_table(state: Mapping[str, Any]) -> str:
    lines = ["| step | status | seconds | peak RSS (MB) |", "|---|---|---:|---:|"]
    steps = state.get("steps", {})
    for name in state.get("order", list(steps)):
        step = steps.get(name, {})
        m = step.get("measure") or {}
        lines.append(f"| {name} | {step.get('status', '')} | {m.get('seconds', float('nan')):.1f} | "
                     f"{m.get('peak_mb', float('nan')):.0f} |")
    return "\n".join(lines)


def _data_name(state: Mapping[str, Any], sets: tuple[Any, Any] | None) -> str | None:
    if sets is not None:
        return sets[1].meta.get("data_name")
    for step in (state.get("steps") or {}).values():
        name = (step.get("summary") or {}).get("data_name")
        if name:
            return str(name)
    return None


STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1150px;margin:1.5em auto;padding:0 1em;color:#222;"
    "line-height:1.45}h1{margin-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid #ddd}"
    "table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:3px 9px;text-align:right}"
    "th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}"
    "figure{margin:.6em 0}figure img{max-width:100%;height:auto}figcaption{font-size:.85em;color:#555}"
    ".note{background:#fff8e1;border-left:4px solid #f0b400;padding:.6em 1em;margin:1em 0}"
    "ul.read li{margin:.25em 0}code{background:#f4f4f4;padding:0 .2em}")


def write_report(out: str | Path, state: Mapping[str, Any]) -> dict[str, Path]:
    """Write ``<out>/report.html`` and ``<out>/report.md`` (figures in ``report_files/``); returns their paths."""
    from mkdt.evaluate import markdown_table, results_table, write_tables

    out = Path(out)
    layout = RunLayout(out)
    files = layout.report_files
    remove_orphans(files)  # temporary files of a report writer that was killed
    for orphan in out.glob(".report.*.tmp"):
        orphan.unlink(missing_ok=True)
    methods = list(state.get("methods", []))
    results = probe_results(layout, methods, state.get("results"))
    table_md, chart = "(no probe results)", None
    if results:
        rows = results_table(results)
        table_md = markdown_table(rows, [m for m in methods if m in results])
        chart = write_tables(results, files)["png"]
    distill = layout.distill_dir()
    summary = (state.get("steps", {}).get("distill") or {}).get("summary", {})
    lr = summary.get("final_lr")
    change = summary.get("mean_abs_pixel_change")
    facts = [f"learned inner lr: {lr:.4g}" if isinstance(lr, (int, float)) else "learned inner lr: n/a",
             f"mean absolute pixel change from the initial set: {change:.4f}"
             if isinstance(change, (int, float)) else "mean absolute pixel change: n/a",
             f"total pipeline time this invocation: {state.get('seconds', 0):.1f} s"]
    val0, val1 = summary.get("val_loss_initial"), summary.get("val_loss_final")
    if isinstance(val0, (int, float)) and isinstance(val1, (int, float)):
        facts.insert(2, f"held-out experts' loss: {val0:.4f} at the start -> {val1:.4f} at the end")
    log = _jsonl(distill / "log.jsonl")
    validation = _jsonl(distill / "validation.jsonl")
    curves = curves_figure(log, validation, files / "distill_curves.png") if log else None
    sets = distill_sets(layout)
    pictures = images_figure(*sets, files / "distill_images.png") if sets is not None else None
    times = stage_table(state)
    data_name = _data_name(state, sets)
    note = DIGITS_NOTE if str(data_name or "").split(":")[0] == "digits" else None
    distilled = "distill" in state.get("steps", {})
    md = "\n\n".join([
        f"# mkdt run report: {out}",
        *([f"> {html.unescape(_strip_tags(note))}"] if note else []),
        "## Linear-probe accuracy (%)", table_md,
        "Chart: `report_files/results.png` (mean ± std over seeds; the axis starts near the lowest result).",
        *(["## Distillation", "\n".join(f"- {f}" for f in facts),
            "Loss and learned lr: `report_files/distill_curves.png`; initial, distilled and difference images: "
            "`report_files/distill_images.png` (also `distill/grid_initial.png`, `distill/grid_distilled.png`)."]
          if distilled else []),
        "## Time and peak memory per step", times,
    ]) + "\n"
    body = "\n".join([
        f"<h1>mkdt run report</h1><p><code>{html.escape(str(out))}</code></p>",
        f'<div class="note"><b>How to read this demo.</b> {note}</div>' if note else "",
        "<h2>How to read this report</h2><ul class='read'>" + "".join(f"<li>{t}</li>" for t in HOW_TO_READ)
        + "</ul>",
        "<h2>Linear-probe accuracy (%)</h2>",
        _image_tag(chart, "mean ± std over seeds; the axis starts near the lowest result (stated on it)")
        if chart else "",
        _md_to_html_table(table_md),
        "<h2>Distillation</h2><ul>" + "".join(f"<li>{html.escape(f)}</li>" for f in facts) + "</ul>"
        if distilled else "",
        _image_tag(curves, "matching loss per update, its moving average and the held-out experts' loss; the "
                           "learned inner lr per iteration") if distilled else "",
        _image_tag(pictures, "initial set, distilled set and their difference (distilled - initial)")
        if distilled else "",
        "<h2>Time and peak memory per step</h2>", _md_to_html_table(times),
    ])
    page = ("<!doctype html><html><head><meta charset='utf-8'><meta name='viewport' "
            "content='width=device-width, initial-scale=1'><title>mkdt report</title><style>" + STYLE
            + "</style></head><body>" + body + "</body></html>\n")
    paths = {"html": layout.report_html, "markdown": layout.report_md}
    atomic_write_text(paths["html"], page)
    atomic_write_text(paths["markdown"], md)
    return paths


def _strip_tags(text: str) -> str:
    import re

    return re.sub(r"<[^>]+>", "", text)

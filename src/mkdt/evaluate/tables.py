"""Result tables: several ``results.json`` files (probe or finetune) -> markdown, CSV and a bar chart.

Rows are (downstream set, protocol, labelled %), columns the methods, cells ``mean ± std`` over seeds
(sample std, ddof 1). A collapsed probe (one class predicted for >= 90% of the test set) is never
shown as a plain number: its cell carries a ⚠ and its bar is hatched; a probe whose optimisation
diverged shows ``diverged``.
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Any, Mapping

from mkdt.artifacts import atomic_path, atomic_write_text
from mkdt.errors import MkdtError

COLLAPSE_MARK = "⚠"
CSV_FIELDS = ("method", "downstream", "protocol", "percent", "mean", "std", "n", "collapsed", "diverged",
              "accuracies")


def results_table(results: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Long-format rows, one per (method, downstream, protocol, percent), from results.json dicts."""
    rows = []
    for method, res in results.items():
        summary = res.get("summary") if isinstance(res, Mapping) else None
        if not isinstance(summary, Mapping):
            raise MkdtError(f"results for '{method}' have no 'summary'; pass the dict of a probe/finetune results.json")
        for downstream, by_protocol in summary.items():
            for protocol, by_percent in by_protocol.items():
                for percent, cell in by_percent.items():
                    rows.append({"method": method, "downstream": downstream, "protocol": protocol,
                                 "percent": float(percent), "mean": cell.get("mean"), "std": cell.get("std"),
                                 "n": int(cell.get("n", 0)), "collapsed": bool(cell.get("collapsed")),
                                 "diverged": bool(cell.get("diverged")),
                                 "accuracies": list(cell.get("accuracies", []))})
    rows.sort(key=lambda r: (r["downstream"], r["protocol"], r["percent"]))
    return rows


def format_cell(row: Mapping[str, Any], digits: int = 2) -> str:
    """``41.42 ± 0.35``; ``12.30 ± 0.40 ⚠`` when collapsed; ``diverged`` / ``n/a`` when there is no number."""
    if row.get("mean") is None:
        return "diverged" if row.get("diverged") else "n/a"
    text = f"{row['mean']:.{digits}f} ± {row['std'] or 0.0:.{digits}f}"
    if row.get("diverged"):
        text += " (some seeds diverged)"
    if row.get("collapsed"):
        text += f" {COLLAPSE_MARK}"
    return text


def _percent_text(p: float) -> str:
    return f"{int(p)}%" if float(p).is_integer() else f"{p:g}%"


def _methods(rows: list[dict[str, Any]]) -> list[str]:
    seen: list[str] = []
    for r in rows:
        if r["method"] not in seen:
            seen.append(r["method"])
    return seen


def _groups(rows: list[dict[str, Any]]) -> list[tuple[str, str, float]]:
    out: list[tuple[str, str, float]] = []
    for r in rows:
        g = (r["downstream"], r["protocol"], r["percent"])
        if g not in out:
            out.append(g)
    return out


def markdown_table(rows: list[dict[str, Any]], methods: list[str] | None = None) -> str:
    """Pivot: one line per (downstream, protocol, labels), one column per method."""
    methods = methods or _methods(rows)
    cells = {(r["downstream"], r["protocol"], r["percent"], r["method"]): r for r in rows}
    head = ["downstream", "protocol", "labels", *methods]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for d, p, q in _groups(rows):
        vals = [format_cell(cells[(d, p, q, m)]) if (d, p, q, m) in cells else "" for m in methods]
        lines.append("| " + " | ".join([d, p, _percent_text(q), *vals]) + " |")
    text = "\n".join(lines) + "\n"
    if any(r["collapsed"] for r in rows):
        text += f"\n{COLLAPSE_MARK} collapsed: the probe predicts one class for at least 90% of the test images.\n"
    return text


def csv_text(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(CSV_FIELDS), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({**{k: r[k] for k in CSV_FIELDS if k != "accuracies"},
                         "mean": "" if r["mean"] is None else f"{r['mean']:.4f}",
                         "std": "" if r["std"] is None else f"{r['std']:.4f}",
                         "accuracies": " ".join(f"{a:.4f}" for a in r["accuracies"])})
    return buf.getvalue()


def bar_chart(rows: list[dict[str, Any]], path: str | os.PathLike, title: str = "linear-probe accuracy") -> Path:
    """Grouped bars (groups: downstream/protocol/labels; bars: methods) with std error bars, as PNG.

    The accuracy axis spans the results (with a margin), not 0-100, so differences of a point show; bars
    rise from the axis floor, which the axis label states. The legend sits outside the plot.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    path = Path(path)
    methods = _methods(rows)
    groups = _groups(rows)
    cells = {(r["downstream"], r["protocol"], r["percent"], r["method"]): r for r in rows}
    shown = [r for r in rows if r["mean"] is not None]
    low = min((r["mean"] - (r["std"] or 0.0) for r in shown), default=0.0)
    high = max((r["mean"] + (r["std"] or 0.0) for r in shown), default=100.0)
    pad = max(0.5, 0.15 * (high - low))
    floor = float(max(0, math.floor(low - pad)))
    fig = Figure(figsize=(max(6.5, 2.6 + 0.35 * len(groups) * max(1, len(methods))), 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(methods))
    for j, method in enumerate(methods):
        xs, heights, errs, hatches = [], [], [], []
        for i, (d, p, q) in enumerate(groups):
            r = cells.get((d, p, q, method))
            if r is None or r["mean"] is None:
                continue
            xs.append(i - 0.4 + width * (j + 0.5))
            heights.append(r["mean"] - floor)
            errs.append(r["std"] or 0.0)
            hatches.append("//" if r["collapsed"] else "")
        bars = ax.bar(xs, heights, width, bottom=floor, yerr=errs, capsize=3, color=f"C{j % 10}",
                      error_kw={"elinewidth": 1.0, "ecolor": "black"})
        for bar, hatch in zip(bars, hatches):
            bar.set_hatch(hatch)
    ax.set_ylim(floor, min(100.0, high + pad) if high + pad > floor else floor + 1)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{d}\n{p} {_percent_text(q)}" for d, p, q in groups], fontsize=8)
    ax.set_ylabel(f"test accuracy (%), axis from {floor:.1f}")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.set_title(title + " — mean ± std over seeds" + (" (hatched: collapsed)" if any(r["collapsed"] for r in rows)
                                                       else ""), fontsize=10)
    if methods:  # plain legend patches: a hatched first bar must not make a method look collapsed
        ax.legend([Patch(facecolor=f"C{j % 10}") for j in range(len(methods))], methods, fontsize=8,
                  loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, title="method",
                  title_fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


def write_tables(results: Mapping[str, Mapping[str, Any]], out_dir: str | os.PathLike,
                 stem: str = "results") -> dict[str, Path]:
    """``<out_dir>/<stem>.md``, ``.csv`` and ``.png`` from ``{method: results.json dict}``."""
    if not results:
        raise MkdtError("write_tables: no results given; pass {method: results.json dict}")
    rows = results_table(results)
    out = Path(out_dir)
    paths = {"markdown": out / f"{stem}.md", "csv": out / f"{stem}.csv", "png": out / f"{stem}.png"}
    atomic_write_text(paths["markdown"], markdown_table(rows))
    atomic_write_text(paths["csv"], csv_text(rows))
    bar_chart(rows, paths["png"])
    return paths

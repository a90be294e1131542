"""The run report: one self-contained HTML file (images embedded) plus the same table in markdown.

It shows the result table (method x downstream x labelled %), the synthetic images next to the
initial ones, the distillation loss curve, the learned lr, and the time and peak memory of every step.
It only reads what the stages wrote (``pipeline.json``, ``probe/<method>/results.json``, the distill
folder), so it can be regenerated at any time.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any, Mapping

from mkdt.artifacts import atomic_write_text, load_json
from mkdt.layout import RunLayout


def _image_tag(path: Path, caption: str) -> str:
    if not path.is_file():
        return f"<p><em>{html.escape(caption)}: not available</em></p>"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def probe_results(layout: RunLayout, methods: list[str]) -> dict[str, Any]:
    results = {}
    for method in methods:
        path = layout.probe_results(method)
        if path.is_file():
            results[method] = load_json(path)
    return results


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
    lines = ["| step | seconds | peak RSS (MB) |", "|---|---:|---:|"]
    steps = state.get("steps", {})
    for name in state.get("order", list(steps)):
        m = steps.get(name, {}).get("measure") or {}
        lines.append(f"| {name} | {m.get('seconds', float('nan')):.1f} | {m.get('peak_mb', float('nan')):.0f} |")
    return "\n".join(lines)


def write_report(out: str | Path, state: Mapping[str, Any]) -> dict[str, Path]:
    """Write ``<out>/report.html`` and ``<out>/report.md``; returns their paths."""
    from mkdt.evaluate import markdown_table, results_table, write_tables

    out = Path(out)
    layout = RunLayout(out)
    methods = list(state.get("methods", []))
    results = probe_results(layout, methods)
    table_md = "(no probe results)"
    if results:
        rows = results_table(results)
        table_md = markdown_table(rows, [m for m in methods if m in results])
        write_tables(results, layout.report_files)
    distill = layout.distill_dir()
    summary = (state.get("steps", {}).get("distill") or {}).get("summary", {})
    lr = summary.get("final_lr")
    change = summary.get("mean_abs_pixel_change")
    facts = [f"learned inner lr: {lr:.4g}" if isinstance(lr, (int, float)) else "learned inner lr: n/a",
             f"mean absolute pixel change from the initial set: {change:.4f}"
             if isinstance(change, (int, float)) else "mean absolute pixel change: n/a",
             f"total pipeline time this invocation: {state.get('seconds', 0):.1f} s"]
    times = stage_table(state)
    md = "\n\n".join([
        f"# mkdt run report: {out}",
        "## Linear-probe accuracy (%)", table_md,
        "## Distillation", "\n".join(f"- {f}" for f in facts),
        "Images: `distill/grid_initial.png` (initial) and `distill/grid_distilled.png` (distilled); "
        "loss curve: `distill/loss.png`.",
        "## Time and peak memory per step", times,
    ]) + "\n"
    body = "\n".join([
        f"<h1>mkdt run report</h1><p><code>{html.escape(str(out))}</code></p>",
        "<h2>Linear-probe accuracy (%)</h2>", _md_to_html_table(table_md),
        "<h2>Distillation</h2><ul>" + "".join(f"<li>{html.escape(f)}</li>" for f in facts) + "</ul>",
        '<div class="row">', _image_tag(distill / "grid_initial.png", "initial synthetic set"),
        _image_tag(distill / "grid_distilled.png", "distilled synthetic set"), "</div>",
        _image_tag(distill / "loss.png", "distillation loss"),
        "<h2>Time and peak memory per step</h2>", _md_to_html_table(times),
    ])
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>mkdt report</title><style>"
            "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}.row{display:flex;gap:2em}"
            "img{max-width:500px;image-rendering:pixelated}</style></head><body>" + body + "</body></html>\n")
    paths = {"html": layout.report_html, "markdown": layout.report_md}
    atomic_write_text(paths["html"], page)
    atomic_write_text(paths["markdown"], md)
    return paths

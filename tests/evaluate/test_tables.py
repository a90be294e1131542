"""Result tables: markdown pivot, CSV, PNG, collapse and divergence marks, bad input."""

from __future__ import annotations

import csv
import io

import pytest

from mkdt.errors import MkdtError
from mkdt.evaluate import format_cell, markdown_table, results_table, write_tables
from mkdt.evaluate.probing import summarise


def fake_results(accs_by_key, collapsed=()):
    """A results dict as probe() writes it, from {(downstream, protocol, percent): [acc per seed]}."""
    runs = []
    for (d, p, q), accs in accs_by_key.items():
        for seed, a in enumerate(accs):
            runs.append({"downstream": d, "protocol": p, "percent": q, "seed": seed, "accuracy": a,
                         "collapsed": (d, p, q) in collapsed, "diverged": a is None})
    return {"runs": runs, "summary": summarise(runs)}


def two_methods():
    mkdt = fake_results({("cifar10", "paper", 1.0): [41.0, 42.0, 43.0], ("cifar10", "paper", 5.0): [53.0, 54.0, 55.0],
                         ("digits", "converged", 1.0): [80.0, 82.0, 84.0]})
    rand = fake_results({("cifar10", "paper", 1.0): [12.0, 12.5, 12.9], ("cifar10", "paper", 5.0): [48.0, 49.0, 50.0],
                         ("digits", "converged", 1.0): [None, 70.0, 71.0]},
                        collapsed={("cifar10", "paper", 1.0)})
    return {"mkdt": mkdt, "random": rand}


def test_rows_and_markdown_pivot():
    rows = results_table(two_methods())
    assert len(rows) == 6
    row = next(r for r in rows if r["method"] == "mkdt" and r["percent"] == 1.0 and r["downstream"] == "cifar10")
    assert row["mean"] == pytest.approx(42.0) and row["std"] == pytest.approx(1.0) and row["n"] == 3
    md = markdown_table(rows)
    lines = md.splitlines()
    assert lines[0] == "| downstream | protocol | labels | mkdt | random |"
    assert "| cifar10 | paper | 1% | 42.00 ± 1.00 | 12.47 ± 0.45 ⚠ |" in lines
    assert "collapsed" in md.split("\n\n")[-1]  # legend explains the mark


def test_collapsed_and_diverged_cells_are_never_plain_numbers():
    assert format_cell({"mean": 12.3, "std": 0.4, "collapsed": True}) == "12.30 ± 0.40 ⚠"
    assert format_cell({"mean": None, "std": None, "diverged": True}) == "diverged"
    assert "diverged" in format_cell({"mean": 70.5, "std": 0.7, "diverged": True})


def test_write_tables_markdown_csv_png(tmp_path):
    paths = write_tables(two_methods(), tmp_path / "out")
    assert set(paths) == {"markdown", "csv", "png"}
    rows = list(csv.DictReader(io.StringIO(paths["csv"].read_text())))
    assert len(rows) == 6
    collapsed = [r for r in rows if r["collapsed"] == "True"]
    assert len(collapsed) == 1 and collapsed[0]["method"] == "random"
    assert rows[0].keys() >= {"method", "downstream", "protocol", "percent", "mean", "std", "n"}
    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert "mkdt" in paths["markdown"].read_text()


def test_bad_input_is_an_error(tmp_path):
    with pytest.raises(MkdtError, match="no results"):
        write_tables({}, tmp_path)
    with pytest.raises(MkdtError, match="summary"):
        write_tables({"x": {"runs": []}}, tmp_path)

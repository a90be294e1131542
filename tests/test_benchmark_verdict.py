"""The CIFAR-10 / second-source benchmark's judgement: the variant must beat MKDT by >= 2 points AND the
spread; the share of full-data pre-training's gain is computed against no pre-training and the random subset."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import cifar10_cpu as bench  # noqa: E402


def cell(mean, std=0.5):
    return {"mean": mean, "std": std, "seeds": [mean] * 3}


def results(variant_1pct, variant_5pct):
    def method(one, five):
        return {"cifar10": {"paper": {"1": cell(one), "5": cell(five)}}}

    return {"none": method(30.0, 35.0), "random": method(34.0, 41.0), "mkdt": method(36.0, 44.0),
            "full": method(46.0, 52.0), bench.VARIANT: method(variant_1pct, variant_5pct)}


def test_variant_must_beat_mkdt_by_two_points_and_the_spread():
    rows = {(r["method"], r["versus"], r["label_percent"]): r for r in bench.verdict(results(38.5, 45.5), "cifar10")}
    assert rows[("mkdt", "random", "1")]["beats"] and rows[("mkdt", "random", "1")]["difference"] == 2.0
    one, five = rows[(bench.VARIANT, "mkdt", "1")], rows[(bench.VARIANT, "mkdt", "5")]
    assert one["difference"] == 2.5 and one["beats"]
    assert five["difference"] == 1.5 and not five["beats"]  # beyond the spread (1.0) but under 2 points
    noisy = {**results(38.5, 46.1), "mkdt": {"cifar10": {"paper": {"1": cell(36.0, 2.5), "5": cell(44.0)}}}}
    one = next(r for r in bench.verdict(noisy, "cifar10") if r["method"] == bench.VARIANT and r["label_percent"] == "1")
    assert one["difference"] == 2.5 and one["spread"] == 3.0 and not one["beats"]  # 2.5 points, within the spread
    assert bench.compare(results(38.5, 46.1), "cifar10", bench.VARIANT, "mkdt", margin=3.0)[0]["beats"] is False


def test_share_of_full_data_gain_kept():
    rows = bench.gains_kept(results(41.0, 47.0), ("cifar10",))
    variant = next(r for r in rows if r["method"] == bench.VARIANT and r["label_percent"] == "1")
    assert variant["full_minus_none"] == 16.0 and variant["of_full_over_none"] == pytest.approx(11 / 16, abs=1e-3)
    assert variant["full_minus_random"] == 12.0 and variant["of_full_over_random"] == pytest.approx(7 / 12, abs=1e-3)
    mkdt = next(r for r in rows if r["method"] == "mkdt" and r["label_percent"] == "5")
    assert mkdt["of_full_over_random"] == pytest.approx(3 / 11, abs=1e-3)
    same = bench.gains_kept({**results(41.0, 47.0), "full": results(41.0, 47.0)["random"]}, ("cifar10",))
    assert all(r["of_full_over_random"] is None for r in same)  # full = random: no gain to keep


def test_markdown_names_the_variant_and_the_source():
    report = {"date": "d", "command": "c", "source": "fashion-mnist", "results": results(41.0, 47.0),
              "verdict": bench.verdict(results(41.0, 47.0), "cifar10"), "stages": {},
              "gains_kept": bench.gains_kept(results(41.0, 47.0), ("cifar10",)),
              "variant_cost": bench.variant_cost({"distill": {"seconds": 900.0}, f"subset/{bench.VARIANT}": {"seconds": 18.0}})}
    text = bench.markdown(report)
    assert text.startswith("## Fashion-MNIST as the source") and bench.VARIANT in text
    assert "0.02x MKDT's distillation" in text and "| 69% |" in text

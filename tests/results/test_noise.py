"""Honest accuracy: standard errors, per-image correctness, paired comparisons and what the report says of them."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from flora_ray.results import (
    binomial_se,
    compare_paired,
    pack_correct,
    paired_difference,
    unpack_correct,
    within_noise,
)
from flora_ray.stages.report import build_report
from flora_ray.storage.run_store import ARTEFACTS, RunStore


def test_binomial_se_in_accuracy_points():
    assert binomial_se(85.0, 6000) == pytest.approx(100 * math.sqrt(0.85 * 0.15 / 6000))  # 0.461 pt
    assert binomial_se(100.0, 10) == 0.0 and binomial_se(50.0, 1) == pytest.approx(50.0)
    with pytest.raises(ValueError, match="n=0 must be at least 1"):
        binomial_se(50.0, 0)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 6000])
def test_correctness_packs_into_a_string_and_back(n):
    correct = np.random.default_rng(n).random(n) < 0.8
    packed = pack_correct(correct)
    assert isinstance(packed, str) and len(packed) <= 4 * math.ceil(math.ceil(n / 8) / 3)  # base64 of n/8 bytes
    np.testing.assert_array_equal(unpack_correct(packed, n), correct)
    with pytest.raises(ValueError, match="holds"):
        unpack_correct(packed, 8 * math.ceil(n / 8) + 1)


def test_paired_difference_is_the_mean_and_standard_error_of_per_image_differences():
    rng = np.random.default_rng(0)
    a = rng.random(2000) < 0.85
    b = a.copy()
    flip = rng.choice(2000, 60, replace=False)  # b differs from a on 60 images
    b[flip] = ~b[flip]
    difference, se = paired_difference(a, b)
    d = a.astype(float) - b.astype(float)  # +1, 0 or -1 per image
    assert difference == pytest.approx(100 * d.mean())
    assert se == pytest.approx(100 * d.std() / math.sqrt(len(d)))  # sqrt(b + c - (b - c)^2 / n) / n
    # Pairing is what makes close subnets comparable: far below two independent binomial errors.
    unpaired = math.hypot(binomial_se(100 * a.mean(), 2000), binomial_se(100 * b.mean(), 2000))
    assert se < unpaired / 2.5  # 3% of the images discordant: 0.39 against 1.15 pt
    assert paired_difference(a, a) == (0.0, 0.0) and within_noise(0.0, 0.0)
    with pytest.raises(ValueError, match="need the same images"):
        paired_difference(a, b[:-1])


def test_within_noise_uses_two_standard_errors():
    assert within_noise(0.3, 0.2) and within_noise(-0.39, 0.2)
    assert not within_noise(0.41, 0.2) and not within_noise(-0.5, 0.2) and not within_noise(0.1, 0.0)


def _row(accuracy_correct, macs, **extra):
    n = len(accuracy_correct)
    accuracy = 100.0 * float(np.mean(accuracy_correct))
    return {
        "macs": float(macs) * 1e6,
        "params": 1e5,
        "latency_ms": math.nan,
        "accuracy": accuracy,
        "accuracy_se": binomial_se(accuracy, n),
        "eval_images": n,
        "correct": pack_correct(accuracy_correct),
        **extra,
    }


def _write_run(tmp_path, front_rows, uniform_rows, dense_accuracy, legacy=False):
    store = RunStore(tmp_path / "run")
    front = pd.DataFrame([{"trial": i, **r} for i, r in enumerate(front_rows)])
    uniform = pd.DataFrame(uniform_rows)
    if legacy:  # a run from before per-image results were recorded
        front = front.drop(columns=["accuracy_se", "eval_images", "correct"])
        uniform = uniform.drop(columns=["accuracy_se", "eval_images", "correct"])
    store.write_parquet(ARTEFACTS.pareto, front, {})
    store.write_parquet(ARTEFACTS.trials, front, {})
    store.write_parquet(ARTEFACTS.uniform, uniform, {})
    summary = {"dense_accuracy": dense_accuracy, "dense_macs": 100e6, "cost_axis": "macs", "complete": 2,
               "trials": 2, "failed": 0, "trials_per_second": 1.0}  # fmt: skip
    store.write_json(ARTEFACTS.search_summary, summary)
    return store


def _vectors(n=4000, seed=0):
    rng = np.random.default_rng(seed)
    dense = rng.random(n) < 0.86
    return rng, dense


def test_report_says_whether_each_gain_is_within_noise(tmp_path):
    rng, dense = _vectors()
    # uniform: dense with 20 images wrong; front: uniform with 10 images changed (5 lost, 5 gained) -> within noise.
    uniform = dense.copy()
    uniform[np.flatnonzero(dense)[:20]] = False
    front = uniform.copy()
    front[np.flatnonzero(uniform)[:5]] = False
    front[np.flatnonzero(~uniform)[:5]] = True
    store = _write_run(
        tmp_path,
        [_row(front, 60)],
        [_row(uniform, 80, ratio=0.5), _row(dense, 100, ratio=1.0), _row(rng.random(4000) < 0.5, 30, ratio=0.25)],
        100.0 * dense.mean(),
    )
    text, figures = build_report(store)
    line = next(x for x in text.splitlines() if x.startswith("- within 1 pt"))
    assert "**+25.0%** less macs" in line and "front - uniform +0.00 ± 0.08 pt (paired), within noise" in line
    assert "front 60.00 MMACs (86.15% ± 0.55), uniform 80.00 MMACs (86.15% ± 0.55)" in line
    # 4000 images: the front point's 0.50 pt margin over the target is within 2 SE (0.55 pt each).
    assert "close call: the front point clears the target by 0.50 pt" in line
    assert "SE = sqrt(b + c - (b - c)^2 / n) / n" in text and "below 2 SE" in text
    paired = figures["gain_noise"]["1.0"]["paired"]
    assert (
        paired["within_noise"]
        and paired["difference"] == 0.0
        and paired["se"] == pytest.approx(100 * math.sqrt(10) / 4000)
    )
    assert figures["gain_noise"]["1.0"]["close_calls"] == ["front"]


def test_report_flags_a_less_accurate_front_point_and_close_calls(tmp_path):
    _, dense = _vectors(seed=1)
    uniform = dense.copy()
    front = dense.copy()
    front[np.flatnonzero(dense)[:30]] = False  # 0.75 pt below dense and uniform, paired SE 0.14 pt
    near = dense.copy()
    near[np.flatnonzero(dense)[:42]] = False  # 1.05 pt below dense: misses the 1-pt target by 0.05 pt
    store = _write_run(
        tmp_path, [_row(front, 60)], [_row(uniform, 100, ratio=1.0), _row(near, 70, ratio=0.5)], 100.0 * dense.mean()
    )
    text, figures = build_report(store)
    line = next(x for x in text.splitlines() if x.startswith("- within 1 pt"))
    assert "beyond noise: the front point is less accurate, part of the gain is paid in accuracy" in line
    assert "**+40.0%** less macs" in line and "front - uniform -0.75 ± 0.14 pt (paired)" in line
    assert "close call: uniform 70.00 MMACs misses the target by 0.05 pt (with it the gain would be +14.3%)" in line
    assert figures["gain_noise"]["1.0"]["close_calls"] == ["front", "uniform"]  # the front clears it by 0.25 pt
    assert "front none reaches it" in next(x for x in text.splitlines() if x.startswith("- within 0.5 pt"))


def test_report_of_a_run_without_per_image_results(tmp_path):
    _, dense = _vectors(seed=2)
    store = _write_run(tmp_path, [_row(dense, 60)], [_row(dense, 100, ratio=1.0)], 100.0 * dense.mean(), legacy=True)
    text, figures = build_report(store)
    assert "(paired)" not in text and "± " not in text.split("## Gain")[1].split("Noise:")[0]
    assert figures["gain_noise"]["1.0"] == {"paired": None, "close_calls": []}
    assert json.dumps(figures, default=float)


def test_compare_paired_needs_per_image_results_on_the_same_images():
    _, dense = _vectors(seed=3)
    a, b = pd.Series(_row(dense, 60)), pd.Series(_row(~dense, 80))
    assert compare_paired(a, b)["difference"] == pytest.approx(100 * (2 * dense.mean() - 1))
    assert compare_paired(a, pd.Series(_row(dense[:-1], 80))) is None  # another number of images
    assert compare_paired(a, b.drop("correct")) is None  # a row of an older run


def test_report_gives_the_accuracy_advantage_at_fixed_budgets(tmp_path):
    _, dense = _vectors(seed=2)
    low = dense.copy()
    low[np.flatnonzero(dense)[:200]] = False  # uniform at 24 MMACs: 5 pt below dense
    better = low.copy()
    better[np.flatnonzero(~low)[:100]] = True  # front at 22 MMACs: 2.5 pt above it, paired
    mid = dense.copy()
    mid[np.flatnonzero(dense)[:40]] = False  # uniform at 45 MMACs: 1 pt below dense, and the front at 30 the same
    store = _write_run(
        tmp_path,
        [_row(better, 22), _row(mid, 30)],
        [_row(low, 24, ratio=0.125), _row(mid, 45, ratio=0.25), _row(dense, 100, ratio=1.0)],
        100.0 * dense.mean(),
    )
    text, figures = build_report(store)
    assert "## Accuracy at fixed budgets" in text
    lines = {x.split(" (")[0]: x for x in text.splitlines() if x.startswith("- at most")}
    quarter = lines["- at most 25% of dense"]
    assert "front" in quarter and "(ratio 0.125): **+2.50 pt**" in quarter and "beyond noise" in quarter
    third = figures["advantage_at_budget"]["0.3333"]
    # 33 MMACs: the front's 30-MMAC point against uniform 24 MMACs (the only one that cheap): +4 pt.
    assert third["advantage"] == pytest.approx(100.0 * (mid.mean() - low.mean()))
    assert third["paired"]["difference"] == pytest.approx(third["advantage"])
    half = figures["advantage_at_budget"]["0.5"]
    assert half["advantage"] == pytest.approx(0.0) and half["paired"]["within_noise"]
    # The drops reported are 0.5, 1, 2 and 3 points.
    assert "- within 3 pt" in text and figures["gain_over_uniform"].keys() == {"0.5", "1.0", "2.0", "3.0"}

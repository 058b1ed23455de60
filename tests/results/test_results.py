"""Front utilities against brute force and hand-made fronts with known answers."""

import numpy as np
import pandas as pd
import pytest

from flora_ray.results import (
    accuracy_advantage,
    best_under,
    bootstrap_interval,
    gain_over_uniform,
    gain_table,
    hypervolume,
    kendall_tau,
    knee_point,
    pareto_mask,
    spearman_rho,
)


def brute_force_pareto(df):
    macs, acc = df["macs"].to_numpy(), df["accuracy"].to_numpy()
    out = []
    for i in range(len(df)):
        dominated = any(
            macs[j] <= macs[i] and acc[j] >= acc[i] and (macs[j] < macs[i] or acc[j] > acc[i]) for j in range(len(df))
        )
        out.append(not dominated)
    return np.array(out)


@pytest.mark.parametrize("seed", range(5))
def test_pareto_mask_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"macs": rng.integers(1, 30, 200), "accuracy": rng.integers(50, 90, 200).astype(float)})
    np.testing.assert_array_equal(pareto_mask(df), brute_force_pareto(df))


def test_pareto_mask_handles_nan_and_duplicates():
    df = pd.DataFrame({"macs": [1, 1, 2, 3, 2], "accuracy": [50.0, 50.0, np.nan, 60.0, 55.0]})
    assert pareto_mask(df).tolist() == [True, True, False, True, True]


def test_hypervolume_of_known_fronts():
    df = pd.DataFrame({"macs": [2.0, 4.0, 6.0], "accuracy": [70.0, 80.0, 90.0]})
    # Box up to macs 10 and down to accuracy 60: staircase 8*10 + 6*10 + 4*10.
    assert hypervolume(df, (10.0, 60.0)) == pytest.approx(180.0)
    dominated = pd.concat([df, pd.DataFrame({"macs": [5.0], "accuracy": [75.0]})])
    assert hypervolume(dominated, (10.0, 60.0)) == pytest.approx(180.0)
    assert hypervolume(df, (3.0, 75.0)) == pytest.approx(0.0)
    assert hypervolume(df.iloc[:1], (10.0, 60.0)) == pytest.approx(80.0)


def test_best_under():
    df = pd.DataFrame({"macs": [2, 4, 6, 4], "accuracy": [70.0, 80.0, 90.0, 80.0], "trial": [0, 1, 2, 3]})
    assert best_under(df, 5)["trial"] == 1
    assert best_under(df, 100)["trial"] == 2
    assert best_under(df, 1) is None


def test_gain_over_uniform_known_answers():
    uniform = pd.DataFrame({"macs": [25.0, 50.0, 75.0, 100.0], "accuracy": [70.0, 85.0, 89.5, 90.0]})
    front = pd.DataFrame({"macs": [30.0, 40.0, 60.0], "accuracy": [80.0, 89.0, 90.0]})
    # Within 1 point of 90: uniform needs 75 (89.5), the front 40 (89.0): 1 - 40/75.
    assert gain_over_uniform(front, uniform, 1.0) == pytest.approx(1 - 40 / 75)
    # Within 0.5 points: uniform 75, front 60.
    assert gain_over_uniform(front, uniform, 0.5) == pytest.approx(1 - 60 / 75)
    # An explicit reference (say the dense model at 91): target 90.5, the front never reaches it.
    assert gain_over_uniform(front, uniform, 0.5, reference_accuracy=91.0) is None
    with pytest.raises(ValueError, match="max_accuracy_drop=-1"):
        gain_over_uniform(front, uniform, -1)
    with pytest.raises(ValueError, match="no column 'macs'"):
        gain_over_uniform(front.drop(columns="macs"), uniform, 1)


def test_knee_point_is_the_bend_of_the_front():
    # A front that gains 9 of its 10 points by 20% of its cost range: the bend is at (20, 89).
    front = pd.DataFrame({"macs": [0, 10, 20, 60, 100], "accuracy": [80, 85, 89, 89.5, 90], "trial": range(5)})
    assert knee_point(front)["trial"] == 2
    # Dominated rows are ignored (this one would stretch the cost axis and end the front at 85%).
    noisy = pd.concat([front, pd.DataFrame({"macs": [200], "accuracy": [85], "trial": [9]})])
    assert knee_point(noisy)["trial"] == 2
    skewed = pd.concat([front, pd.DataFrame({"macs": [5], "accuracy": [88.5], "trial": [7]})])
    assert knee_point(skewed)["trial"] == 7  # (5, 88.5) is now the sharpest bend
    assert knee_point(front.iloc[[0, 4]])["trial"] == 4  # two points: the most accurate
    with pytest.raises(ValueError, match="front is empty"):
        knee_point(front.iloc[:0])


def _frames() -> tuple[pd.DataFrame, pd.DataFrame]:
    # dense: 100 MACs at 90%. Uniform ratios 1/8, 1/4, 1/2, 1: 25, 40, 70, 100 MACs.
    uniform = pd.DataFrame(
        {"ratio": [0.125, 0.25, 0.5, 1.0], "macs": [25.0, 40.0, 70.0, 100.0], "accuracy": [84.0, 87.5, 89.2, 90.0]}
    )
    front = pd.DataFrame(
        {"trial": [3, 7, 9, 11], "macs": [20.0, 30.0, 45.0, 60.0], "accuracy": [85.0, 87.8, 89.0, 89.6]}
    )
    return front, uniform


def test_gain_table_drops_and_budgets_known_answers():
    front, uniform = _frames()
    table = gain_table(front, uniform, reference_accuracy=90.0, dense_cost=100.0)
    drops = table[table["kind"] == "drop"].set_index("value")
    # 0.5 pt (>= 89.5): front 60 MACs (trial 11), uniform 100 (full rank): 40% fewer.
    assert drops.loc[0.5, "front_macs"] == 60.0 and drops.loc[0.5, "front_trial"] == 11
    assert drops.loc[0.5, "uniform_macs"] == 100.0 and drops.loc[0.5, "gain"] == pytest.approx(0.4)
    # 1 pt (>= 89.0): front 45, uniform 70 (ratio 1/2, 89.2%).
    assert drops.loc[1.0, "uniform_ratio"] == 0.5 and drops.loc[1.0, "gain"] == pytest.approx(1 - 45 / 70)
    # 2 pt (>= 88.0): front 45 (87.8 falls short), uniform 70.
    assert drops.loc[2.0, "front_macs"] == 45.0 and drops.loc[2.0, "gain"] == pytest.approx(1 - 45 / 70)
    # 3 pt (>= 87.0): front 30, uniform 40: 25% fewer.
    assert drops.loc[3.0, "gain"] == pytest.approx(0.25) and drops.loc[3.0, "target"] == 87.0
    budgets = table[table["kind"] == "budget"].set_index("value")
    # 25% of dense: front 20 MACs at 85.0 against uniform 25 at 84.0: +1 point.
    assert budgets.loc[0.25, "gain"] == pytest.approx(1.0) and budgets.loc[0.25, "target"] == 25.0
    # 1/3: front 87.8 (30 MACs) against uniform 84.0 (25 MACs).
    assert budgets.loc[1 / 3, "gain"] == pytest.approx(3.8)
    # 1/2: front 89.0 (45) against uniform 87.5 (40).
    assert budgets.loc[0.5, "gain"] == pytest.approx(1.5) and budgets.loc[0.5, "uniform_ratio"] == 0.25


def test_gain_table_marks_what_neither_side_reaches():
    front, uniform = _frames()
    table = gain_table(front, uniform, 90.0, 100.0, drops=(0.0,), budgets=(0.15, 0.22))
    # Nobody reaches 90.0 but uniform full rank; the front has nothing: no gain to report.
    assert np.isnan(table.loc[0, "gain"]) and np.isnan(table.loc[0, "front_macs"])
    assert table.loc[0, "uniform_macs"] == 100.0
    # 15%: neither side; 22%: the front only (20 MACs), uniform has nothing that cheap.
    assert table["gain"].iloc[1:].isna().all()
    assert table.loc[2, "front_macs"] == 20.0 and np.isnan(table.loc[2, "uniform_macs"])
    assert accuracy_advantage(front, uniform, 22.0) is None


def test_gain_table_follows_the_cost_axis():
    front, uniform = _frames()
    front["latency_ms"], uniform["latency_ms"] = front["macs"] / 10, uniform["macs"] / 10
    table = gain_table(front, uniform, 90.0, 10.0, cost="latency_ms")
    assert "front_latency_ms" in table and "front_macs" not in table
    assert table.set_index(["kind", "value"]).loc[("drop", 3.0), "gain"] == pytest.approx(0.25)


def test_rank_correlations_hand_computed():
    # x = 1..5, y = 1, 3, 2, 5, 4: pairs (10) with 2 discordant -> tau = (8 - 2) / 10 = 0.6.
    # Rank differences 0, -1, 1, -1, 1: rho = 1 - 6 * 4 / (5 * 24) = 0.8.
    x, y = [1, 2, 3, 4, 5], [1, 3, 2, 5, 4]
    assert kendall_tau(x, y) == pytest.approx(0.6)
    assert spearman_rho(x, y) == pytest.approx(0.8)
    assert kendall_tau(x, x[::-1]) == pytest.approx(-1.0) and spearman_rho(x, x[::-1]) == pytest.approx(-1.0)
    # tau-b with ties: x = 1, 2, 2, 3; y = 1, 2, 3, 3. Concordant 4 (12, 13, 14, 24), discordant 0; untied pairs:
    # x 5 (all but 23), y 5 (all but 34): tau-b = 4 / sqrt(5 * 5) = 0.8.
    assert kendall_tau([1, 2, 2, 3], [1, 2, 3, 3]) == pytest.approx(0.8)
    assert np.isnan(kendall_tau([1, 1, 1], [1, 2, 3])) and np.isnan(spearman_rho([1, 2, 3], [4, 4, 4]))
    with pytest.raises(ValueError, match="equal length"):
        kendall_tau([1, 2, 3], [1, 2])


def test_rank_correlations_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(3)
    x = rng.integers(0, 8, size=40).astype(float)  # many ties
    y = x + rng.normal(0, 3, size=40)
    assert kendall_tau(x, y) == pytest.approx(stats.kendalltau(x, y).statistic)
    assert spearman_rho(x, y) == pytest.approx(stats.spearmanr(x, y).statistic)


def test_bootstrap_interval_brackets_the_estimate_and_narrows_with_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    y = x + rng.normal(scale=1.0, size=200)
    low, high = bootstrap_interval(x, y, kendall_tau, resamples=500)
    assert low < kendall_tau(x, y) < high and low > 0 and high < 1
    small_low, small_high = bootstrap_interval(x[:20], y[:20], kendall_tau, resamples=500)
    assert small_high - small_low > high - low
    # A perfect ranking stays perfect under every resample (ties from repeated pairs are tied in both).
    assert bootstrap_interval(x, 2 * x, spearman_rho, resamples=100) == pytest.approx((1.0, 1.0))


def test_the_report_says_where_a_front_point_is_a_uniform_configuration():
    import json

    from flora_ray.stages.report import uniform_itself

    half = {"a": 2, "b": 4}
    uniform = pd.DataFrame({"ratio": [0.5, 1.0], "ranks": [json.dumps(half), json.dumps({"a": 4, "b": 8})]})
    same = pd.Series({"ranks": json.dumps(dict(reversed(list(half.items())))), "macs": 1.0})  # key order differs
    assert uniform_itself(same, uniform) == "; the front's point is uniform 0.5 itself: the search found nothing better"
    assert uniform_itself(pd.Series({"ranks": json.dumps({"a": 1, "b": 4})}), uniform) == ""
    assert uniform_itself(None, uniform) == ""

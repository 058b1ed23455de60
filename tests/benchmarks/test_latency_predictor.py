"""Smoke run of the latency predictor benchmark: its JSON has every figure, finite and consistent with the per-subnet
rows (the targets themselves are not checked: they need a quiet machine and the full run)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import kendalltau

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "experiments" / "benchmarks" / "latency_predictor.py"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("latency_predictor")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--output", str(out), "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
        cwd=ROOT,
    )
    assert proc.returncode == 0, f"latency_predictor failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout, json.loads((out / "latency_predictor.json").read_text())


def _finite(*values):
    return all(isinstance(v, int | float) and math.isfinite(v) for v in values)


def test_smoke_environment_and_summary(smoke):
    stdout, result = smoke
    assert result["smoke"] is True
    assert result["date"] and result["machine"] and len(result["loadavg"]) == 3 and len(result["loadavg_before"]) == 3
    settings = result["settings"]
    assert result["threads"] == 1 and settings["random"] == 6 and settings["rounds"] == settings["table_rounds"] == 2
    rows = result["rows"]
    assert [(r["workload"], r["batch"]) for r in rows] == [("quickstart-vit", 1), ("quickstart-vit", 4)]
    summary = result["summary"]
    assert summary["settings"] == 2 and _finite(summary["worst_mape"], summary["worst_tau"], summary["seconds"])
    assert summary["worst_mape"] == max(r["mape"] for r in rows)
    assert summary["all_met"] == all(r["mape_target_met"] and r["tau_target_met"] for r in rows)
    assert "MAPE" in stdout and "tau" in stdout


def test_smoke_rows_have_finite_figures(smoke):
    _, result = smoke
    for r in result["rows"]:
        assert r["subnets"] == 10 and r["random_subnets"] == 6  # 4 uniform ratios + 6 random
        for errors in (r, r["raw"], r["held_out"], r["hindsight_affine"]):
            assert _finite(errors["mape"], errors["max_abs_pct_error"], errors["kendall_tau"])
            assert errors["mape"] >= 0 and -1 <= errors["kendall_tau"] <= 1
        calib = r["calibration"]
        assert calib["kind"] in calib["leave_one_out_mape"] and calib["kind"] in ("offset", "affine")
        assert _finite(calib["scale"], calib["offset_ms"], calib["chosen_leave_one_out_mape"], calib["fit_mape"])
        assert len(calib["points"]) == 1 + 4 + 4  # dense, uniform, random calibration models
        assert 0 < r["measured_min_ms"] <= r["measured_max_ms"]
        assert r["spread_rel"] == pytest.approx(r["measured_max_ms"] / r["measured_min_ms"] - 1)
        assert _finite(*r["noise"].values()) and set(r["noise"]) >= {"median_round_diff_rel", "round_vs_round_tau"}
        resolved = r["resolved"]  # tau over the pairs the measurement tells apart
        assert resolved["min_gap"] == 0.05 and 0 <= resolved["pairs"] <= resolved["all_pairs"] == 45
        assert resolved["pairs"] == 0 or -1 <= resolved["tau"] <= 1
        drift = r["validation_over_table"]  # the 4 uniform configurations are in both sets
        assert drift["configs"] == 4 and _finite(drift["median"]) and drift["min"] <= drift["median"] <= drift["max"]
        assert r["mape_target_met"] == (r["mape"] <= 0.05) and r["tau_target_met"] == (r["kendall_tau"] >= 0.9)
        assert r["device"]["device"] == "cpu" and r["device"]["threads"] == 1
        assert _finite(r["table_noise_rel"], r["seconds"]) and r["table_noise_rel"] >= 0


def test_smoke_figures_follow_from_the_subnets(smoke):
    _, result = smoke
    for r in result["rows"]:
        subnets = [s for s in result["subnets"] if s["batch"] == r["batch"]]
        assert len(subnets) == r["subnets"]
        measured = np.array([s["measured_ms"] for s in subnets])
        predicted = np.array([s["predicted_ms"] for s in subnets])
        for s in subnets:
            assert len(s["rounds_ms"]) == 2 and s["measured_ms"] == min(s["rounds_ms"])  # --statistic min
            calib = r["calibration"]
            assert s["predicted_ms"] == pytest.approx(calib["scale"] * s["raw_ms"] + calib["offset_ms"])
            assert s["pct_error"] == pytest.approx(100 * (s["predicted_ms"] - s["measured_ms"]) / s["measured_ms"])
        assert r["mape"] == pytest.approx(np.mean(np.abs(predicted - measured) / measured))
        assert r["kendall_tau"] == pytest.approx(kendalltau(predicted, measured).statistic)
    table = result["table"]
    assert {row["kind"] for row in table} == {"linear", "rest", "model"}
    for row in table:  # two table rounds, combined by their minimum
        assert len(row["rounds_ms"]) == 2 and row["ms"] == min(row["rounds_ms"]) > 0

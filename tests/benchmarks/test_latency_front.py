"""Smoke run of ``experiments/benchmarks/latency_front.py`` on a tiny digits run.

The script runs as a subprocess with ``--smoke --output TMP --run-dir RUN``, RUN being the digits run that
``search_efficiency.py --smoke`` prepared (the session fixture ``efficiency`` of ``tests/benchmarks/conftest.py``:
the run that ``--smoke`` alone would prepare, by the same code; only read here). It profiles batch 1 and 4, searches
once by MACs and once by latency per batch, exports and times every front point. The checks recompute the
comparison the JSON claims from the points it records.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from flora_ray.results import cheapest_within, pareto_mask

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "benchmarks" / "latency_front.py"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, efficiency):
    out = tmp_path_factory.mktemp("latency-front")
    base = efficiency[0] / "runs" / "bench-smoke"
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--output", str(out), "--run-dir", str(base)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, f"latency_front.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout, json.loads((out / "latency_front.json").read_text())


def _finite(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def test_records_provenance_and_every_search(smoke):
    stdout, result = smoke
    assert "latency front vs uniform" in stdout and "Kendall tau" in stdout and "thread CPU time" in stdout
    assert result["benchmark"] == "latency_front" and result["smoke"] is True
    assert result["dataset"] == "digits" and len(result["supernet_sha256"]) == 64
    assert {"date", "machine", "torch", "threads", "loadavg"} <= set(result["environment"])
    batches = [str(b) for b in result["profile"]["batch_sizes"]]
    assert batches == ["1", "4"] and result["profile"]["device"]["device"] == "cpu"
    assert set(result["searches"]) == {"macs", "latency_b1", "latency_b4"}
    assert result["searches"]["macs"]["objectives"] == ["macs"]
    for batch in (1, 4):
        search = result["searches"][f"latency_b{batch}"]
        assert search["objectives"] == ["latency_ms"] and search["latency_batch"] == batch
    assert _finite(result["dense_accuracy"]) and result["drops"] == [0.5, 1.0]
    assert len(result["uniform"]) == len(result["ratios"])
    for batch in batches:
        dense = result["dense_ms"][batch]
        assert dense["measured"] > 0 and dense["predicted"] > 0 and dense["full_rank_measured"] > 0
        assert len(dense["rounds_ms"]) == result["measurement"]["rounds"]
        assert _finite(dense["full_rank_vs_dense_pct"]) and dense["round_spread_pct"] >= 0
        assert dense["cpu_measured"] > 0 and _finite(dense["cpu_full_rank_vs_dense_pct"])


def test_every_point_is_measured_and_predicted(smoke):
    _, result = smoke
    for name, search in result["searches"].items():
        front = pd.DataFrame(search["front"])
        assert len(front) == search["front_size"] > 0, name
        assert pareto_mask(front, "latency_ms" if name != "macs" else "macs").all(), name
    points = [p for s in result["searches"].values() for p in s["front"]] + result["uniform"]
    for batch in result["profile"]["batch_sizes"]:
        for point in points:
            assert point[f"measured_ms_b{batch}"] > 0 and point[f"predicted_ms_b{batch}"] > 0
            assert point[f"cpu_ms_b{batch}"] > 0
            assert len(point[f"measured_rounds_ms_b{batch}"]) == len(point[f"cpu_rounds_ms_b{batch}"])
            assert len(point[f"measured_rounds_ms_b{batch}"]) == result["measurement"]["rounds"]
        for key in ("prediction_error", "prediction_error_cpu"):
            for errors in result[key][str(batch)].values():
                assert all(_finite(errors[k]) for k in ("mape_pct", "max_abs_error_pct", "mean_signed_error_pct"))


def test_comparison_follows_from_the_recorded_points(smoke):
    _, result = smoke
    uniform = pd.DataFrame(result["uniform"])
    for kind in ("measured", "cpu", "predicted"):
        for batch, rows in result[f"comparison_{kind}"].items():
            column = f"{kind}_ms_b{batch}"
            fronts = {
                "latency_front": pd.DataFrame(result["searches"][f"latency_b{batch}"]["front"]),
                "mac_front": pd.DataFrame(result["searches"]["macs"]["front"]),
                "uniform": uniform,
            }
            assert [r["drop"] for r in rows] == result["drops"]
            for row in rows:
                assert row["target_accuracy"] == pytest.approx(result["dense_accuracy"] - row["drop"])
                for side, frame in fronts.items():
                    best = cheapest_within(frame, row["target_accuracy"], column)
                    assert row[side]["ms"] == (None if best is None else pytest.approx(best[column]))
                lat, uni, mac = (row[s]["ms"] for s in ("latency_front", "uniform", "mac_front"))
                for key, theirs in (("latency_front_vs_uniform", uni), ("latency_front_vs_mac_front", mac)):
                    if lat is None or theirs is None:
                        assert row[key] is None
                    else:
                        assert row[key] == pytest.approx(1 - lat / theirs)

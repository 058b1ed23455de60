"""Smoke runs of the cost_parity, latency, throughput and scaling benchmarks.

Each script runs once as a subprocess with ``--smoke --output TMP`` (so ``results/`` is left alone) and one torch
thread; the checks read its JSON and recompute what they can from the library or from the other fields.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import flora_ray as fr
from flora_ray.config import load_config
from flora_ray.stages.inputs import resolve_model_spec

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "experiments" / "benchmarks"

pytestmark = pytest.mark.slow


def _run(script: str, out: Path, *args: str) -> tuple[str, dict]:
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{script}.py"), "--smoke", "--output", str(out), *args],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout, json.loads((out / f"{script}.json").read_text())


@pytest.fixture(scope="module")
def cost_parity(tmp_path_factory):
    return _run("cost_parity", tmp_path_factory.mktemp("cost"))


@pytest.fixture(scope="module")
def latency(tmp_path_factory):
    return _run("latency", tmp_path_factory.mktemp("latency"), "--threads", "1")


@pytest.fixture(scope="module")
def throughput(tmp_path_factory):
    return _run("throughput", tmp_path_factory.mktemp("throughput"), "--threads", "1")


@pytest.fixture(scope="module")
def scaling(tmp_path_factory):
    return _run("scaling", tmp_path_factory.mktemp("scaling"))


def _check_environment(result):
    assert result["smoke"] is True
    assert result["date"] and result["machine"] and len(result["loadavg"]) == 3


def test_cost_parity_smoke_counts_equal_analytic(cost_parity):
    stdout, result = cost_parity
    _check_environment(result)
    rows = result["rows"]
    assert {r["device"] for r in rows} == {"meta", "cpu"}
    assert {r["model"] for r in rows} == {"test_vit-64", "swin-mini-72"}
    assert {"dense", "random 0", "random 1"} <= {r["config"] for r in rows}
    for r in rows:
        assert r["counted_macs"] > 0
        assert r["diff_macs"] == r["counted_macs"] - r["analytic_macs"] == 0
        assert r["max_abs_layer_diff_macs"] == 0 and r["other_diff_macs"] == 0
        assert r["counted_params"] == r["analytic_params"]
    # Real tensors count what the meta device counts.
    meta = {(r["model"], r["config"]): r["counted_macs"] for r in rows if r["device"] == "meta"}
    for r in (r for r in rows if r["device"] == "cpu"):
        assert r["counted_macs"] == meta[(r["model"], r["config"])]
    assert result["summary"]["max_abs_diff_macs"] == 0 and result["summary"]["configs_counted"] == len(rows)
    assert "max |analytic - counted| = 0 MACs" in stdout


def test_cost_parity_smoke_published_dense_costs(cost_parity):
    _, result = cost_parity
    published = {p["model"]: p for p in result["published"]}
    assert set(published) == {"DeiT-Ti", "DeiT-S", "DeiT-B", "Swin-T", "Swin-S", "Swin-B"}
    deit_b = fr.build_cost_model(fr.create_model("deit_base_patch16_224", device="meta")).dense_macs / 1e9
    assert published["DeiT-B"]["analytic_gmacs"] == pytest.approx(deit_b)
    for p in published.values():
        assert p["rel_diff"] == pytest.approx((p["analytic_gmacs"] - p["published_gmacs"]) / p["published_gmacs"])
        assert p["within_1pct"] == (abs(p["rel_diff"]) <= 0.01)
        assert p["within_published_rounding"]
    assert result["summary"]["published_missed_1pct"] == ["DeiT-Ti"]  # 1.254 GMACs against a rounded "1.3"


def test_latency_smoke_rows_are_consistent(latency):
    stdout, result = latency
    _check_environment(result)
    assert result["threads"] == 1
    cfg = load_config(ROOT / "experiments" / "quickstart.yaml")
    spec = resolve_model_spec(cfg)
    supernet = fr.build_supernet(spec.name, model_kwargs=spec.kwargs, ratios=cfg.model.ratios)
    uniform = {f"uniform {ratio:.2f}": config for ratio, config in supernet.space.uniform_configs().items()}
    rows = result["rows"]
    assert {r["batch"] for r in rows} == {1, 32}
    assert any(r["config"].startswith("random") for r in rows)
    for r in rows:
        assert r["workload"] == "quickstart-vit"
        assert r["subnet_ms"] > 0 and r["dense_ms"] > 0 and r["runs"] >= 3
        if r["config"] in uniform:
            assert r["gmacs_per_image"] * 1e9 == supernet.cost.macs(uniform[r["config"]])
        assert r["dense_gmacs_per_image"] * 1e9 == supernet.cost.dense_macs
        assert r["mac_ratio"] == pytest.approx(r["gmacs_per_image"] / r["dense_gmacs_per_image"])
        assert r["mac_ratio"] < 1
        assert r["latency_ratio"] == pytest.approx(r["subnet_ms"] / r["dense_ms"])
        assert r["latency_over_mac_ratio"] == pytest.approx(r["latency_ratio"] / r["mac_ratio"])
        assert r["target_applies"] == (1 - r["mac_ratio"] >= 0.30)
        assert r["target_met"] == (r["latency_over_mac_ratio"] <= 1.25)
    applies = [r for r in rows if r["target_applies"]]
    assert result["summary"]["rows_target_applies"] == len(applies) > 0
    assert result["summary"]["rows_target_met"] == sum(r["target_met"] for r in applies)
    assert {(p["config"] == "dense", p["batch"]) for p in result["profile"]} == {
        (d, b) for d in (False, True) for b in (1, 32)
    }
    for p in result["profile"]:
        assert p["matmul_ms"] > 0 and p["other_ms"] > 0 and 0 < p["matmul_share"] < 1
        assert p["other_ms"] >= sum(p["other_top_ms"].values())
        assert (p["mac_ratio"] == 1) == (p["config"] == "dense")
    assert "latency/MAC" in stdout


def test_throughput_smoke_rates_below_the_matmul_peak(throughput):
    stdout, result = throughput
    _check_environment(result)
    peak = result["matmul_peak"]["peak_gmacs_per_s"]
    assert peak == max(result["matmul_peak"]["by_size"].values()) > 0
    rows = {r["kind"]: r for r in result["rows"]}
    assert set(rows) == {"supernet training", "subnet evaluation"}
    train, evaluation = rows["supernet training"], rows["subnet evaluation"]
    assert train["batch"] == 128 and train["steps"] == 3
    assert evaluation["images"] == 128 and evaluation["configs"] == 2
    for r in rows.values():
        assert r["images_per_s"] > 0
        # Achieved GMAC/s = images/s x MACs per image of the work done (training: teacher + 3 x subnet).
        per_image = r["gmacs_per_s"] / r["images_per_s"]
        dense = fr.build_cost_model(fr.create_model("test_vit", device="meta", **_quickstart_kwargs())).dense_macs
        subnet = r["mean_subnet_gmacs_per_image"]
        expected = dense / 1e9 + 3 * subnet if r is train else subnet
        assert per_image == pytest.approx(expected, rel=1e-6)
        assert 0 < subnet * 1e9 <= dense
        assert r["share_of_peak"] == pytest.approx(r["gmacs_per_s"] / peak)
        assert 0 < r["share_of_peak"] < 1
    assert len(result["step_ratios"]) == 2
    assert result["worst_step_ratio"] == max(r["ratio"] for r in result["step_ratios"]) > 0
    assert "worst supernet/subnet step ratio" in stdout


def _quickstart_kwargs():
    return dict(resolve_model_spec(load_config(ROOT / "experiments" / "quickstart.yaml")).kwargs)


def test_scaling_smoke_reports_both_worker_counts_and_efficiency(scaling):
    stdout, result = scaling
    _check_environment(result)
    rows = result["rows"]
    assert result["repeats"] == 1 and len(result["measurements"]) == 4
    assert [(r["kind"], r["workers"]) for r in rows] == [
        ("Ray Train supernet training", 1),
        ("Ray Train supernet training", 2),
        ("Ray Tune subnet evaluation", 1),
        ("Ray Tune subnet evaluation", 2),
    ]
    for r in rows:
        assert r["throughput"] > 0 and r["wall_s"] > 0
        assert 0 < r["machine_cpu_busy"] <= 1
        assert r["throughput"] == pytest.approx(sum(r["throughput_repeats"]) / len(r["throughput_repeats"]))
        base = next(b for b in rows if b["kind"] == r["kind"] and b["workers"] == 1)
        assert r["speedup"] == pytest.approx(r["throughput"] / base["throughput"])
        assert r["efficiency"] == pytest.approx(r["speedup"] / r["workers"])
    for r in rows[:2]:
        assert r["step_ms"] == pytest.approx(1e3 * r["batch_per_worker"] * r["workers"] / r["throughput"])
    for r in rows[2:]:
        assert r["trials"] == 4
        assert 0 < r["eval_s_per_trial"] < r["wall_s"]
        assert r["images_per_s"] == pytest.approx(r["throughput"] * r["eval_images"])
        assert 1 <= r["evaluator_builds"] <= r["workers"]  # each reused actor builds its supernet once
    assert "efficiency" in stdout


def test_tome_int8_smoke_times_every_combination_at_exact_macs(tmp_path):
    from itertools import product

    from flora_ray.core.cost import build_cost_model
    from flora_ray.core.models import ModelSpec

    _, result = _run("tome_int8", tmp_path)
    _check_environment(result)
    rows = result["rows"]
    assert sorted((r["tome_r"], r["form"], r["precision"], r["batch"]) for r in rows) == sorted(
        product((0, 2), ("dense", "subnet"), ("fp32", "int8"), (1, 2))
    )
    macs = {(r["tome_r"], r["form"]): r["macs"] for r in rows}
    for r in (0, 2):
        assert macs[r, "dense"] == build_cost_model(ModelSpec("test_vit", {"img_size": 64}, r).create()).dense_macs
    assert macs[2, "subnet"] < macs[0, "subnet"] < macs[0, "dense"] and macs[2, "dense"] < macs[0, "dense"]
    assert all(r["ms"] > 0 and r["speedup"] > 0 for r in rows)

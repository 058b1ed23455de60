"""Smoke run of ``experiments/benchmarks/orthogonality.py`` on tiny digits runs (a minute, in process).

The script makes one run per technique (LeViT, token merging, and the plain ViT it quantizes to int8) and reports,
at 0.5 and 1 point below the technique alone, the cheapest front subnet and what it saves. The checks recompute the
claims from the runs' own files and from independent references: the cheapest qualifying trial over every searched
trial, FlopCounterMode on the models, the test split scored through a DataLoader, a brute-force Pareto check.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import counted_macs, input_for

import flora_ray as fr
from flora_ray.core.quantize import quantize_int8
from flora_ray.data.datasets import build_datasets
from flora_ray.stages.inputs import load_teacher
from flora_ray.training.tasks import accuracy

BENCHMARKS = Path(__file__).resolve().parents[2] / "experiments" / "benchmarks"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def orthogonality(tmp_path_factory):
    out = tmp_path_factory.mktemp("orthogonality")
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "orthogonality.py"), "--smoke", "--output", str(out)],
        capture_output=True, text=True, timeout=900, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, f"orthogonality.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return out, proc.stdout, json.loads((out / "orthogonality_smoke.json").read_text())


def test_every_technique_is_reported_next_to_the_paper(orthogonality):
    _, stdout, result = orthogonality
    assert set(result["techniques"]) == {"hybrid", "tome", "int8"}
    assert result["paper"] == [0.21, 0.26] and result["drops"] == [0.5, 1.0] and result["smoke"] is True
    assert {"date", "machine", "torch", "threads", "loadavg"} <= set(result)
    for technique in result["techniques"].values():
        assert [row["drop"] for row in technique["rows"]] == [0.5, 1.0]
        assert f"| {technique['label']} |" in stdout
    assert "| 0.5 pt |" in stdout and "21-26%" in stdout


def test_the_subnet_is_the_cheapest_searched_one_within_the_drop(orthogonality):
    _, _, result = orthogonality
    for name in ("hybrid", "tome"):
        technique = result["techniques"][name]
        run = fr.Run.open(technique["run"])
        trials = run.trials[run.trials["state"] == "COMPLETE"]
        recorded = run.store.read_json("search_summary.json")
        alone = technique["alone"]
        assert alone["search_accuracy"] == recorded["dense_accuracy"] and alone["macs"] == recorded["dense_macs"]
        for row in technique["rows"]:
            assert row["target"] == pytest.approx(alone["search_accuracy"] - row["drop"])
            qualifying = trials[trials["accuracy"] >= row["target"]]
            uniform = run.uniform[run.uniform["accuracy"] >= row["target"]]
            assert ("uniform" in row) == (not uniform.empty)
            if not uniform.empty:
                assert row["uniform"]["macs"] == uniform["macs"].min()
                assert row["uniform"]["extra_mac_reduction"] == pytest.approx(
                    1 - row["uniform"]["macs"] / alone["macs"]
                )
            assert row["reached"] == (not qualifying.empty)
            if row["reached"]:
                assert row["macs"] == qualifying["macs"].min()
                assert row["search_accuracy"] >= row["target"]
                assert row["extra_mac_reduction"] == pytest.approx(1 - row["macs"] / alone["macs"])
                for batch, ms in row["latency_ms"].items():
                    assert row["extra_latency_reduction"][batch] == pytest.approx(1 - ms / alone["latency_ms"][batch])


def test_costs_match_flop_counter_and_token_merging_saves_on_its_own(orthogonality):
    _, _, result = orthogonality
    for name in ("hybrid", "tome"):
        technique = result["techniques"][name]
        run = fr.Run.open(technique["run"])
        (teacher,) = load_teacher(run.config, run.store)
        x = input_for(teacher.eval())
        assert counted_macs(teacher, x) / len(x) == technique["alone"]["macs"]
        for row in technique["rows"]:
            if row["reached"]:
                assert counted_macs(run.subnet(row["trial"]), x) / len(x) == row["macs"]
    tome = result["techniques"]["tome"]
    assert tome["reference"]["macs"] > tome["alone"]["macs"]  # the same ViT without merging costs more
    int8 = result["techniques"]["int8"]
    assert int8["reference"]["macs"] == int8["alone"]["macs"]  # quantization leaves the MACs alone


def test_int8_front_is_made_of_quantized_subnets(orthogonality):
    _, _, result = orthogonality
    technique = result["techniques"]["int8"]
    run = fr.Run.open(technique["run"])
    front = pd.DataFrame(technique["front"])
    trials = run.trials[run.trials["state"] == "COMPLETE"]
    assert set(front["trial"]) <= set(trials["trial"]) and "fp32_accuracy" in front
    # brute force: no front point is dominated by another one
    for _, a in front.iterrows():
        others = front[front["trial"] != a["trial"]]
        dominated = (others["macs"] <= a["macs"]) & (others["accuracy"] >= a["accuracy"])
        strictly = (others["macs"] < a["macs"]) | (others["accuracy"] > a["accuracy"])
        assert not (dominated & strictly).any()
    test = build_datasets(run.config.data).test
    (teacher,) = load_teacher(run.config, run.store)
    # dynamic int8 scales activations per batch: score in the batches the benchmark used
    cpu, batch = torch.device("cpu"), run.config.search.batch_size
    assert accuracy(quantize_int8(teacher), test, cpu, batch_size=batch) == pytest.approx(
        technique["alone"]["test_accuracy"]
    )
    assert accuracy(teacher, test, cpu, batch_size=batch) == pytest.approx(technique["reference"]["test_accuracy"])
    uniform = pd.DataFrame(technique["uniform"])
    assert len(uniform) == len(run.uniform) and (uniform["fp32_accuracy"] == run.uniform["accuracy"].values).all()
    for row in technique["rows"]:
        if "uniform" in row:
            assert row["uniform"]["macs"] == uniform[uniform["accuracy"] >= row["target"]]["macs"].min()
        if row["reached"]:
            assert row["trial"] in set(front["trial"])
            model = quantize_int8(run.subnet(row["trial"]))
            assert accuracy(model, test, cpu, batch_size=batch) == pytest.approx(row["test_accuracy"])


def test_retime_replaces_only_the_latencies(orthogonality):
    out, _, result = orthogonality
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    command = [sys.executable, str(BENCHMARKS / "orthogonality.py"), "--smoke", "--output", str(out), "--retime"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((out / "orthogonality_smoke.json").read_text())
    assert again["retimed"]["rounds"] == 5 and again["date"] == result["date"]
    for name, technique in again["techniques"].items():
        before = result["techniques"][name]
        assert technique["front"] == before["front"] and technique["alone"]["macs"] == before["alone"]["macs"]
        for row, old in zip(technique["rows"], before["rows"], strict=True):
            assert {k: v for k, v in row.items() if "latency" not in k} == {
                k: v for k, v in old.items() if "latency" not in k
            }
            if row["reached"]:
                assert row["latency_ms"] != old["latency_ms"]  # measured again
                for batch, ms in row["latency_ms"].items():
                    expected = 1 - ms / technique["alone"]["latency_ms"][batch]
                    assert row["extra_latency_reduction"][batch] == pytest.approx(expected)

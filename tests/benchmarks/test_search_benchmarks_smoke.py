"""Smoke runs of the search benchmarks (``search_efficiency.py``, ``flora_vs_uniform.py``, ``ranking_fidelity.py``)
on a tiny digits run.

The scripts run as subprocesses with ``--smoke --output TMP``; search_efficiency (the session fixture
``efficiency`` of ``tests/benchmarks/conftest.py``) prepares the digits run in-process (pretrain, zero-training
filter, train) and flora_vs_uniform reuses it through ``--run-dir`` and trains its two ablation supernets beside it;
ranking_fidelity reuses both and adds a sandwich-sampled supernet. The checks recompute what the JSON claims from
the points it records.
"""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from flora_ray.search.sensitivity import guided_allocations

import flora_ray as fr
from flora_ray.results import (
    best_under,
    cheapest_within,
    gain_table,
    hypervolume,
    kendall_tau,
    pareto_mask,
    spearman_rho,
)
from flora_ray.storage.files import read_checkpoint_header

BENCHMARKS = Path(__file__).resolve().parents[2] / "experiments" / "benchmarks"

pytestmark = pytest.mark.slow


def _run(script: str, *args: str) -> str:
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--smoke", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def versus_uniform(efficiency):
    out, _, _ = efficiency
    run = str(out / "runs" / "bench-smoke")
    stdout = _run("flora_vs_uniform.py", "--output", str(out), "--run-dir", run, "--seeds", "0", "1")
    return out, stdout, json.loads((out / "flora_vs_uniform.json").read_text())


def _frame(points) -> pd.DataFrame:
    return pd.DataFrame(points, columns=["macs", "accuracy"])


def test_search_efficiency_reports_every_method_with_consistent_hypervolumes(efficiency):
    out, stdout, result = efficiency
    assert (out / "search_efficiency.png").stat().st_size > 1000
    assert "| (a) NSGA-II (flora-ray)" in stdout and "| (c) reference evolution" in stdout
    methods, trials, seeds = result["methods"], result["trials"], result["seeds"]
    assert set(methods) == {"nsga2", "random", "evolution", "uniform"}
    assert len(seeds) >= 2 and result["dataset"] == "digits"
    ref = (result["reference_point"]["macs"], result["reference_point"]["accuracy"])
    assert ref[0] == result["full_rank_macs"] and ref[1] < result["full_rank_accuracy"]
    scale, everything = result["hypervolume_scale"], result["hypervolume_all_evaluated"]
    for name, method in methods.items():
        assert len(method["hypervolume"]) == len(method["fronts"]) == len(seeds)
        for hv, front in zip(method["hypervolume"], method["fronts"], strict=True):
            # The reported hypervolume is that of the recorded front, and no method beats all points together.
            assert hv == pytest.approx(hypervolume(_frame(front), ref) / scale)
            assert 0 < hv <= everything + 1e-12, name
        assert method["hypervolume_mean"] == pytest.approx(sum(method["hypervolume"]) / len(seeds))
    for name in ("nsga2", "random"):
        assert methods[name]["evaluations"] == [trials] * len(seeds)
        curve = methods[name]["curve_mean"]
        assert len(curve) == trials and all(b >= a - 1e-12 for a, b in itertools.pairwise(curve))
        assert all(pareto_mask(_frame(front)).all() for front in methods[name]["fronts"])
    assert all(0 < n <= trials for n in methods["evolution"]["evaluations"])
    assert all(
        len(front) <= len(result["settings"]["evolution"]["windows"]) for front in methods["evolution"]["fronts"]
    )
    assert methods["uniform"]["evaluations"] == [len(result["ratios"])] * len(seeds)


def test_search_efficiency_target_follows_from_the_curves(efficiency):
    _, _, result = efficiency
    goal, methods, trials = result["target"], result["methods"], result["trials"]
    assert goal["random_final_hypervolume_mean"] == pytest.approx(methods["random"]["hypervolume_mean"])
    reached = goal["nsga2_evaluations_to_reach_mean"]
    curve = methods["nsga2"]["curve_mean"]
    if reached is None:
        assert max(curve) < goal["random_final_hypervolume_mean"]
    else:
        assert curve[reached - 1] >= goal["random_final_hypervolume_mean"] * (1 - 1e-12)
        assert reached == 1 or curve[reached - 2] < goal["random_final_hypervolume_mean"]
    assert goal["met"] == (reached is not None and reached <= trials / 2)
    assert len(goal["nsga2_evaluations_to_reach_per_seed"]) == len(result["seeds"])


def _recompute(front: pd.DataFrame, baseline: pd.DataFrame, row: dict, reference: float, dense_macs: float):
    """The two points a comparison row names and its gain, from the recorded frames."""
    if row["kind"] == "drop":
        assert row["target"] == pytest.approx(reference - row["value"])
        ours, theirs = cheapest_within(front, row["target"]), cheapest_within(baseline, row["target"])
        gain = None if ours is None or theirs is None else 1 - ours["macs"] / theirs["macs"]
    else:
        assert row["target"] == pytest.approx(row["value"] * dense_macs)
        ours, theirs = best_under(front, row["target"]), best_under(baseline, row["target"])
        gain = None if ours is None or theirs is None else ours["accuracy"] - theirs["accuracy"]
    return ours, theirs, gain


def test_flora_vs_uniform_searches_with_the_product_for_every_seed(versus_uniform):
    _, _, result = versus_uniform
    assert result["seeds"] == [0, 1] and "the product's search stage" in result["search"]
    assert set(result["variants"]) == {"flora", "no_filter", "uniform_sampling"}
    for name, variant in result["variants"].items():
        proposals = []
        for entry in variant["seeds"]:
            run = Path(entry["run_dir"])
            assert run.name.endswith(f"-seed{entry['seed']}-t{result['trials']}"), name
            assert json.loads((run / "stages" / "search.json").read_text())["stage"] == "search"
            assert yaml.safe_load((run / "run_config.yaml").read_text())["search"]["seed"] == entry["seed"]
            trials, front = pd.read_parquet(run / "trials.parquet"), pd.read_parquet(run / "pareto.parquet")
            # the recorded front is the search stage's own, and it is the Pareto set of the trials it ran
            assert pd.DataFrame(entry["front"])[["macs", "accuracy"]].equals(front[["macs", "accuracy"]])
            done = trials[trials["state"] == "COMPLETE"]
            assert sorted(done[pareto_mask(done)]["trial"]) == sorted(front["trial"])
            proposals.append(list(trials["ranks"]))
        assert proposals[0] != proposals[1], name  # two seeds, two searches


def test_flora_vs_uniform_gains_recompute_against_both_baselines(versus_uniform):
    _, stdout, result = versus_uniform
    assert "vs sensitivity-guided" in stdout
    for name, variant in result["variants"].items():
        guided = pd.DataFrame(variant["guided"])
        for entry in variant["seeds"]:
            front, uniform = pd.DataFrame(entry["front"]), pd.DataFrame(entry["uniform"])
            assert len(uniform) == len(result["ratios"])
            for key, baseline in (("versus_uniform", uniform), ("versus_guided", guided)):
                assert [(r["kind"], r["value"]) for r in entry[key]] == [("drop", d) for d in result["drops"]] + [
                    ("budget", b) for b in result["budgets"]
                ]
                for row in entry[key]:
                    args = (variant["dense_accuracy"], variant["dense_macs"])
                    ours, theirs, gain = _recompute(front, baseline, row, *args)
                    assert row["front_macs"] == (None if ours is None else ours["macs"]), (name, key)
                    assert row["baseline_macs"] == (None if theirs is None else theirs["macs"]), (name, key)
                    assert row["gain"] == (None if gain is None else pytest.approx(gain)), (name, key)
                    if row["paired_se"] is not None and row["kind"] == "budget":
                        assert row["close_call"] == (abs(row["paired_difference"]) <= row["paired_se"])


def test_flora_vs_uniform_guided_baseline_is_the_sensitivity_family(versus_uniform):
    _, _, result = versus_uniform
    for name, variant in result["variants"].items():
        supernet = fr.Run.open(variant["seeds"][0]["run_dir"]).supernet
        family = guided_allocations(supernet.space, variant["layer_drops"], supernet.cost, step=result["guided_step"])
        guided = variant["guided"]
        assert [g["name"] for g in guided] == [f["name"] for f in family], name
        assert [g["macs"] for g in guided] == [f["macs"] for f in family], name
        assert all(0 <= g["accuracy"] <= 100 for g in guided)


def test_flora_vs_uniform_spread_over_search_seeds(versus_uniform):
    _, stdout, result = versus_uniform
    assert "Gain over the seeds" in stdout
    for name, variant in result["variants"].items():
        for key in ("versus_uniform", "versus_guided"):
            for i, entry in enumerate(variant[f"spread_{key}"]):
                values = [s[key][i]["gain"] for s in variant["seeds"] if s[key][i]["gain"] is not None]
                assert entry["reached"] == len(values) and entry["seeds"] == 2, name
                assert entry["close_calls"] == sum(s[key][i]["close_call"] for s in variant["seeds"])
                if values:
                    assert entry["mean"] == pytest.approx(sum(values) / len(values))
                    assert entry["min"] == min(values) and entry["max"] == max(values)


def test_flora_vs_uniform_trains_the_ablations_on_their_spaces(versus_uniform):
    out, _, result = versus_uniform
    runs = {name: Path(v["run_dir"]) for name, v in result["variants"].items()}
    assert runs["flora"] == (out / "runs" / "bench-smoke").resolve()
    headers = {name: read_checkpoint_header(path / "supernet.safetensors") for name, path in runs.items()}
    assert headers["uniform_sampling"]["space"] == headers["flora"]["space"]
    assert headers["no_filter"]["space"] != headers["flora"]["space"]
    for name in ("no_filter", "uniform_sampling"):
        source = json.loads((runs[name] / "bench_source.json").read_text())
        assert source["config"]["train"]["sampler"] == result["variants"][name]["sampler"]
        assert runs[name].name.startswith("bench-smoke-")


@pytest.fixture(scope="module")
def fidelity(versus_uniform):
    out, _, _ = versus_uniform  # reuses the digits run and the ablation supernets flora_vs_uniform trained
    run = str(out / "runs" / "bench-smoke")
    stdout = _run("ranking_fidelity.py", "--output", str(out), "--run-dir", run)
    return out, stdout, json.loads((out / "ranking_fidelity.json").read_text())


def test_ranking_fidelity_correlations_recompute_from_the_rows(fidelity):
    _, stdout, result = fidelity
    assert "Kendall tau [95% CI]" in stdout and "fine-tuned accuracy of subnets using the triple" in stdout
    variants = result["variants"]
    assert list(variants) == ["lowrank", "uniform_sampling", "sandwich_sampling", "no_filter"]
    assert [v["sampler"] for v in variants.values()] == ["lowrank", "uniform", "sandwich", "lowrank"]
    names = [r["name"] for r in variants["lowrank"]["rows"]]
    assert len(names) == result["subnets"] and len(set(names)) == len(names)
    assert {r["kind"] for r in variants["lowrank"]["rows"]} == {"front", "uniform", "random"}
    for name, variant in variants.items():
        rows = variant["rows"]
        assert [r["name"] for r in rows] == names, name  # the same subnets on every supernet
        distinct = [r for r in rows if not r["repeat"]]  # a front point that is also uniform counts once
        assert len(distinct) == result["distinct_subnets"]
        inherited, tuned = [r["inherited"] for r in distinct], [r["test_after"] for r in distinct]
        c = variant["inherited_vs_finetuned"]
        assert c["kendall_tau"] == pytest.approx(kendall_tau(inherited, tuned), nan_ok=True)
        assert c["spearman_rho"] == pytest.approx(spearman_rho(inherited, tuned), nan_ok=True)
        low, high = c["kendall_tau_ci95"]
        assert -1 <= low <= high <= 1
        assert variant["mean_finetune_gain"] == pytest.approx(
            sum(r["test_after"] - r["test_before"] for r in distinct) / len(distinct)
        )


def test_ranking_fidelity_gains_and_resume(fidelity):
    out, _, result = fidelity
    rows = pd.DataFrame(result["variants"]["lowrank"]["rows"])
    teacher = result["teacher"]
    expected = gain_table(
        rows[rows["kind"] == "front"].assign(accuracy=rows["test_after"]),
        rows[rows["kind"] == "uniform"].assign(accuracy=rows["test_after"]),
        teacher["test_accuracy"],
        teacher["macs"],
    )
    got = pd.DataFrame(result["gains"]["finetuned"])
    pd.testing.assert_series_equal(got["gain"], expected["gain"], check_names=False)
    assert [e["block"] for e in result["filter_score_fidelity"]] == ["blocks.0", "blocks.1"]
    # A second run answers every subnet from the cache: no fine-tuning, the same figures.
    again = _run("ranking_fidelity.py", "--output", str(out), "--run-dir", str(out / "runs" / "bench-smoke"))
    assert "inherited" not in again.split("subnets (")[1].split("Ranking fidelity")[0]
    assert json.loads((out / "ranking_fidelity.json").read_text())["variants"] == result["variants"]


def test_ranking_fidelity_compares_named_recipes(fidelity):
    """``--recipes flora,sandwich_inplace --subnets N``: the base run is the ``flora`` supernet (its rows come from
    the cache of the run above), ``sandwich_inplace`` trains one ablation supernet in place, and the random strata
    make N distinct subnets."""
    import shutil

    out, _, first = fidelity
    recipes = out / "recipes"
    recipes.mkdir(exist_ok=True)
    shutil.copy(out / "ranking_fidelity_rows.json", recipes / "ranking_fidelity_rows.json")
    wanted = first["distinct_subnets"] + 2
    run = out / "runs" / "bench-smoke"
    args = ("--output", str(recipes), "--run-dir", str(run), "--recipes", "flora,sandwich_inplace")
    stdout = _run("ranking_fidelity.py", *args, "--subnets", str(wanted))
    assert "| recipe_sandwich_inplace | sandwich | largest | filtered |" in stdout
    result = json.loads((recipes / "ranking_fidelity.json").read_text())
    variants = result["variants"]
    assert list(variants) == ["recipe_flora", "recipe_sandwich_inplace"] and result["recipes"] == list(
        ("flora", "sandwich_inplace")
    )
    flora, inplace = variants["recipe_flora"], variants["recipe_sandwich_inplace"]
    assert Path(flora["run_dir"]) == run.resolve() and (flora["sampler"], flora["distill_from"]) == (
        "lowrank",
        "teacher",
    )
    assert (inplace["recipe"], inplace["sampler"], inplace["distill_from"]) == (
        "sandwich_inplace",
        "sandwich",
        "largest",
    )
    header = read_checkpoint_header(Path(inplace["run_dir"]) / "supernet.safetensors")
    assert [("search_acc_largest" in h, "search_acc_smallest" in h) for h in header["history"]] == [(True, True)] * len(
        header["history"]
    )
    assert result["distinct_subnets"] == wanted
    cached = {r["name"]: r for r in first["variants"]["lowrank"]["rows"]}  # the same supernet as the first run's
    for row in flora["rows"]:
        if row["kind"] != "random":  # the front and uniform subnets are those of the first run
            assert row["inherited"] == cached[row["name"]]["inherited"], row["name"]
    for variant in variants.values():
        distinct = [r for r in variant["rows"] if not r["repeat"]]
        assert len(distinct) == wanted
        inherited, tuned = [r["inherited"] for r in distinct], [r["test_after"] for r in distinct]
        assert variant["inherited_vs_finetuned"]["kendall_tau"] == pytest.approx(
            kendall_tau(inherited, tuned), nan_ok=True
        )


@pytest.fixture(scope="module")
def eval_rate(versus_uniform):
    """``eval_rate.py --smoke`` on flora_vs_uniform's searched seed-0 run (a front and uniform configurations)."""
    out, _, result = versus_uniform
    run = Path(result["variants"]["flora"]["seeds"][0]["run_dir"])
    stdout = _run("eval_rate.py", "--output", str(out), "--run-dir", str(run))
    return run, stdout, json.loads((out / f"eval_rate_{run.name}.json").read_text())


def test_eval_rate_scores_the_searched_subnets_as_the_search_did(eval_rate):
    run, stdout, result = eval_rate
    assert "overall:" in stdout and result["target"] == 0.9 and result["repeats"] == 2
    front = pd.read_parquet(run / "pareto.parquet").set_index("trial")
    names = [r["name"] for r in result["subnets"]]
    assert {f"front trial {t}" for t in front.index} <= set(names)
    for row in result["subnets"]:
        # the search path and the extracted model score the same images alike (one image of float rounding at most)
        assert abs(row["search_accuracy"] - row["plain_accuracy"]) <= 100.0 / row["images"] + 1e-9, row["name"]
        if row["name"].startswith("front trial"):  # and as the search stage itself scored them
            trial = front.loc[int(row["name"].split()[-1])]
            assert row["search_accuracy"] == pytest.approx(trial["accuracy"]) and row["macs"] == trial["macs"]
        assert len(row["search_seconds"]) == len(row["plain_seconds"]) == 2
        median = sorted(row["search_seconds"])[0] / 2 + sorted(row["search_seconds"])[1] / 2
        assert row["search_images_per_s"] == pytest.approx(row["images"] / median)
    medians = [(sum(r["search_seconds"]) / 2, sum(r["plain_seconds"]) / 2) for r in result["subnets"]]
    assert result["overall_ratio"] == pytest.approx(sum(p for _, p in medians) / sum(s for s, _ in medians))

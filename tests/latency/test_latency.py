"""Latency: the profile table, the predictor, latency objectives and budgets, export's measured latency."""

import itertools
import json
import subprocess
import sys
from dataclasses import replace

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from helpers import counted_macs

import flora_ray as fr
from flora_ray.backends.local import LocalBackend
from flora_ray.config import load_config
from flora_ray.core.cost import build_cost_model
from flora_ray.core.latency import LatencyModel, calibration_configs, item_key, layer_item, profile_items
from flora_ray.search.objectives import Objectives, axis_range, resolve_bounds
from flora_ray.stages.inputs import build_run_supernet, claim_run, full_space, resolve_model_spec
from flora_ray.stages.profile import DEVICE_KEY, ZeroCostLinear, profile_stage, read_table
from flora_ray.storage.run_store import ARTEFACTS, RunStore

FAST_PROFILE = ["profile.min_run_time=0.01", "profile.batch_sizes=[1, 4]"]


def _space_and_cost(cfg):
    return full_space(cfg), build_cost_model(resolve_model_spec(cfg).create(device="meta"))


class CountingBackend(LocalBackend):
    """The in-process backend, recording the items each profile task was asked to measure."""

    def __init__(self):
        self.measured = []

    def call(self, fn, *args, resources, retries=0):
        if fn.__name__ == "profile_task":
            self.measured += [(args[3], item_key(item)) for item in args[2]]
        return fn(*args)


def test_profile_measures_every_item_of_the_space_records_the_device_and_resumes(digits_config):
    cfg = digits_config(*FAST_PROFILE)
    claim_run(cfg)
    backend = CountingBackend()
    summary = profile_stage(cfg, backend)
    space, cost = _space_and_cost(cfg)
    wanted = {item_key(i) for i in profile_items(space, cost, calibration_configs(space))}
    table, device = read_table(RunStore(cfg.run.run_dir))
    for batch in (1, 4):
        assert {item_key(r) for r in table[table["batch"] == batch].to_dict("records")} == wanted
    assert len(backend.measured) == 2 * len(wanted) and (table["ms"] > 0).all()
    # Layers of the same shape in different blocks share one row; the merged form is shared by every rank at or
    # above break-even, so the table is smaller than layers x ranks.
    assert len([k for k in wanted if k[0] == "linear"]) < sum(len(layer.rank_choices) + 1 for layer in space.layers)
    assert device["device"] == "cpu" and device["threads"] == 1 and device["dtype"] == "float32" and device["name"]
    metadata = pq.read_schema(cfg.run.run_dir / ARTEFACTS.latency_table).metadata
    assert json.loads(metadata[DEVICE_KEY.encode()])["torch"] == torch.__version__
    assert set(summary["batches"]) == {"1", "4"} and summary["batches"]["4"]["dense_ms"] > 0
    # Resume: rows already measured are skipped; only the missing ones are measured again.
    kept = table.drop(index=table.index[[0, 5]])
    RunStore(cfg.run.run_dir).write_parquet(ARTEFACTS.latency_table, kept, {DEVICE_KEY: json.dumps(device)})
    again = CountingBackend()
    profile_stage(cfg, again)
    assert sorted(again.measured) == sorted((int(r["batch"]), item_key(r)) for _, r in table.iloc[[0, 5]].iterrows())
    assert len(read_table(RunStore(cfg.run.run_dir))[0]) == len(table)


def test_the_stand_ins_remove_exactly_the_factorised_layers_work():
    """The 'rest' rows time the model without its factorised Linears: FlopCounterMode sees the dense model's MACs
    minus exactly those layers', and the output keeps its shape."""
    supernet = fr.build_supernet("test_vit", model_kwargs={"img_size": 32, "depth": 2})
    dense = fr.create_model("test_vit", img_size=32, depth=2).eval()
    stubbed = fr.create_model("test_vit", img_size=32, depth=2).eval()
    targets = set(supernet.space.fqns)
    from flora_ray.core.surgery import swap_modules

    swap_modules(stubbed, lambda m, fqn: fqn in targets, lambda m, fqn: ZeroCostLinear(m.out_features))
    x = torch.randn(2, 3, 32, 32)
    removed = sum(supernet.cost.layer_macs(f) for f in targets) * 2
    assert counted_macs(stubbed, x) == counted_macs(dense, x) - removed
    assert stubbed(x).shape == dense(x).shape


def _hand_table(space, cost, batch=1):
    """A table whose every linear row costs ``rank + 1000 * merged`` ms (distinct per item), rest 7 ms."""
    rows = []
    for item in profile_items(space, cost, {}):
        ms = 7.0 if item["kind"] == "rest" else 1000.0 if item["form"] == "merged" else float(item["rank"])
        rows.append({**item, "batch": batch, "ms": ms, "iqr_ms": 0.0, "measurements": 1})
    return pd.DataFrame(rows)


def test_predictor_arithmetic_on_a_hand_made_table(digits_config):
    cfg = digits_config()
    space, cost = _space_and_cost(cfg)
    table = _hand_table(space, cost)
    model = LatencyModel.from_table(table, space, cost, batch=1)
    assert model.scale == 1.0 and model.offset == 0.0  # no model rows: no calibration
    config = space.uniform(0.25)
    expected = 7.0
    for fqn, rank in config.items():
        item = layer_item(cost, fqn, rank)
        expected += 1000.0 if item["form"] == "merged" else rank
    assert model.predict(config) == pytest.approx(expected)
    assert model.dense_ms == pytest.approx(7.0 + 1000.0 * len(space.fqns))
    # The cheapest and dearest predictions equal a brute force over every configuration.
    every = [space.from_block_tuples(c) for c in itertools.product(*(b.candidates for b in space.blocks))]
    assert model.cheapest_ms(space) == pytest.approx(min(model.predict(c) for c in every))
    assert model.dearest_ms(space) == pytest.approx(max(model.predict(c) for c in every))
    assert LatencyModel.from_dict(json.loads(json.dumps(model.to_dict()))).predict(config) == model.predict(config)
    with pytest.raises(ValueError, match="no rows at batch 8"):
        LatencyModel.from_table(table, space, cost, batch=8)
    with pytest.raises(ValueError, match="has no row for Linear"):
        LatencyModel.from_table(table[table["kind"] != "linear"], space, cost, batch=1)


def test_calibration_fits_what_the_measured_models_show(digits_config):
    cfg = digits_config()
    space, cost = _space_and_cost(cfg)
    base = LatencyModel.from_table(_hand_table(space, cost), space, cost, batch=1)
    configs = list(calibration_configs(space, random_configs=4).values())
    affine = base.calibrated([(c, 2.0 * base.raw_ms(c) + 3.0, str(i)) for i, c in enumerate(configs)])
    assert affine.fit["kind"] == "affine"
    assert (affine.scale, affine.offset) == (pytest.approx(2.0), pytest.approx(3.0))
    assert affine.fit["mape"] == pytest.approx(0.0, abs=1e-9)
    shifted = base.calibrated([(c, base.raw_ms(c) + 0.5, str(i)) for i, c in enumerate(configs)])
    assert (shifted.scale, shifted.offset) == (1.0, pytest.approx(0.5))


def test_cost_ranges_and_relative_budgets_match_a_brute_force(digits_config):
    cfg = digits_config()
    space, cost = _space_and_cost(cfg)
    latency = LatencyModel.from_table(_hand_table(space, cost), space, cost, batch=1)
    every = [space.from_block_tuples(c) for c in itertools.product(*(b.candidates for b in space.blocks))]
    for axis, value in (("macs", cost.macs), ("params", cost.params), ("latency_ms", latency.predict)):
        assert axis_range(axis, space, cost, latency) == (
            pytest.approx(min(map(value, every))),
            pytest.approx(max(map(value, every))),
        )
    search = load_config(None, ["search.max_macs=60%", "search.min_params=0.3e4", "search.max_latency_ms=2500"]).search
    bounds = resolve_bounds(search, space, cost, latency)
    assert bounds == {"macs": (None, pytest.approx(0.6 * cost.dense_macs)), "params": (3000.0, None),
                      "latency_ms": (None, 2500.0)}  # fmt: skip
    objectives = Objectives("latency_ms", bounds)
    assert objectives.feasible({"macs": 0.5 * cost.dense_macs, "params": 5e3, "latency_ms": 2000.0})
    assert not objectives.feasible({"macs": 0.7 * cost.dense_macs, "params": 5e3, "latency_ms": 2000.0})
    cheapest = axis_range("macs", space, cost, None)[0]
    with pytest.raises(ValueError, match=r"search.max_macs=.* is below the cheapest configuration of the space"):
        resolve_bounds(replace(search, max_macs=0.99 * cheapest), space, cost, latency)
    with pytest.raises(ValueError, match=r"search.min_latency_ms=.* is above the dearest"):
        resolve_bounds(replace(search, min_latency_ms="101%"), space, cost, latency)
    with pytest.raises(ValueError, match="is above search.max_macs"):
        resolve_bounds(replace(search, min_macs="80%", max_macs="70%"), space, cost, latency)


@pytest.mark.parametrize(
    "override, message",
    [
        ("search.objectives=[flops]", "search.objectives"),
        ("search.objectives=[macs, latency_ms]", "one cost axis"),
        ("search.max_macs=lots", "search.max_macs"),
        ("search.min_latency_ms=-3", "search.min_latency_ms"),
        ("profile.dtype=float16", "float16 needs profile.device=cuda"),
        ("profile.batch=3", "profile.batch"),
    ],
)
def test_bad_objectives_and_profile_settings_are_config_errors(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])


def test_a_latency_objective_needs_the_profile():
    with pytest.raises(ValueError, match="profile.enabled"):
        load_config(None, ["search.objectives=[latency_ms]", "profile.enabled=false"])


def test_cli_refuses_a_budget_below_the_cheapest_configuration_before_any_work(digits_config, tmp_path):
    cfg_path = tmp_path / "digits.yaml"
    import yaml

    from flora_ray.config import config_to_dict

    cfg_path.write_text(yaml.safe_dump(config_to_dict(digits_config())))
    out = subprocess.run(
        [sys.executable, "-m", "flora_ray.cli", "run", str(cfg_path), "--backend", "local", "search.max_macs=1000"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("flora-ray: error: search.max_macs=1000")
    assert "is below the cheapest configuration of the space" in errors[0]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("teacher.safetensors"))


@pytest.mark.slow
def test_latency_objective_search_respects_the_budget_and_export_measures_what_was_predicted(
    digits_config, with_teacher
):
    from flora_ray.stages.export import export_from_run
    from flora_ray.stages.search import search_stage

    cfg = digits_config(
        *FAST_PROFILE,
        "search.objectives=[latency_ms]",
        "search.trials=16",
        "search.population=6",
        "search.eval_images=100",
        "search.concurrency=1",
    )
    store = claim_run(cfg)
    with_teacher(cfg)
    profile_stage(cfg, LocalBackend())
    supernet, _ = build_run_supernet(cfg, store)
    fr.save_supernet(supernet, cfg.run.run_dir / ARTEFACTS.supernet)
    table, device = read_table(store)
    latency = LatencyModel.from_table(table, supernet.space, supernet.cost, batch=1, device=device)
    # A budget inside the space's measured range (on a model this small, low ranks need not be faster than dense).
    budget = (latency.cheapest_ms(supernet.space) + latency.dearest_ms(supernet.space)) / 2
    cfg = replace(cfg, search=replace(cfg.search, max_latency_ms=budget))
    (cfg.run.run_dir / ARTEFACTS.run_config).unlink()  # the run now belongs to the configuration with the budget
    summary = search_stage(cfg, LocalBackend())
    trials = pd.read_parquet(cfg.run.run_dir / ARTEFACTS.trials)
    done = trials[trials["state"] == "COMPLETE"]
    assert len(done) == 16 and done[["macs", "params", "latency_ms"]].notna().all().all()
    for row in done.itertuples():  # every row carries all three axes, the latency as predicted
        ranks = json.loads(row.ranks)
        assert row.latency_ms == pytest.approx(latency.predict(ranks))
        assert row.macs == supernet.cost.macs(ranks) and row.params == supernet.cost.params(ranks)
    assert (done["feasible"] == (done["latency_ms"] <= budget)).all() and done["feasible"].any()
    front = pd.read_parquet(cfg.run.run_dir / ARTEFACTS.pareto)
    assert (front["latency_ms"] <= budget).all() and front["latency_ms"].is_monotonic_increasing
    assert summary["cost_axis"] == "latency_ms" and summary["dense_latency_ms"] == pytest.approx(latency.dense_ms)
    report = export_from_run(cfg.run.run_dir, max_latency_ms=budget, backend=LocalBackend())
    target = report["target_latency"]
    assert set(target["batches"]) == {"1", "4"} and target["device"]["name"] == device["name"]
    for figures in target["batches"].values():
        assert figures["measured_ms"] > 0 and figures["predicted_ms"] > 0 and figures["dense_measured_ms"] > 0
        assert figures["error_pct"] == pytest.approx(100 * (figures["predicted_ms"] / figures["measured_ms"] - 1))
    exported = json.loads((cfg.run.run_dir / "export" / f"trial_{report['trial']}" / "export.json").read_text())
    assert exported["target_latency"]["batches"]["1"]["predicted_ms"] <= budget


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_profile_on_cuda_in_half_precision(digits_config):
    cfg = digits_config("profile.device=cuda", "profile.dtype=float16", "profile.min_run_time=0.01")
    claim_run(cfg)
    summary = profile_stage(cfg, LocalBackend())
    table, device = read_table(RunStore(cfg.run.run_dir))
    assert device["device"] == "cuda" and device["name"] == torch.cuda.get_device_name()
    assert device["dtype"] == "float16" and (table["ms"] > 0).all() and summary["batches"]["1"]["dense_ms"] > 0

"""sensitivity.py (issue 29 item 0) on the shared in-process digits run: every layer alone and every block at its
lowest rank against full rank, checked against the extracted subnets scored through a DataLoader and against
FlopCounterMode."""

import pytest
import sensitivity
import torch
from helpers import counted_macs, input_for

import flora_ray as fr
from flora_ray.data.datasets import build_datasets
from flora_ray.training.tasks import accuracy


@pytest.fixture(scope="module")
def measured(in_process_run):
    cfg, _, _ = in_process_run
    run = fr.Run.open(cfg.run.run_dir)
    return run, sensitivity.measure(run, images=10**9)  # the whole test split: the DataLoader scores the same images


def test_every_layer_and_block_once_against_full_rank(measured):
    run, out = measured
    space = run.supernet.space
    kinds = [r["kind"] for r in out["rows"]]
    assert kinds == ["full"] + ["layer"] * len(space.fqns) + ["block"] * len(space.blocks) + ["uniform"]
    assert sorted(r["name"] for r in out["rows"] if r["kind"] == "layer") == sorted(space.fqns)
    full = out["rows"][0]
    assert full["drop"] == 0 and full["drop_se"] == 0 and full["macs_saved"] == 0
    for row in out["rows"][1:]:
        assert row["drop"] == pytest.approx(full["accuracy"] - row["accuracy"]) and row["macs_saved"] > 0
    layers = [r["drop"] for r in out["rows"] if r["kind"] == "layer"]
    assert out["layer_spread"] == pytest.approx(max(layers) - min(layers))


def test_accuracies_and_costs_match_the_extracted_subnets(measured):
    run, out = measured
    test = build_datasets(run.config.data).test
    full = {layer.fqn: layer.max_rank for layer in run.supernet.space.layers}
    lowest = {layer.fqn: min(layer.rank_choices) for layer in run.supernet.space.layers}
    checked = [r for r in out["rows"] if r["kind"] in ("full", "uniform")] + [out["rows"][1]]
    for row in checked:
        ranks = lowest if row["kind"] == "uniform" else dict(full)
        if row["kind"] == "layer":
            ranks[row["name"]] = lowest[row["name"]]
        model = run.subnet_at(ranks)
        assert accuracy(model, test, torch.device("cpu")) == pytest.approx(row["accuracy"])
        assert counted_macs(model, input_for(model, batch=1)) == row["macs"]

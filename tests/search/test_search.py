"""Search: genes, the evaluator and its cache, the Ray Tune + NSGA-II search end to end, the in-process search."""

import copy
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import DIGITS_OVERRIDES
from helpers import TINY_MODELS, input_for

import flora_ray as fr
from flora_ray.config import config_to_dict, load_config
from flora_ray.results import binomial_se, unpack_correct
from flora_ray.search.evaluator import (
    Evaluator,
    anchor_points,
    cached_evaluator,
    config_to_genes,
    evaluator_builds,
    genes_to_config,
    supernet_from_numpy,
    uniform_points,
)
from flora_ray.stages.inputs import build_run_supernet
from flora_ray.stages.training import save_stage_outputs, train_worker
from flora_ray.storage.run_store import ARTEFACTS, RunStore
from flora_ray.testing.processes import kill_group
from flora_ray.training.trainer import LocalSession

TRIALS_FILE, PARETO_FILE, UNIFORM_FILE = ARTEFACTS.trials, ARTEFACTS.pareto, ARTEFACTS.uniform

DOCUMENTED_COLUMNS = {
    "trial",
    "generation",
    "state",
    "accuracy",
    "accuracy_se",
    "eval_images",
    "correct",
    "macs",
    "params",
    "eval_seconds",
    "triples",
    "ranks",
    "is_pareto",
}


def _space():
    return fr.build_supernet("test_vit", model_kwargs={"img_size": 32, "depth": 3}).space


def test_genes_round_trip_and_uniform_points():
    space = _space().restrict({"blocks.1": [(11, 11, 11), (64, 64, 64), (32, 32, 32)]})
    config = space.uniform(0.5)
    genes = config_to_genes(space, config)
    assert genes["blocks.1"] == 2 and genes_to_config(space, genes) == config
    assert set(uniform_points(space)) == {1 / 6, 0.5, 1.0}  # the filter kept only these uniform tuples of blocks.1
    with pytest.raises(ValueError, match="gene blocks.1=3 is out of range 0..2"):
        genes_to_config(space, {**genes, "blocks.1": 3})
    assert anchor_points(space) == list(uniform_points(space).values())  # the cheapest is uniform 1/6 here
    space = _space().restrict({"blocks.1": [(64, 64, 64), (11, 32, 11)]})
    anchors = anchor_points(space)
    assert anchors[:-1] == list(uniform_points(space).values()) and len(anchors) == 2  # 1.0, then the cheapest
    cheapest = genes_to_config(space, anchors[-1])
    assert cheapest == space.smallest() and cheapest["blocks.1.mlp.fc1"] == 32
    assert {r for f, r in cheapest.items() if f != "blocks.1.mlp.fc1"} == {11}


@pytest.mark.parametrize("family", ["vit", "swin_padded"])
def test_supernet_from_numpy_on_meta_equals_the_original(family):
    name, kwargs = TINY_MODELS[family]
    supernet = fr.build_supernet(name, model_kwargs=kwargs).eval()
    state = {k: v.numpy() for k, v in supernet.model.state_dict().items()}
    rebuilt = supernet_from_numpy(supernet.header(), state)
    config = supernet.space.uniform(0.5)
    supernet.set_ranks(config)
    rebuilt.set_ranks(config)
    x = input_for(supernet.model)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), supernet(x), rtol=0, atol=0)
    if family == "vit":  # no non-persistent buffers: the weights are the object-store arrays themselves
        assert rebuilt.model.blocks[0].attn.qkv.u.data_ptr() == state["blocks.0.attn.qkv.u"].ctypes.data


def test_evaluator_and_its_process_cache():
    supernet = fr.build_supernet("test_vit", model_kwargs={"img_size": 32, "num_classes": 10})
    images, labels = torch.randn(40, 3, 32, 32), torch.randint(0, 10, (40,))
    evaluator = Evaluator(supernet, images, labels, batch_size=16)
    config = supernet.space.uniform(0.5)
    metrics = evaluator.evaluate(config)
    supernet.set_ranks(config)
    with torch.no_grad():
        expected = 100.0 * (supernet(images).argmax(-1) == labels).float().mean().item()
    assert metrics["accuracy"] == pytest.approx(expected, abs=1e-4)
    correct = unpack_correct(metrics["correct"], metrics["eval_images"])  # per image, in image order
    with torch.no_grad():
        np.testing.assert_array_equal(correct, (supernet(images).argmax(-1) == labels).numpy())
    assert metrics["eval_images"] == 40 and metrics["accuracy_se"] == binomial_se(metrics["accuracy"], 40)
    assert metrics["macs"] == supernet.cost.macs(config) and metrics["params"] == supernet.cost.params(config)
    before = evaluator_builds()
    calls = []
    for _ in range(3):
        cached_evaluator("key-a", lambda: calls.append(1) or evaluator)
    assert len(calls) == 1 and evaluator_builds() == before + 1


def test_uniform_rows_carry_their_noise_in_the_trial_columns():
    from flora_ray.results import pack_correct
    from flora_ray.search.frames import uniform_frame
    from flora_ray.search.objectives import Objectives

    space = _space()
    correct = np.arange(10) % 3 == 0
    rows = [{"ratio": r, "ranks": c, "accuracy": 40.0, "accuracy_se": binomial_se(40.0, 10), "eval_images": 10,
             "correct": pack_correct(correct), "eval_seconds": 0.1, "macs": 1.0 + r, "params": 1.0}
            for r, c in space.uniform_all().items()]  # fmt: skip
    frame = uniform_frame(rows, space, Objectives())
    assert list(frame.columns[-4:]) == ["is_pareto", "correct", "ratio", "in_space"]  # trials_frame's, plus two
    assert frame["eval_images"].dtype == "Int64" and (frame["accuracy_se"] == binomial_se(40.0, 10)).all()
    np.testing.assert_array_equal(unpack_correct(frame["correct"].iloc[0], 10), correct)


SEARCHED = ["pretrain.epochs=8", "pretrain.batch_size=32", "pretrain.lr=0.003", "search.trials=30",
            "search.population=8", "search.eval_images=150", "search.concurrency=2"]  # fmt: skip


@pytest.fixture(scope="module")
def _searched_template(tmp_path_factory):
    """A digits teacher trained for a few seconds and its SVD supernet, made once for the module (read-only: each
    test gets its own copy through ``searched_run``)."""
    base = tmp_path_factory.mktemp("searched")
    cfg = load_config(None, [*DIGITS_OVERRIDES, f"run.output_dir={base / 'runs'}", *SEARCHED])
    torch.manual_seed(0)
    session = LocalSession(base / "ckpt")
    payload = {"config": config_to_dict(cfg), "stage": "pretrain", "run": str(cfg.run.run_dir)}
    train_worker(payload, session)
    store = RunStore(cfg.run.run_dir)
    save_stage_outputs(base / "ckpt" / "latest", store, "pretrain")
    supernet, _ = build_run_supernet(cfg, store)
    fr.save_supernet(supernet, cfg.run.run_dir / ARTEFACTS.supernet)
    return cfg.run.run_dir, supernet


@pytest.fixture
def searched_run(_searched_template, digits_config):
    """A run directory with a digits teacher trained for a few seconds and its SVD supernet: a copy of the module's
    template in this test's own directory (the tests search, interrupt and fail in it)."""
    template_dir, supernet = _searched_template
    cfg = digits_config(*SEARCHED)
    shutil.copytree(template_dir, cfg.run.run_dir)
    return cfg, copy.deepcopy(supernet)


def _brute_force_front(df):
    macs, acc = df["macs"].to_numpy(), df["accuracy"].to_numpy()
    return np.array(
        [
            not any(
                macs[j] <= macs[i] and acc[j] >= acc[i] and (macs[j] < macs[i] or acc[j] > acc[i])
                for j in range(len(df))
            )
            for i in range(len(df))
        ]
    )


# The search CLI with Ctrl-C pressed at a set point: right after the 8th trial of this process has ended (Optuna told,
# the journal written), the driver signals itself, as a user's Ctrl-C would. Watching the journal from outside and
# signalling raced fast machines: CI once saw all 16 trials finish before the signal landed.
INTERRUPTED_AFTER_8 = """
import os, signal, sys
import flora_ray.backends.ray_tune as glue
from flora_ray.cli import main
made = glue.progress_callback
def interrupting(total, after_trial, cost="macs"):
    ended = []
    def after():
        after_trial()
        ended.append(1)
        if len(ended) == 8:
            os.kill(os.getpid(), signal.SIGINT)
    return made(total, after, cost)
glue.progress_callback = interrupting
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_interrupted_search_continues_without_duplicates(searched_run, tmp_path):
    cfg, _ = searched_run
    data = config_to_dict(cfg)
    data["search"]["trials"] = 16  # two generations of 8: interrupted in the second, which the second run finishes
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(data))
    arguments = ["search", str(config_file), "search.concurrency=1"]
    journal = cfg.run.run_dir / "search_journal.log"
    first = subprocess.Popen(
        [sys.executable, "-c", INTERRUPTED_AFTER_8, *arguments],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = first.communicate(timeout=240)
    finally:
        kill_group(first.pid)  # whatever the interrupted driver left behind
    assert "Stop signal received" in out, out[-3000:]  # Tune took the Ctrl-C
    completed_first = journal.read_text().count('"state":1,')
    assert 8 <= completed_first < 16, f"the first search was not interrupted mid-way ({completed_first} trials)"
    command = [sys.executable, "-m", "flora_ray.cli", *arguments]
    second = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "search: continuing" in second.stdout + second.stderr
    trials = pd.read_parquet(cfg.run.run_dir / TRIALS_FILE)
    assert len(trials) == 16 and trials["trial"].is_unique and (trials["state"] == "COMPLETE").all()
    front = trials[trials["is_pareto"]]
    np.testing.assert_array_equal(trials["is_pareto"].to_numpy(), _brute_force_front(trials))
    assert len(front) >= 1


@pytest.fixture(scope="module")
def module_ray():
    """One local 2-CPU Ray for this module's in-process Ray searches (started at the first, stopped after the
    module): each test searches its own copy of the run, so one instance serves them all."""
    import ray

    from flora_ray.backends.ray import init_ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_search_end_to_end_with_budget_and_export(module_ray, searched_run, monkeypatch):
    from flora_ray.backends.ray import RayBackend
    from flora_ray.stages.export import export_from_run
    from flora_ray.stages.search import search_stage

    cfg, supernet = searched_run
    from dataclasses import replace

    budget = 0.8 * supernet.cost.dense_macs
    cfg = replace(cfg, search=replace(cfg.search, max_macs=budget))
    summary = search_stage(cfg, RayBackend())
    # Export: the extraction and every inference pass run in a Ray task; this (driver) process loads no
    # weights at all: each way of loading them raises here (Ray's worker processes do not see the patches).
    for where in (
        "flora_ray.storage.run_store.RunStore.read_checkpoint",
        "flora_ray.stages.export.load_teacher",
        "flora_ray.stages.export.load_subnet",
        "flora_ray.stages.export.run_supernet",
    ):
        monkeypatch.setattr(where, lambda *a, **k: pytest.fail("the driver loaded weights"))
    report = export_from_run(cfg.run.run_dir, max_macs=0.8 * supernet.cost.dense_macs, backend=RayBackend())
    monkeypatch.undo()
    run_dir = cfg.run.run_dir
    trials = pd.read_parquet(run_dir / TRIALS_FILE)
    assert set(trials.columns) >= DOCUMENTED_COLUMNS
    assert len(trials) == 30 and trials["trial"].is_unique and (trials["state"] == "COMPLETE").all()
    feasible = trials[trials["macs"] <= budget]
    np.testing.assert_array_equal(
        trials.loc[feasible.index, "is_pareto"].to_numpy(), _brute_force_front(feasible.reset_index(drop=True))
    )
    assert not trials.loc[trials["macs"] > budget, "is_pareto"].any()
    front = pd.read_parquet(run_dir / PARETO_FILE)
    assert (front["macs"] <= budget).all() and front["macs"].is_monotonic_increasing and len(front) >= 1
    uniform = pd.read_parquet(run_dir / UNIFORM_FILE)
    assert sorted(uniform["ratio"]) == [0.25, 0.5, 1.0]
    assert list(uniform.columns) == [*trials.columns, "ratio", "in_space"]  # same columns as the trials, plus two
    np.testing.assert_array_equal(
        uniform["is_pareto"].to_numpy(), _brute_force_front(uniform) & (uniform["macs"] <= budget).to_numpy()
    )
    assert 0 < summary["dense_accuracy"] <= 100 and summary["dense_macs"] == supernet.cost.dense_macs
    assert json.loads((run_dir / "search_summary.json").read_text())["front_size"] == len(front)
    # The uniform configurations were in the first generation, evaluated like every trial.
    first = trials[trials["generation"] == 0]
    for ranks in uniform["ranks"]:
        match = first[first["ranks"] == ranks]
        assert len(match) == 1
        assert match["accuracy"].iloc[0] == uniform.loc[uniform["ranks"] == ranks, "accuracy"].iloc[0]
        # On the same images, image by image: the paired comparisons of the report rest on this.
        assert match["correct"].iloc[0] == uniform.loc[uniform["ranks"] == ranks, "correct"].iloc[0]
    n = int(trials["eval_images"].iloc[0])  # the images evaluated (the stratified subset may hold fewer than asked)
    assert 100 <= n <= 150 and (trials["eval_images"] == n).all() and (uniform["eval_images"] == n).all()
    np.testing.assert_allclose(trials["accuracy_se"], [binomial_se(a, n) for a in trials["accuracy"]])
    metadata = pq.read_schema(run_dir / TRIALS_FILE).metadata
    assert json.loads(metadata[b"flora_ray.config"])["search"]["trials"] == 30
    assert set(json.loads(metadata[b"flora_ray.versions"])) >= {"torch", "timm", "flora_ray"}
    assert summary["evaluator_builds"] and set(summary["evaluator_builds"].values()) == {1}  # once per process
    assert (run_dir / "pareto.png").read_bytes()[:4] == b"\x89PNG" and (run_dir / "hypervolume.png").stat().st_size > 0
    assert report["macs"] <= budget and 0 <= report["test_accuracy"] <= 100 and report["device"] == "cpu"
    exported = run_dir / "export" / f"trial_{report['trial']}"
    assert (exported / "export.json").is_file()
    model = fr.load_subnet(exported)  # the files the driver wrote from the task's bytes load as an export
    assert model(input_for(model)).shape == (2, 10)


@pytest.mark.slow
def test_failing_and_nan_trials_are_marked_failed_and_the_search_goes_on(module_ray, searched_run):
    from flora_ray.stages.search import search_stage
    from flora_ray.testing.faults import FaultyRayBackend

    cfg, supernet = searched_run
    from dataclasses import replace

    cfg = replace(cfg, search=replace(cfg.search, trials=12, population=4))
    space = supernet.space
    first_block = sorted(b.name for b in space.blocks)[0]
    # The enqueued uniform configurations are always evaluated: make the 0.5 one raise and the 0.25 one yield NaN.
    raising = config_to_genes(space, space.uniform(0.5))[first_block]
    nan = config_to_genes(space, space.uniform(0.25))[first_block]
    summary = search_stage(cfg, FaultyRayBackend(raise_if_first_gene=raising, nan_if_first_gene=nan))
    trials = pd.read_parquet(cfg.run.run_dir / TRIALS_FILE)
    assert len(trials) == 12 and trials["trial"].is_unique
    genes = trials["ranks"].map(lambda r: config_to_genes(space, json.loads(r))[first_block])
    bad = genes.isin([raising, nan])
    assert bad.sum() >= 2 and (trials.loc[bad, "state"] == "FAIL").all()
    assert (trials.loc[~bad, "state"] == "COMPLETE").all() and summary["failed"] == bad.sum()
    assert not trials.loc[bad, "is_pareto"].any() and trials.loc[~bad, "accuracy"].notna().all()


def test_uniform_baselines_outside_a_filtered_space_are_evaluated():
    supernet = fr.build_supernet("test_vit", model_kwargs={"img_size": 32, "num_classes": 10, "depth": 2})
    supernet.space = supernet.space.restrict({"blocks.0": [(64, 64, 64)]})
    outside = supernet.space.uniform_all()[0.5]
    with pytest.raises(ValueError, match="are not among its kept candidates"):
        supernet.set_ranks(outside)
    evaluator = Evaluator(supernet, torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))
    metrics = evaluator.evaluate(outside)
    assert supernet.active_ranks() == outside and metrics["macs"] == supernet.cost.macs(outside)


@pytest.mark.slow
def test_in_process_search_equals_ray_tune_at_concurrency_one(module_ray, searched_run, tmp_path):
    """Both backends ask and tell the same study in the same order: same trials, same accuracies."""
    from flora_ray.backends.local import LocalBackend
    from flora_ray.backends.ray import RayBackend
    from flora_ray.stages.search import search_stage

    cfg, _ = searched_run
    from dataclasses import replace

    cfg = replace(cfg, search=replace(cfg.search, trials=14, population=4, concurrency=1))
    before = evaluator_builds()
    summary = search_stage(cfg, LocalBackend())
    local = pd.read_parquet(cfg.run.run_dir / TRIALS_FILE)
    assert summary["complete"] == 14 and summary["evaluator_builds"] == {str(os.getpid()): before + 1}
    for name in (TRIALS_FILE, PARETO_FILE, UNIFORM_FILE, ARTEFACTS.journal, ARTEFACTS.search_summary):
        (cfg.run.run_dir / name).unlink()
    search_stage(cfg, RayBackend())
    tuned = pd.read_parquet(cfg.run.run_dir / TRIALS_FILE)
    columns = ["trial", "generation", "state", "ranks", "accuracy", "macs", "params", "is_pareto"]
    pd.testing.assert_frame_equal(local[columns], tuned[columns])


@pytest.mark.slow
def test_in_process_search_marks_failures_and_continues_an_interrupted_study(searched_run):
    from flora_ray.backends.local import LocalBackend
    from flora_ray.search.study import RETRY_OF
    from flora_ray.stages.search import search_problem, search_stage
    from flora_ray.testing.faults import FaultyLocalBackend

    cfg, supernet = searched_run
    from dataclasses import replace

    cfg = replace(cfg, search=replace(cfg.search, trials=10, population=4))

    class Interrupted(LocalBackend):
        calls = 0

        def evaluate(self, problem, genes):
            self.calls += 1
            if self.calls == 5:
                raise KeyboardInterrupt  # Ctrl-C during the fifth evaluation
            return problem.evaluate(genes)

    with pytest.raises(KeyboardInterrupt):
        search_stage(cfg, Interrupted())
    space = supernet.space
    first_block = sorted(b.name for b in space.blocks)[0]
    raising = config_to_genes(space, space.uniform(1.0))[first_block]
    summary = search_stage(cfg, FaultyLocalBackend(nan_if_first_gene=raising))
    trials = pd.read_parquet(cfg.run.run_dir / TRIALS_FILE)
    stale = trials[trials["trial"] == 4].iloc[0]
    assert stale["state"] == "FAIL"  # left running by the interrupted session
    study = search_problem(cfg, RunStore(cfg.run.run_dir)).load_study()
    retries = [t for t in study.trials if t.user_attrs.get(RETRY_OF) == 4]
    assert len(retries) == 1 and retries[0].params == study.trials[4].params  # its genes were evaluated again
    assert retries[0].state.name in ("COMPLETE", "FAIL") and retries[0].number > 4
    assert summary["complete"] + summary["failed"] == 11  # 10 trials plus the stale one
    genes = trials["ranks"].map(lambda r: config_to_genes(space, json.loads(r))[first_block] if r else None)
    late = trials["trial"] > 4
    assert (trials.loc[late & (genes == raising), "state"] == "FAIL").all()
    assert not trials.loc[trials["state"] == "FAIL", "is_pareto"].any()


@pytest.mark.slow
def test_sensitivity_guided_allocations_the_space_holds_are_evaluated_first(searched_run):
    from dataclasses import replace

    from flora_ray.backends.local import LocalBackend
    from flora_ray.search.sensitivity import guided_allocations
    from flora_ray.stages.search import search_stage

    cfg, supernet = searched_run
    space, run_dir = supernet.space, cfg.run.run_dir
    # a filtered space: block 0 keeps the triples with qkv at 1/4 or full rank, so only some allocations fit
    kept = {b.name: [c for c in b.candidates if b.name != "blocks.0" or c[0] in (8, 32)] for b in space.blocks}
    supernet.space = space = space.restrict(kept)
    fr.save_supernet(supernet, run_dir / ARTEFACTS.supernet)
    cfg = replace(cfg, search=replace(cfg.search, trials=20, population=4, concurrency=1))
    summary = search_stage(cfg, LocalBackend())
    table = pd.read_parquet(run_dir / ARTEFACTS.sensitivity)
    assert table["kind"].tolist() == ["full"] + ["layer"] * len(space.fqns) and table["layer"].iloc[
        1:
    ].tolist() == list(space.fqns)
    np.testing.assert_allclose(table["drop"], table["accuracy"].iloc[0] - table["accuracy"])
    drops = dict(zip(table["layer"].iloc[1:], table["drop"].iloc[1:], strict=True))
    every = guided_allocations(space, drops, supernet.cost)
    held = sorted((a for a in every if space.contains(a["ranks"])), key=lambda a: a["macs"])
    assert 0 < len(held) < len(every)  # the filter dropped some
    uniform = [json.dumps(c) for c in space.uniform_configs().values()]
    guided = [json.dumps(a["ranks"]) for a in held if json.dumps(a["ranks"]) not in uniform]
    assert len(guided) > 4  # more than the population: 4 of them, evenly over their MACs, both ends kept
    picks = [guided[round(i * (len(guided) - 1) / 3)] for i in range(4)]
    trials = pd.read_parquet(run_dir / TRIALS_FILE).sort_values("trial")
    first = trials[trials["enqueued"]]["ranks"].map(lambda r: json.dumps(json.loads(r))).tolist()
    assert first[: len(uniform)] == uniform and first[len(uniform) :] == picks
    assert summary["guided_anchors"] == 4
    measured_at = (run_dir / ARTEFACTS.sensitivity).stat().st_mtime_ns
    search_stage(cfg, LocalBackend())  # done already: the stored sensitivities are this supernet's, not measured again
    assert (run_dir / ARTEFACTS.sensitivity).stat().st_mtime_ns == measured_at

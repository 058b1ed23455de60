"""Choosing a subnet per budget after fine-tuning (``Run.refine``, ``flora-ray refine``) on a copy of the finished
run of ``experiments/digits_tiny.yaml`` (``digits_tiny_run`` of ``tests/conftest.py``), with two budgets that share
candidates: each budget's winner is its most
accurate candidate after fine-tuning, every candidate is within its budget and costed as the cost model says, the
uniform row is the best uniform configuration within the budget, the paired difference and its standard error are
the hand computation from the per-image correctness, a shared configuration is fine-tuned once, a candidate's
accuracy is what ``flora-ray finetune`` gives the same trial on the same schedule, bad input is one line and exit 2.
"""

import json
import logging
import math
import shutil

import pandas as pd
import pytest

import flora_ray as fr
from flora_ray.cli import main
from flora_ray.data.datasets import build_datasets
from flora_ray.records import RefineSummary
from flora_ray.results import unpack_correct
from flora_ray.storage.run_store import ARTEFACTS

pytestmark = pytest.mark.slow
# The run's fine-tune recipe (2 epochs of distillation), at a learning rate that moves a subnet in 2 x 21 steps.
RECIPE = ["finetune.lr=0.001"]
K = 2


class _Lines(logging.Handler):
    """The messages logged while it is attached."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def refined(digits_tiny_run, tmp_path_factory):
    """``(run, frame, budgets, log lines)``: ``Run.refine`` of a copy of the finished run at two MAC budgets: the
    whole front, and the cost of its second most expensive point (so that the two budgets share a front point)."""
    source = digits_tiny_run
    target = tmp_path_factory.mktemp("refine") / "run"
    shutil.copytree(source.location, target, ignore=shutil.ignore_patterns(ARTEFACTS.ray))
    run = fr.Run.open(target)
    costs = sorted(run.front["macs"].unique())
    assert len(costs) >= 2, run.front  # the fixture's front has points to choose between
    budgets = [float(costs[-2]), float(costs[-1])]
    handler, logger = _Lines(), logging.getLogger("flora_ray.stages.refine")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        frame = run.refine({"macs": budgets}, k=K, overrides=RECIPE, backend="local")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return run, frame, budgets, handler.lines


def _budgets(frame):
    return [group for _, group in frame.groupby(["budget_axis", "budget_value"], sort=False)]


def test_each_budgets_winner_is_its_most_accurate_candidate_after_fine_tuning(refined):
    run, frame, budgets, _ = refined
    assert sorted(frame["budget_value"].unique()) == budgets and set(frame["budget_axis"]) == {"macs"}
    summary = run.refine_summary
    assert [b.value for b in summary.budgets] == budgets
    for group, budget in zip(_budgets(frame), summary.budgets, strict=True):
        assert group["winner"].sum() == 1
        winner = group[group["winner"]].iloc[0]
        assert winner["test_accuracy"] == group["test_accuracy"].max()
        assert budget.winner.test_accuracy == winner["test_accuracy"] and budget.winner.kind == winner["kind"]
        assert budget.candidates == len(group)
    written = run.store.read_parquet(ARTEFACTS.refine_table)
    pd.testing.assert_frame_equal(written, frame.reset_index(drop=True), check_dtype=False)
    assert RefineSummary.from_dict(summary.to_dict()) == summary  # the record round-trips


def test_candidates_are_the_front_top_k_within_the_budget_and_costed_by_the_cost_model(refined):
    run, frame, _, _ = refined
    cost = run.supernet.cost
    for _, row in frame.iterrows():
        ranks = json.loads(row["ranks"])
        assert row["macs"] <= row["budget_value"]
        assert row["macs"] == cost.macs(ranks) and row["params"] == cost.params(ranks)
    front = run.front
    for group in _budgets(frame):
        within = front[front["macs"] <= group["budget_value"].iloc[0]]
        ours = group[group["kind"] == "front"].sort_values("position")
        assert len(ours) == min(K, len(within))
        top = within.sort_values(["accuracy", "macs"], ascending=[False, True]).head(K)
        assert list(ours["trial"]) == list(top["trial"])
        assert list(ours["inherited_accuracy"]) == list(top["accuracy"])


def test_the_uniform_row_is_the_best_uniform_configuration_within_the_budget(refined):
    run, frame, _, _ = refined
    uniform = run.uniform
    for group in _budgets(frame):
        ours = group[group["kind"] == "uniform"]
        within = uniform[uniform["macs"] <= group["budget_value"].iloc[0]]
        assert len(ours) == 1 and not within.empty
        assert ours["inherited_accuracy"].iloc[0] == within["accuracy"].max()
        best = within[within["accuracy"] == within["accuracy"].max()].sort_values("macs").iloc[0]
        assert ours["ratio"].iloc[0] == best["ratio"] and json.loads(ours["ranks"].iloc[0]) == json.loads(best["ranks"])


def test_the_paired_difference_and_its_se_are_the_hand_computation(refined):
    run, frame, _, _ = refined
    assert frame["test_images"].nunique() == 1  # every candidate on the same test images
    splits = build_datasets(run.config.data)
    assert set(frame["test_images"]) == {len(splits.test)} and set(frame["train_images"]) == {len(splits.train)}
    summary = run.refine_summary
    for group, budget in zip(_budgets(frame), summary.budgets, strict=True):
        uniform = group[group["kind"] == "uniform"].iloc[0]
        theirs = unpack_correct(uniform["correct"], int(uniform["test_images"]))
        for _, row in group.iterrows():
            ours = unpack_correct(row["correct"], int(row["test_images"]))
            n = len(ours)
            assert row["test_accuracy"] == pytest.approx(100.0 * ours.sum() / n)
            b = sum(1 for x, y in zip(ours, theirs, strict=True) if x and not y)
            c = sum(1 for x, y in zip(ours, theirs, strict=True) if y and not x)
            assert row["diff_vs_uniform"] == pytest.approx(100.0 * (b - c) / n)
            assert row["diff_vs_uniform"] == pytest.approx(row["test_accuracy"] - uniform["test_accuracy"])
            assert row["diff_se"] == pytest.approx(100.0 * math.sqrt(b + c - (b - c) ** 2 / n) / n)
        winner = group[group["winner"]].iloc[0]
        assert budget.difference == winner["diff_vs_uniform"] and budget.se == winner["diff_se"]
        close = budget.difference == 0 or abs(budget.difference) < budget.se
        expected = "uniform" if winner["kind"] == "uniform" else "close call" if close else "gain"
        assert budget.verdict == expected


def test_a_configuration_shared_by_two_budgets_is_fine_tuned_once(refined):
    run, frame, _, lines = refined
    shared = frame.groupby("ranks")["budget_value"].nunique()
    assert (shared > 1).any(), frame[["budget_value", "kind", "trial", "ratio"]]
    tuned = [line for line in lines if line.startswith("refine: fine-tuned ")]
    assert len(tuned) == frame["ranks"].nunique() == run.refine_summary.fine_tunes < len(frame)
    for _, rows in frame.groupby("ranks"):  # one fine-tune's figures on every row of the configuration
        assert rows["test_accuracy"].nunique() == 1 and rows["correct"].nunique() == 1


def test_a_candidates_accuracy_is_what_flora_ray_finetune_gives_it(refined, tmp_path, capsys):
    run, frame, _, _ = refined
    row = frame[frame["kind"] == "front"].iloc[0]
    copy = tmp_path / "run"
    shutil.copytree(run.location, copy, ignore=shutil.ignore_patterns(ARTEFACTS.ray))
    assert main(["finetune", str(copy), "--trial", str(int(row["trial"])), "--backend", "local", *RECIPE]) == 0
    capsys.readouterr()
    report = json.loads((copy / ARTEFACTS.finetune_result(int(row["trial"]))).read_text())
    assert report["test_accuracy"] == pytest.approx(row["test_accuracy"], abs=1e-9)
    assert report["test_accuracy_before"] == pytest.approx(row["inherited_test_accuracy"], abs=1e-9)


def test_cli_refine_prints_each_budgets_choice_and_repeats_the_apis_figures(refined, tmp_path, capsys):
    run, frame, budgets, _ = refined
    copy = tmp_path / "run"
    shutil.copytree(run.location, copy, ignore=shutil.ignore_patterns(ARTEFACTS.ray, ARTEFACTS.refine_table))
    assert main(["refine", str(copy), "--max-macs", str(budgets[0]), "--k", "1", "--backend", "local", *RECIPE]) == 0
    out = capsys.readouterr().out
    again = pd.read_parquet(copy / ARTEFACTS.refine_table)
    assert out.startswith("macs <= ") and "after fine-tuning" in out and str(copy / ARTEFACTS.refine_table) in out
    assert len(again) == 1 + (again["kind"] == "uniform").sum() and set(again["budget_value"]) == {budgets[0]}
    # (a front point may be a uniform configuration: the same ranks listed twice, fine-tuned once)
    earlier = frame.drop_duplicates(["budget_value", "ranks"]).set_index(["budget_value", "ranks"])["test_accuracy"]
    for _, row in again.iterrows():  # the same configuration, seed and schedule: the same number
        assert row["test_accuracy"] == earlier[(row["budget_value"], row["ranks"])]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--max-macs", "1"],
            "no front point or uniform configuration has macs <= 1 (0.00 MMACs); the cheapest needs ",
        ),
        ([], "give at least one budget"),
        (["--max-macs", "-5"], "budget macs <= -5.0 is invalid: give a positive number"),
        (["--max-macs", "1e9", "train.epochs=9"], "train.epochs=9 would change the run's results"),
        (["--max-macs", "1e9", "refine.k=0"], "refine.k=0 is invalid"),
        (["--max-macs", "1e9", "--k", "0"], "0 must be a positive integer"),
    ],
)
def test_bad_refine_input_is_one_line_and_exit_2(digits_tiny_run, capsys, args, message):
    run = digits_tiny_run
    try:
        code = main(["refine", run.location, "--backend", "local", *args])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not run.store.exists(ARTEFACTS.refine_table) and not run.store.exists(ARTEFACTS.refine_summary)


def test_budgets_in_python_are_checked_before_any_fine_tune(digits_tiny_run):
    run = digits_tiny_run
    with pytest.raises(ValueError, match="budget axis 'flops' is not one of"):
        run.refine({"flops": 1e6}, backend="local")
    with pytest.raises(ValueError, match="budget macs <= 'many' is invalid"):
        run.refine([("macs", "many")], backend="local")
    assert not run.store.exists(ARTEFACTS.refine_table)


def test_train_images_and_epochs_set_every_candidates_schedule(refined, tmp_path):
    """``refine.train_images``: a stratified subset of the training split, the same size for every candidate;
    ``refine.epochs`` replaces ``finetune.epochs`` in the recorded settings."""
    run, _, budgets, _ = refined
    copy = tmp_path / "run"
    shutil.copytree(run.location, copy, ignore=shutil.ignore_patterns(ARTEFACTS.ray))
    short = ["refine.train_images=200", "refine.epochs=1"]
    frame = fr.Run.open(copy).refine({"macs": budgets[0]}, k=1, overrides=[*RECIPE, *short], backend="local")
    assert set(frame["train_images"]) == {200}
    summary = fr.Run.open(copy).refine_summary
    assert summary.settings["epochs"] == 1 and summary.settings["train_images"] == 200

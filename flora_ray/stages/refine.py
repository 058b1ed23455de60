"""``flora-ray refine``: choose the subnet of each budget after fine-tuning, not on inherited accuracy.

Inherited (supernet) accuracy ranks subnets differently from their accuracy after even a short fine-tune, so the
best model at a budget needs the fine-tune in the loop. For each budget (MACs, parameters or predicted latency in
ms) the ``refine.k`` front points most accurate within it by inherited accuracy (``pareto.parquet``, which holds
the uniform configurations that are on the front) and the best uniform configuration within it (``uniform.parquet``)
are fine-tuned on one schedule (``finetune_subnet``: the ``finetune`` recipe, distillation from the run's teacher,
with ``refine.epochs`` and ``refine.train_images``), one backend task per configuration, each configuration once
however many budgets share it. Every candidate is scored on the whole test split, so any two are compared paired
(``results.paired_difference``). The driver writes ``refine.parquet`` (one row per budget and candidate) and
``refine.json`` (``records.RefineSummary``).

The winner is chosen on the test split that reports it, among ``k + 1`` candidates: its test accuracy is slightly
optimistic, and the paired comparison with the best uniform configuration says when the choice is a close call.

Each candidate trains in one process (one task), as ``finetune_subnet``: its figures are those of ``flora-ray
finetune`` with ``--backend local`` or one training worker; ``flora-ray finetune`` on Ray Train with
``scaling.num_workers`` > 1 trains data-parallel, an effective batch that many times larger, so it differs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import numbers
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from flora_ray.backends.base import Backend, TaskMap
from flora_ray.backends.local import LocalBackend
from flora_ray.config import COST_AXES, Config, build_dataclass, config_to_dict
from flora_ray.core.subnet import package_versions
from flora_ray.data.datasets import build_datasets, eval_subset
from flora_ray.data.listing import run_listing
from flora_ray.errors import InputError, MissingInput
from flora_ray.records import RefineBudget, RefineCandidate, RefineSummary
from flora_ray.results import (
    format_cost,
    load_front,
    load_uniform,
    pack_correct,
    paired_difference,
    ranked_under,
    unpack_correct,
)
from flora_ray.stages.finetune import finetune_settings, finetune_subnet
from flora_ray.stages.inputs import provenance
from flora_ray.stages.runs import NothingWithin, calibrate_subnet, config_with_overrides, run_supernet
from flora_ray.stages.search import trial_resources
from flora_ray.storage.run_store import ARTEFACTS, RunStore
from flora_ray.training.worker import run_device, setup_worker

logger = logging.getLogger(__name__)

STAGE = "refine"
FRONT, UNIFORM = "front", "uniform"  # a candidate's kind
# The columns of refine.parquet, in order (``correct``, long strings, last).
COLUMNS = ("budget_axis", "budget_value", "kind", "position", "trial", "ratio", "ranks", "macs", "params",
           "latency_ms", "inherited_accuracy", "inherited_test_accuracy", "test_accuracy", "winner",
           "diff_vs_uniform", "diff_se", "test_images", "train_images", "seconds", "correct")  # fmt: skip


def parse_budgets(budgets: Mapping[str, Any] | Sequence[tuple[str, float]]) -> list[tuple[str, float]]:
    """``[(axis, value), ...]`` of ``budgets``: a mapping of axis (``macs``, ``params``, ``latency_ms``) to one value
    or a list of values, or a sequence of ``(axis, value)`` pairs; at least one, each value positive."""
    items = budgets.items() if isinstance(budgets, Mapping) else budgets
    pairs: list[tuple[str, float]] = []
    for item in items:
        if not (isinstance(item, Sequence) and len(item) == 2):
            raise InputError(f"budget {item!r} is not an (axis, value) pair: give e.g. {{'macs': [2e6, 3e6]}}")
        axis, values = item
        for value in values if isinstance(values, Sequence) and not isinstance(values, str) else [values]:
            if axis not in COST_AXES:
                raise InputError(f"budget axis {axis!r} is not one of {list(COST_AXES)}")
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
                raise InputError(f"budget {axis} <= {value!r} is invalid: give a positive number")
            pairs.append((axis, float(value)))
    if not pairs:
        raise InputError("give at least one budget: --max-macs M, --max-params P or --max-latency-ms T")
    return list(dict.fromkeys(pairs))  # a budget named twice is refined once


def _rows(frame: pd.DataFrame, *, kind: str) -> pd.DataFrame:
    """The candidate columns of front or uniform rows."""
    ratio = frame["ratio"] if kind == UNIFORM else pd.Series(math.nan, index=frame.index)
    trial = frame["trial"] if kind == FRONT else pd.Series(pd.NA, index=frame.index)
    return pd.DataFrame({
        "kind": kind, "trial": pd.array(trial, dtype="Int64"), "ratio": ratio.astype(float),
        "ranks": [json.dumps(json.loads(r), sort_keys=True) for r in frame["ranks"]],
        "macs": frame["macs"].astype(float), "params": frame["params"].astype(float),
        "latency_ms": frame["latency_ms"].astype(float), "inherited_accuracy": frame["accuracy"].astype(float),
    })  # fmt: skip


def budget_candidates(front: pd.DataFrame, *, uniform: pd.DataFrame, axis: str, value: float, k: int) -> pd.DataFrame:
    """The candidates of one budget: the ``k`` front points most accurate within it by inherited accuracy (the
    cheaper first on ties), then the most accurate uniform configuration within it, if any (``position`` 0)."""
    ours = _rows(ranked_under(front, max_cost=value, cost=axis).head(k), kind=FRONT)
    ours.insert(1, "position", range(1, len(ours) + 1))
    best_uniform = _rows(ranked_under(uniform, max_cost=value, cost=axis).head(1), kind=UNIFORM)
    best_uniform.insert(1, "position", 0)
    rows = pd.concat([ours, best_uniform], ignore_index=True)
    if rows.empty:
        cheapest = pd.concat([front[axis], uniform[axis]]).min()
        raise NothingWithin(
            f"no front point or uniform configuration has {axis} <= {value:g} ({format_cost(axis, value)}); the "
            f"cheapest needs {cheapest:g} ({format_cost(axis, cheapest)}): raise the budget"
        )
    return rows.assign(budget_axis=axis, budget_value=value)


def plan_refine(store: RunStore, *, budgets: Sequence[tuple[str, float]], k: int) -> pd.DataFrame:
    """Every budget's candidates (``budget_candidates``), budget after budget; ``NothingWithin`` names a budget
    nothing reaches, an ``InputError`` an axis the run did not measure."""
    front, uniform = load_front(store), load_uniform(store)
    if front.empty:
        raise InputError(f"the front of {store.root!r} is empty: every trial failed or broke the budget")
    plans = []
    for axis, value in budgets:
        if front[axis].isna().all():
            raise InputError(
                f"the run's front has no {axis}: run `flora-ray profile` and search again, or use --max-macs"
            )
        plans.append(budget_candidates(front, uniform=uniform, axis=axis, value=value, k=k))
    return pd.concat(plans, ignore_index=True)


def check_refine(
    run: str | os.PathLike | RunStore,
    *,
    budgets: Mapping[str, Any] | Sequence[tuple[str, float]],
    k: int | None = None,
    overrides: Sequence[str] = (),
) -> tuple[RunStore, Config, pd.DataFrame]:
    """``(store, configuration, candidates)`` of a refine request, or the error naming what is wrong: not a searched
    run, a budget (bad, or one nothing reaches), an override outside ``refine.*`` / ``finetune.*`` and the
    speed-only keys. ``k`` overrides ``refine.k``."""
    store = run if isinstance(run, RunStore) else RunStore(run)
    if not store.is_file(ARTEFACTS.pareto):
        raise MissingInput(f"{store.location(ARTEFACTS.pareto)!r} does not exist: run `flora-ray search` first")
    pairs = parse_budgets(budgets)
    extra = [] if k is None else [f"{STAGE}.k={k}"]
    cfg = config_with_overrides(store, overrides=[*overrides, *extra], sections=(STAGE, "finetune"), what="refine")
    return store, cfg, plan_refine(store, budgets=pairs, k=cfg.refine.k)


def refine_schedule(cfg: Config) -> dict[str, Any]:
    """The ``finetune`` keys every candidate is fine-tuned with: ``refine.epochs`` when set."""
    return {} if cfg.refine.epochs is None else {"epochs": cfg.refine.epochs}


def refine_task(shared: dict[str, Any], ranks: str) -> dict[str, Any]:
    """Fine-tune the configuration ``ranks`` (JSON) of the run ``shared["run"]`` with ``shared["config"]``'s
    schedule, from the supernet's weights with its BatchNorm statistics recalibrated as the search scored it, and
    score it on the whole test split before and after: the figures and the per-image correctness after."""
    cfg: Config = build_dataclass(Config, shared["config"], "")
    store = RunStore(shared["run"])
    setup_worker(cfg.run.threads_per_worker)  # as a fine-tune's worker: one run's fine-tunes train alike
    device = run_device(cfg, "search.gpus_per_trial")
    supernet, config = run_supernet(store), json.loads(ranks)
    calibrate_subnet(supernet, config, cfg)
    splits = build_datasets(cfg.data, pixels=("train",), listing=run_listing(cfg))
    if cfg.refine.train_images is not None:  # the same stratified, seeded images for every candidate
        splits = dataclasses.replace(splits, train=eval_subset(splits.train, cfg.refine.train_images, cfg.data.seed))
    result = finetune_subnet(cfg, config, run=store, supernet=supernet, splits=splits, device=device,
                             within_candidates=False, **refine_schedule(cfg))  # fmt: skip
    correct = result["test_correct"]
    return {
        "inherited_test_accuracy": result["test_accuracy_before"],
        "test_accuracy": 100.0 * int(correct.sum()) / len(correct),
        "test_images": len(correct),
        "train_images": len(splits.train),  # the images it was fine-tuned on (each epoch: the full batches of them)
        "correct": pack_correct(correct),
        "seconds": result["seconds"],
        "device": str(device),
    }


def fine_tune_candidates(
    store: RunStore, *, cfg: Config, candidates: pd.DataFrame, backend: Backend
) -> dict[str, dict]:
    """Each distinct configuration of ``candidates`` fine-tuned once (``refine_task`` on ``backend``, at most
    ``refine.concurrency`` at once), by its ranks (canonical JSON)."""
    distinct = list(dict.fromkeys(candidates["ranks"]))
    names = {r: _name(candidates[candidates["ranks"] == r].iloc[0]) for r in distinct}
    logger.info("refine: %d distinct configuration(s) of %d candidate(s) to fine-tune", len(distinct), len(candidates))
    shared = {"run": store.uri, "config": config_to_dict(cfg)}
    job = TaskMap(refine_task, shared, distinct, trial_resources(cfg), cfg.refine.concurrency, cfg.run.max_failures)
    results: dict[str, dict] = {}
    for ranks, figures in backend.map(job):
        results[ranks] = figures
        logger.info("refine: fine-tuned %s (%d/%d): test accuracy %.2f%% -> %.2f%% in %.0f s", names[ranks],
                    len(results), len(distinct), figures["inherited_test_accuracy"], figures["test_accuracy"],
                    figures["seconds"])  # fmt: skip
    return results


def _name(row: pd.Series) -> str:
    return f"trial {row['trial']}" if row["kind"] == FRONT else f"uniform {row['ratio']:g}"


def compare_candidates(candidates: pd.DataFrame, *, results: Mapping[str, dict]) -> pd.DataFrame:
    """``candidates`` with their fine-tuned figures, the ``winner`` of each budget (the most accurate after
    fine-tuning; the cheaper on the budget's axis on ties, then the uniform configuration, then the front's order)
    and each candidate's paired difference to the budget's uniform configuration on the test images
    (``diff_vs_uniform``, ``diff_se``; NaN without one)."""
    figures = pd.DataFrame([results[r] for r in candidates["ranks"]], index=candidates.index)
    frame = candidates.join(figures.drop(columns=["device"]))
    frame["winner"], frame["diff_vs_uniform"], frame["diff_se"] = False, math.nan, math.nan
    for _, group in frame.groupby(["budget_axis", "budget_value"], sort=False):
        axis = group["budget_axis"].iloc[0]
        order = group.assign(_cost=group[axis]).sort_values(["test_accuracy", "_cost", "position"],
                                                           ascending=[False, True, True], kind="stable")  # fmt: skip
        frame.loc[order.index[0], "winner"] = True
        uniform = group[group["kind"] == UNIFORM]
        if uniform.empty:
            continue
        theirs = unpack_correct(uniform["correct"].iloc[0], int(uniform["test_images"].iloc[0]))
        for index, row in group.iterrows():
            ours = unpack_correct(row["correct"], int(row["test_images"]))
            frame.loc[index, ["diff_vs_uniform", "diff_se"]] = paired_difference(ours, theirs)
    return frame[list(COLUMNS)]


def verdict(difference: float, *, se: float, winner_kind: str) -> str:
    """``uniform`` (the uniform configuration won), ``close call`` (``|difference| < se``, or no difference at all),
    else ``gain``: never a gain within one paired standard error."""
    if winner_kind == UNIFORM:
        return "uniform"
    return "close call" if difference == 0 or abs(difference) < se else "gain"


def _candidate(row: pd.Series) -> RefineCandidate:
    return RefineCandidate(
        kind=row["kind"], trial=None if pd.isna(row["trial"]) else int(row["trial"]),
        ratio=None if pd.isna(row["ratio"]) else float(row["ratio"]), macs=float(row["macs"]),
        params=float(row["params"]), latency_ms=None if pd.isna(row["latency_ms"]) else float(row["latency_ms"]),
        inherited_accuracy=float(row["inherited_accuracy"]), test_accuracy=float(row["test_accuracy"]),
    )  # fmt: skip


def budget_summary(group: pd.DataFrame) -> RefineBudget:
    """The ``RefineBudget`` of one budget's rows of ``compare_candidates``."""
    winner = group[group["winner"]].iloc[0]
    uniform = group[group["kind"] == UNIFORM]
    common = {"axis": str(winner["budget_axis"]), "value": float(winner["budget_value"]), "candidates": len(group),
              "winner": _candidate(winner)}  # fmt: skip
    if uniform.empty:
        return RefineBudget(**common, verdict="no uniform")
    difference, se = float(winner["diff_vs_uniform"]), float(winner["diff_se"])
    return RefineBudget(**common, uniform=_candidate(uniform.iloc[0]), difference=difference, se=se,
                        verdict=verdict(difference, se=se, winner_kind=winner["kind"]))  # fmt: skip


def refine_from_run(
    run: str | os.PathLike | RunStore,
    *,
    budgets: Mapping[str, Any] | Sequence[tuple[str, float]],
    k: int | None = None,
    overrides: Sequence[str] = (),
    backend: Backend | None = None,
) -> tuple[pd.DataFrame, RefineSummary]:
    """Refine a searched run's choice at each of ``budgets`` (``parse_budgets``; ``k``: ``refine.k``;
    ``overrides``: ``refine.*``, ``finetune.*`` or speed-only ``key=value``) on ``backend`` (default: this
    process). Writes and returns ``refine.parquet`` (``compare_candidates``) and ``refine.json``."""
    store, cfg, candidates = check_refine(run, budgets=budgets, k=k, overrides=overrides)
    started = time.perf_counter()
    results = fine_tune_candidates(store, cfg=cfg, candidates=candidates, backend=backend or LocalBackend())
    frame = compare_candidates(candidates, results=results)
    settings = {**finetune_settings(cfg), **refine_schedule(cfg), "train_images": cfg.refine.train_images}
    summary = RefineSummary(
        budgets=[budget_summary(g) for _, g in frame.groupby(["budget_axis", "budget_value"], sort=False)],
        k=cfg.refine.k, settings=settings, fine_tunes=len(results), test_images=int(frame["test_images"].iloc[0]),
        seed=cfg.run.seed, device=next(iter(results.values()))["device"], versions=package_versions(),
        seconds=time.perf_counter() - started,
    )  # fmt: skip
    store.write_parquet(ARTEFACTS.refine_table, frame, provenance(cfg, refine=json.dumps(summary.settings)))
    summary.write(store)
    for budget in summary.budgets:
        logger.info("refine: %s", budget.describe())
    return frame, summary

"""Search results as pandas frames: one row per trial (``trials.parquet``) and the uniform baseline rows."""

from __future__ import annotations

import json
import math
from typing import Any

import pandas as pd

from flora_ray.core.space import RankSpace
from flora_ray.results import pareto_mask
from flora_ray.search.evaluator import genes_to_config
from flora_ray.search.objectives import Objectives
from flora_ray.search.study import CORRECT, DUPLICATE_OF

COSTS = ("macs", "params", "latency_ms")


def trials_frame(study, space: RankSpace, objectives: Objectives) -> pd.DataFrame:
    """One row per Optuna trial: number, generation, genes as triples, ranks, accuracy and every cost axis (the
    searched one is Optuna's second value, the others user attributes; ``latency_ms`` is NaN without a latency
    table), state, ``feasible`` (within every budget) and ``is_pareto`` (on the searched axis); ``accuracy_se``,
    ``eval_images`` and ``correct`` as ``accuracy_noise`` says."""
    rows = []
    for trial in study.trials:
        if DUPLICATE_OF in trial.user_attrs:  # a repeated proposal answered from an earlier evaluation
            continue
        generation = next((v for k, v in trial.system_attrs.items() if k.endswith(":generation")), None)
        row: dict[str, Any] = {
            "trial": trial.number,
            # Enqueued uniform configurations carry no generation: they belong to the first one.
            "generation": 0 if generation is None else int(generation),
            "enqueued": generation is None,
            "state": trial.state.name,
            "accuracy": math.nan,
            **accuracy_noise(trial.user_attrs),
            **{axis: trial.user_attrs.get(axis, math.nan) for axis in COSTS},
            "eval_seconds": trial.user_attrs.get("eval_seconds", math.nan),
            "triples": None,
            "ranks": None,
            "feasible": True,
        }
        if len(trial.params) == len(space.blocks):
            config = genes_to_config(space, trial.params)
            row["triples"] = json.dumps([list(t) for t in space.block_tuples(config)])
            row["ranks"] = json.dumps(config)
        if trial.values is not None:
            row["accuracy"], row[objectives.cost] = float(trial.values[0]), float(trial.values[1])
        row["feasible"] = objectives.feasible(row)
        rows.append(row)
    df = pd.DataFrame(rows)
    if len(df):
        df["eval_images"] = df["eval_images"].astype("Int64")  # integers, missing for trials without a result
    df["duplicate_of"] = first_evaluations(df)
    df["is_pareto"] = feasible_front(df, objectives.cost)
    if CORRECT in df:
        df[CORRECT] = df.pop(CORRECT)  # last: long strings, for paired comparisons rather than for reading
    return df


def accuracy_noise(values: dict[str, Any]) -> dict[str, Any]:
    """``accuracy_se`` (binomial standard error, points), ``eval_images`` (images evaluated) and ``correct``
    (per-image correctness, ``results.pack_correct``) of one evaluation; NaN / missing when it has none."""
    images = values.get("eval_images")
    return {
        "accuracy_se": float(values.get("accuracy_se", math.nan)),
        "eval_images": pd.NA if images is None else int(images),
        CORRECT: values.get(CORRECT),
    }


def noise_columns(rows: list[dict[str, Any]]) -> dict[str, pd.Series]:
    """``accuracy_noise`` of every row, as columns."""
    noise = pd.DataFrame([accuracy_noise(r) for r in rows], columns=["accuracy_se", "eval_images", CORRECT])
    noise["eval_images"] = noise["eval_images"].astype("Int64")
    return {name: noise[name] for name in noise.columns}


def first_evaluations(df: pd.DataFrame) -> pd.Series:
    """``duplicate_of``: for a complete trial whose configuration an earlier complete trial evaluated (two
    proposals in flight at once), that trial's number; missing otherwise. Such rows are never on the front."""
    out = pd.Series(pd.array([None] * len(df), dtype="Int64"), index=df.index)
    first: dict[str, int] = {}
    for index, row in df.sort_values("trial").iterrows():
        if row["state"] != "COMPLETE" or row["ranks"] is None:
            continue
        if row["ranks"] in first:
            out[index] = first[row["ranks"]]
        else:
            first[row["ranks"]] = int(row["trial"])
    return out


def uniform_frame(rows: list[dict[str, Any]], space: RankSpace, objectives: Objectives) -> pd.DataFrame:
    """The uniform baseline in the trial columns, plus ``ratio`` and ``in_space`` (whether the filtered space
    contains the configuration). Evaluated on the search images of every trial, so ``correct`` pairs with theirs."""
    frame = pd.DataFrame(
        {
            "trial": pd.array([None] * len(rows), dtype="Int64"),  # not Optuna trials
            "generation": pd.array([None] * len(rows), dtype="Int64"),
            "enqueued": False,
            "state": "COMPLETE",
            "accuracy": [r["accuracy"] for r in rows],
            **noise_columns(rows),
            **{axis: [r.get(axis, math.nan) for r in rows] for axis in COSTS},
            "eval_seconds": [r["eval_seconds"] for r in rows],
            "triples": [json.dumps([list(t) for t in space.block_tuples(r["ranks"])]) for r in rows],
            "ranks": [json.dumps(r["ranks"]) for r in rows],
            "feasible": [objectives.feasible(r) for r in rows],
            "ratio": [r["ratio"] for r in rows],
            "in_space": [space.contains(r["ranks"]) for r in rows],
        }
    )
    frame.insert(frame.columns.get_loc("feasible") + 1, "duplicate_of", pd.array([None] * len(rows), dtype="Int64"))
    frame.insert(frame.columns.get_loc("duplicate_of") + 1, "is_pareto", feasible_front(frame, objectives.cost))
    correct = frame.pop(CORRECT)
    frame.insert(frame.columns.get_loc("is_pareto") + 1, CORRECT, correct)  # last of the trial columns, as there
    return frame


def feasible_front(df: pd.DataFrame, cost: str = "macs") -> pd.Series:
    """``is_pareto``: non-dominated (on ``cost`` and accuracy) among the complete, feasible, distinct rows."""
    mask = pd.Series(False, index=df.index)
    distinct = df["duplicate_of"].isna() if "duplicate_of" in df else pd.Series(True, index=df.index)
    candidates = df[(df["state"] == "COMPLETE") & df["feasible"] & distinct]
    if len(candidates):
        mask[candidates.index[pareto_mask(candidates, cost)]] = True
    return mask

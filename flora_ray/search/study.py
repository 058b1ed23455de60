"""The search problem and its Optuna study, independent of who runs the trials (in-process or Ray Tune).

A ``SearchProblem`` is everything an evaluator process needs (supernet header and numpy weights, the run's
configuration) plus the study's settings; it pickles, so Ray ships it once to every evaluator actor, which keeps
its evaluator across trials (``cached_evaluator``). ``record_result`` is the one place that turns an evaluation into
what Optuna is told: NaN or missing objectives fail the trial, the other cost axes and the evaluation time become
user attributes (with the accuracy's standard error and the per-image correctness), the budgets constraints (``Trial.set_constraint``, Optuna >= 5).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from flora_ray.results import hypervolume, pareto_mask
from flora_ray.search.evaluator import (
    Evaluator,
    build_evaluator,
    cached_evaluator,
    evaluator_builds,
    genes_to_config,
    search_images,
)
from flora_ray.search.objectives import Objectives, latency_predictor, subnet_costs

logger = logging.getLogger(__name__)

DIRECTIONS = ("maximize", "minimize")  # accuracy, cost
RECORDED = ("macs", "params", "latency_ms", "eval_seconds", "accuracy_se", "eval_images")  # user attributes
CORRECT = "correct"  # user attribute: per-image correctness on the search images (``results.pack_correct``)


@dataclass
class SearchProblem:
    """One search: what to evaluate and how the study is set up.

    Attributes:
        header: The supernet checkpoint's header (model spec, space).
        weights: The supernet's weights as numpy arrays.
        config: The run configuration as a plain dict.
        key: Identifies the supernet and images; evaluators are cached per process under it.
        genes: Number of candidates of each block (the categorical genes).
        anchors: Genes evaluated first (uniform configurations, the cheapest one).
        trials: Trials the study must hold in the end.
        study_name: Optuna study name (and Tune experiment name).
        journal: Local path of the Optuna journal file.
        objectives: The cost axis, the budgets (constraints) and the latency predictor.
        sampler_args: NSGA-II settings.
        images: The search images as uint8 pixels (``evaluator.search_images``), built once and shared by every
            evaluator; ``None``: each evaluator process builds them itself.
        labels: Their labels.
    """

    header: dict[str, Any]
    weights: dict[str, Any]
    config: dict[str, Any]
    key: str
    genes: dict[str, int]
    anchors: list[dict[str, int]]
    trials: int
    study_name: str
    journal: str
    objectives: Objectives = field(default_factory=Objectives)
    sampler_args: dict[str, Any] = field(default_factory=dict)
    images: Any = None
    labels: Any = None

    def sampler(self):
        """Optuna's NSGA-II sampler with the run's settings, in the form that pickles (``search.sampler``)."""
        from flora_ray.search.sampler import NSGAIISampler

        return NSGAIISampler(**self.sampler_args)

    def storage(self):
        """The study's journal storage (a local file, appended by every trial)."""
        import optuna

        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(self.journal))

    def load_study(self):
        import optuna

        return optuna.load_study(study_name=self.study_name, storage=self.storage())

    def evaluator(self) -> Evaluator:
        """This process's evaluator (built on first use, then reused across trials)."""
        return cached_evaluator(self.key, self.build_evaluator)

    def build_evaluator(self) -> Evaluator:
        """A new evaluator of this problem (its supernet on this process's device, the shared images)."""
        images, labels = (self.images, self.labels) if self.images is not None else search_images(self.config)
        return build_evaluator(self.header, self.weights, self.config, images, labels)

    def evaluate(self, genes: dict[str, Any]) -> dict[str, float]:
        """Accuracy, MACs, parameters, predicted latency and evaluation time of the subnet ``genes``, plus who
        evaluated it."""
        evaluator = self.evaluator()
        config = genes_to_config(evaluator.supernet.space, genes)
        metrics = evaluator.evaluate(config)
        costs = subnet_costs(config, evaluator.supernet.cost, latency_predictor(self.objectives))
        return {**metrics, **costs, "pid": os.getpid(), "evaluator_builds": evaluator_builds()}


def valid_result(result: dict[str, Any] | None, names: list[str]) -> bool:
    """Every objective present and finite."""
    return result is not None and all(
        isinstance(result.get(k), int | float) and math.isfinite(result[k]) for k in names
    )


def record_result(ot_trial, result: dict[str, Any] | None, objectives: Objectives) -> dict[str, Any] | None:
    """Attach the cost axes, evaluation time and budget constraints to an Optuna trial; ``None`` when the result
    is missing or not finite (the trial then fails)."""
    if not valid_result(result, objectives.names):
        return None
    for key in RECORDED:
        if isinstance(result.get(key), int | float) and math.isfinite(result[key]):
            ot_trial.set_user_attr(key, float(result[key]))
    if isinstance(result.get(CORRECT), str):
        ot_trial.set_user_attr(CORRECT, result[CORRECT])
    for name, value in objectives.constraints(result).items():
        ot_trial.set_constraint(name, value)
    return result


def log_progress(points: list[tuple[float, float]], total: int, started: float, cost: str = "macs") -> None:
    """One progress line: trials done, front size, hypervolume (the share of the box from zero cost and accuracy
    to 1.01 x the dearest trial and 100%), rate and ETA."""
    df = pd.DataFrame(points, columns=[cost, "accuracy"])
    done = len(points)
    rate = done / max(time.perf_counter() - started, 1e-9)
    ref = df[cost].max() * 1.01
    logger.info(
        "search: %d/%d trials (this session), front %d, hypervolume %.4f, %.2f trials/s, ETA %.0f s",
        done,
        total,
        int(pareto_mask(df, cost).sum()),
        hypervolume(df, (ref, 0.0), cost) / (ref * 100.0),
        rate,
        max(total - done, 0) / rate,
    )


DUPLICATE_OF = "flora_ray:duplicate_of"  # user attribute: the trial whose evaluation answered this proposal
MAX_REPEATS = 1000  # proposals in a row that were all evaluated already: the space holds nothing new for NSGA-II


def genes_key(genes: dict[str, Any]) -> tuple:
    return tuple(sorted((str(k), int(v)) for k, v in genes.items()))


class EvaluatedConfigs:
    """Each configuration's first complete evaluation, by genes (read from the study, so a resumed search knows
    them too). A repeated proposal is told to the study with that evaluation's values, constraints and attributes
    (marked ``DUPLICATE_OF``: NSGA-II's population sees it as the configuration it is) and is neither evaluated
    again nor counted against the trial budget."""

    def __init__(self, study) -> None:
        from optuna.trial import TrialState

        self.first: dict[tuple, dict[str, Any]] = {}
        self.answered = 0
        for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if DUPLICATE_OF not in trial.user_attrs:
                self.add(trial, trial.values)

    def add(self, trial, values) -> None:
        """Record ``trial`` (live or frozen, with its user attributes and constraints set) and its values."""
        attrs = {k: v for k, v in trial.user_attrs.items() if not k.startswith("flora_ray:")}  # not bookkeeping
        entry = {"number": trial.number, "values": list(values), "user_attrs": attrs,
                 "constraints": dict(trial.constraints or {})}  # fmt: skip
        self.first.setdefault(genes_key(trial.params), entry)

    def answer(self, study, trial) -> bool:
        """Tell ``trial`` (a fresh proposal) the values of its configuration's first evaluation, if there is one."""
        entry = self.first.get(genes_key(trial.params))
        if entry is None:
            return False
        for key, value in entry["user_attrs"].items():
            trial.set_user_attr(key, value)
        trial.set_user_attr(DUPLICATE_OF, entry["number"])
        for name, value in entry["constraints"].items():
            trial.set_constraint(name, value)
        study.tell(trial, entry["values"])
        self.answered += 1
        return True


def space_size(genes: dict[str, int]) -> int:
    """How many configurations the search space holds (the product of the candidates per block)."""
    return math.prod(genes.values())


def search_budget(requested: int, genes: dict[str, int]) -> int:
    """The trials a search runs: ``search.trials``, but never more than the space's distinct configurations. The
    one rule for the search and for the check that it finished (``stages.STAGES``)."""
    return min(requested, space_size(genes))


RETRY_OF = "flora_ray:retry_of"  # user attribute: the failed trial (of an interrupted session) this one evaluates again


def finished_trials(study) -> int:
    """Trials spent from the budget: complete and failed ones, not counting failed ones that were evaluated again
    nor proposals answered from an earlier evaluation of their configuration."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs[RETRY_OF] for t in trials if RETRY_OF in t.user_attrs}
    ended = (TrialState.COMPLETE, TrialState.FAIL)
    return sum(1 for t in trials if t.state in ended and t.number not in retried and DUPLICATE_OF not in t.user_attrs)

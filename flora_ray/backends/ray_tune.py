"""Ray Tune adapter of the search: Tune's ``OptunaSearch`` on the problem's study, the trial function, progress.

``FloraOptunaSearch`` reads ``OptunaSearch._ot_trials`` (the Optuna trial behind a Tune trial) to record user
attributes and the budget constraint; that private attribute is why ``pyproject.toml`` pins Ray's minor version.
"""

from __future__ import annotations

import logging
import pickle
import time
from collections.abc import Callable
from typing import Any

from flora_ray.search.study import (
    MAX_REPEATS,
    EvaluatedConfigs,
    SearchProblem,
    finished_trials,
    log_progress,
    record_result,
)

logger = logging.getLogger(__name__)


def tune_trial(genes: dict[str, Any], problem: SearchProblem | None = None, backend: Any = None) -> None:
    """The Tune trainable: evaluate one subnet on this actor's (cached) evaluator and report it.

    An error of the evaluation is reported as a result with NaN objectives (the trial fails, and is not retried);
    only a lost evaluator (its node or process gone) errors the Tune trial, which Tune then runs again.
    """
    from ray import tune

    try:
        result = backend.evaluate(problem, genes)
    except Exception as exc:  # the subnet's own failure: recorded, not retried
        logger.warning("search: trial %s failed: %s", genes, exc)
        result = {
            **dict.fromkeys(problem.objectives.names, float("nan")),
            "error": f"{type(exc).__name__}: {exc}"[:500],
        }
    tune.report(result)


def optuna_searcher(problem: SearchProblem):
    """Tune's ``OptunaSearch`` over the problem's genes, study, sampler and anchors, recording results."""
    from ray import tune
    from ray.tune.search import Searcher
    from ray.tune.search.optuna import OptunaSearch

    class FloraOptunaSearch(OptunaSearch):
        evaluated: EvaluatedConfigs | None = None

        def suggest(self, trial_id: str) -> dict | None:
            """A configuration not evaluated yet: repeated proposals are answered from the evaluated ones (told
            to the study, no Tune trial, no budget used); ``FINISHED`` once the space holds nothing new."""
            if self.evaluated is None:
                self.evaluated = EvaluatedConfigs(self._ot_study)
            for _ in range(MAX_REPEATS):
                params = super().suggest(trial_id)
                if not self.evaluated.answer(self._ot_study, self._ot_trials[trial_id]):
                    return params
                del self._ot_trials[trial_id]
            logger.warning("search: %d proposals in a row were configurations evaluated already; stopping",
                           MAX_REPEATS)  # fmt: skip
            return Searcher.FINISHED

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            ot_trial = self._ot_trials.get(trial_id)
            if ot_trial is not None:
                recorded = record_result(ot_trial, result, problem.objectives)
                if recorded is None and result is not None:
                    result, error = None, True
            super().on_trial_complete(trial_id, result=result, error=error)
            if ot_trial is not None and result is not None and not error and self.evaluated is not None:
                self.evaluated.add(ot_trial, [result["accuracy"], result[problem.objectives.cost]])

    return FloraOptunaSearch(
        space={name: tune.choice(list(range(n))) for name, n in problem.genes.items()},
        metric=problem.objectives.names,
        mode=["max", "min"],
        sampler=problem.sampler(),
        study_name=problem.study_name,
        storage=problem.storage(),
        points_to_evaluate=problem.anchors[: problem.trials],
    )


def progress_callback(total: int, after_trial: Callable[[], None], cost: str = "macs"):
    """A Tune callback that logs trials done / total, the front size and hypervolume as results arrive, and calls
    ``after_trial`` once a trial has ended (after the searcher has told Optuna)."""
    from ray.tune import Callback

    class Progress(Callback):
        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            after_trial()

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            after_trial()

        def __init__(self, every_s: float = 5.0) -> None:
            self.points: list[tuple[float, float]] = []
            self.started = self.logged = time.perf_counter()
            self.every_s = every_s

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            if "accuracy" not in result or cost not in result:
                return
            self.points.append((float(result[cost]), float(result["accuracy"])))
            now = time.perf_counter()
            if len(self.points) < total and now - self.logged < self.every_s:
                return
            self.logged = now
            log_progress(self.points, total, self.started, cost)

    return Progress()


def builds_per_process(grid) -> dict[int, int]:
    """Evaluator builds per evaluator process, from the trials' last results."""
    builds: dict[int, int] = {}
    for result in grid:
        metrics = result.metrics or {}
        if "pid" in metrics and "evaluator_builds" in metrics:  # failed trials report nothing
            builds[int(metrics["pid"])] = max(builds.get(int(metrics["pid"]), 0), int(metrics["evaluator_builds"]))
    return builds


TUNER_STATE = "tuner.pkl"  # what Tune writes first into an experiment, and what ``Tuner.can_restore`` looks for


def restore_tuner(experiment: str, trainable: Any, fs: Any = None):
    """The Tune experiment at ``experiment`` continued, or ``None`` when there is none to continue.

    A ``tuner.pkl`` that cannot be read (a start that failed while writing it) is removed with a warning and
    ``None`` returned: the search then starts a new Tune experiment over the same Optuna journal, which holds every
    finished trial, so nothing is evaluated twice.
    """
    from ray import tune

    if not tune.Tuner.can_restore(experiment, storage_filesystem=fs):
        return None
    try:
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_errored=True, storage_filesystem=fs)
    except (EOFError, pickle.UnpicklingError) as exc:
        logger.warning(
            "search: Tune's state %s/%s is unreadable (%s: a start that failed while writing it); starting Tune "
            "again on the same Optuna journal", experiment, TUNER_STATE, type(exc).__name__,
        )  # fmt: skip
        remove_tuner_state(experiment, fs)
        return None
    logger.info("search: continuing %s", experiment)
    return tuner


def start_tuner(experiment: str, fs: Any, build: Callable[[], Any]):
    """``build()`` (a new ``tune.Tuner``), removing the ``tuner.pkl`` it may have begun to write when it fails:
    Tune opens that file before it pickles the search algorithm into it, so a failed start would otherwise leave
    an empty file that every later run tries, and fails, to restore."""
    from ray import tune

    existed = tune.Tuner.can_restore(experiment, storage_filesystem=fs)
    try:
        return build()
    except BaseException:
        if not existed:
            remove_tuner_state(experiment, fs)
        raise


def remove_tuner_state(experiment: str, fs: Any = None) -> None:
    """Delete ``experiment``'s ``tuner.pkl`` (on ``fs``, or the local or URI path ``experiment`` names)."""
    import pyarrow.fs as pafs

    if fs is None:
        fs, experiment = pafs.FileSystem.from_uri(experiment) if "://" in experiment else (pafs.LocalFileSystem(),
                                                                                         experiment)  # fmt: skip
    path = f"{experiment.rstrip('/')}/{TUNER_STATE}"
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_file(path)


def remaining_trials(problem: SearchProblem) -> int:
    """Trials a new Tune experiment runs: the budget less what the study's journal already holds (none for a new
    study; a Tune experiment started again over an existing journal, see ``restore_tuner``, runs only the rest)."""
    try:
        study = problem.load_study()
    except KeyError:  # no such study yet
        return problem.trials
    return max(problem.trials - finished_trials(study), 0)

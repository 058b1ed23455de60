"""The in-process backend: every stage in this process, no Ray (tests, benchmarks, a laptop without a cluster).

Training runs one worker with a ``LocalSession`` whose checkpoints live under the storage path (so a re-run
resumes); the filter's blocks run one after another; the search asks and tells the Optuna study itself, with the
same sampler, anchors, journal and result recording as the Ray Tune path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from flora_ray.backends.base import Backend, SearchJob, TaskMap, TrainJob
from flora_ray.search.study import (
    DIRECTIONS,
    MAX_REPEATS,
    RETRY_OF,
    EvaluatedConfigs,
    SearchProblem,
    finished_trials,
    log_progress,
    record_result,
)
from flora_ray.training.trainer import LocalSession
from flora_ray.training.worker import run_device

logger = logging.getLogger(__name__)
T = TypeVar("T")


class LocalBackend(Backend):
    """Stages in this process."""

    name = "local"

    def fit(self, job: TrainJob) -> tuple[dict[str, Any], Any]:
        if job.storage_filesystem is not None:
            raise ValueError(
                "--backend local keeps training checkpoints on this machine: use a local run.storage, or the Ray backend"
            )
        if job.datasets is not None:
            raise ValueError(
                "data.pipeline=ray_data streams from Ray Data: use the Ray backend, or data.pipeline=loader"
            )
        device = run_device(job.cfg, "scaling.use_gpu")
        session = LocalSession(Path(job.storage_path) / job.name, device=str(device))
        job.worker(job.payload, self.worker_session(session))
        latest = session.directory / "latest"
        if not latest.is_dir():
            raise RuntimeError(f"{job.name} finished without a checkpoint")
        return (session.reports[-1] if session.reports else {}), job.collect(latest)

    def map(self, job: TaskMap) -> Iterator[tuple[Any, Any]]:
        for item in job.items:
            yield item, job.fn(job.shared, item)

    def call(self, fn: Callable[..., T], *args: Any, resources: dict[str, float], retries: int = 0) -> T:
        return fn(*args)

    def search(self, job: SearchJob) -> dict[int, int]:
        problem = job.problem
        storage = problem.storage()
        is_new = problem.study_name not in [s.study_name for s in storage.get_all_studies()]
        study = optuna.create_study(
            study_name=problem.study_name,
            storage=storage,
            sampler=problem.sampler(),
            directions=list(DIRECTIONS),
            load_if_exists=True,
        )
        for point in problem.anchors[: problem.trials] if is_new else ():
            study.enqueue_trial(point)
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            # An interrupted session left this trial running: fail it and evaluate its genes again.
            study.tell(trial.number, state=TrialState.FAIL)
            study.enqueue_trial(trial.params, user_attrs={RETRY_OF: trial.number})
        distributions = {name: CategoricalDistribution(list(range(n))) for name, n in problem.genes.items()}
        builds: dict[int, int] = {}
        started, points = time.perf_counter(), []
        evaluated, repeats = EvaluatedConfigs(study), 0
        while (done := finished_trials(study)) < problem.trials:
            trial = study.ask(distributions)
            if evaluated.answer(study, trial):  # a configuration evaluated already: no evaluation, no budget
                repeats += 1
                if repeats >= MAX_REPEATS:
                    logger.warning("search: %d proposals in a row were evaluated already; stopping", repeats)
                    break
                continue
            repeats = 0
            result = self._evaluate_safely(problem, trial.params)
            if record_result(trial, result, problem.objectives) is None:
                study.tell(trial, state=TrialState.FAIL)
                job.after_trial()
                continue
            study.tell(trial, [result["accuracy"], result[problem.objectives.cost]])
            evaluated.add(trial, [result["accuracy"], result[problem.objectives.cost]])
            job.after_trial()
            builds[int(result["pid"])] = int(result["evaluator_builds"])
            points.append((float(result[problem.objectives.cost]), float(result["accuracy"])))
            if len(points) % 10 == 0 or done + 1 == problem.trials:
                log_progress(points, problem.trials, started, problem.objectives.cost)
        return builds

    def _evaluate_safely(self, problem: SearchProblem, genes: dict[str, Any]) -> dict[str, Any] | None:
        try:
            return self.evaluate(problem, genes)
        except Exception as exc:  # a failing evaluation fails its trial, as a failing Tune trial does
            logger.warning("search: trial with genes %s failed: %s", genes, exc)
            return None

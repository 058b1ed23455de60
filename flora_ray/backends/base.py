"""What a stage needs from the machinery that runs it: data-parallel training, a fan-out of tasks, a search.

Stages are written once against ``Backend``; ``LocalBackend`` runs everything in this process (tests, benchmarks,
a laptop without Ray), ``RayBackend`` on Ray (Train, tasks, Tune). The two hook methods, ``worker_session`` and
``evaluate``, are where a test backend (``flora_ray.testing``) injects faults; production code never passes test
switches through stage signatures.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from flora_ray.search.study import SearchProblem
from flora_ray.training.trainer import Session

T = TypeVar("T")
Worker = Callable[[dict[str, Any], Session], None]


@dataclass(frozen=True)
class TrainJob:
    """Data-parallel training: ``worker(payload, session)`` on every worker of ``cfg.scaling``.

    Attributes:
        worker: What each worker runs.
        payload: Its plain-data argument.
        cfg: The run configuration (scaling, failure policy).
        name: The job's name; checkpoints live under ``storage_path/name`` and a re-run of the name resumes.
        storage_path: Where checkpoints go (a path on ``storage_filesystem``).
        collect: Called with the latest checkpoint folder when training has finished.
        storage_filesystem: The ``pyarrow.fs`` filesystem of ``storage_path`` (``None``: local).
        datasets: Builds the Ray Datasets the workers read (``session.dataset_shard(name)``); ``None``: none. Only
            a backend on Ray can run such a job.
    """

    worker: Worker
    payload: dict[str, Any]
    cfg: Any
    name: str
    storage_path: str
    collect: Callable[[Path], Any]
    storage_filesystem: Any = None
    datasets: Callable[[], dict[str, Any]] | None = None


@dataclass(frozen=True)
class TaskMap:
    """``fn(shared, item)`` for every item, at most ``concurrency`` at once, each task with ``resources``;
    ``shared`` is sent to the workers once. A task whose node or process is lost runs again, up to ``retries``
    times (``-1``: always)."""

    fn: Callable[[Any, Any], Any]
    shared: Any
    items: Sequence[Any]
    resources: dict[str, float]
    concurrency: int
    retries: int = 0


@dataclass(frozen=True)
class SearchJob:
    """A search: trials until the study holds ``problem.trials`` finished ones.

    Attributes:
        problem: What to evaluate and the study's settings.
        resources: What one evaluator asks for.
        concurrency: Evaluators at once.
        storage_path: Where a backend keeps its experiment state (a path on ``storage_filesystem``).
        storage_filesystem: The ``pyarrow.fs`` filesystem of ``storage_path`` (``None``: local).
        after_trial: Called in the driver after each finished trial (the journal's sync to the run's storage).
        retries: Times a trial whose evaluator was lost (node reclaimed, process killed) is evaluated again
            (``-1``: always); an error of the evaluation itself fails the trial at once.
    """

    problem: SearchProblem
    resources: dict[str, float]
    concurrency: int
    storage_path: str
    storage_filesystem: Any = None
    after_trial: Callable[[], None] = lambda: None
    retries: int = 0


class Backend(abc.ABC):
    """Runs the work of the stages; see the module docstring."""

    name = "backend"

    @abc.abstractmethod
    def fit(self, job: TrainJob) -> tuple[dict[str, Any], Any]:
        """Run a training job; returns the final metrics and what ``job.collect`` returned."""

    @abc.abstractmethod
    def map(self, job: TaskMap) -> Iterator[tuple[Any, Any]]:
        """Run a fan-out of tasks; yields ``(item, result)`` in the order they finish."""

    @abc.abstractmethod
    def call(self, fn: Callable[..., T], *args: Any, resources: dict[str, float], retries: int = 0) -> T:
        """``fn(*args)`` as one task with ``resources``, run again up to ``retries`` times if its node or process
        is lost (``-1``: always)."""

    @abc.abstractmethod
    def search(self, job: SearchJob) -> dict[int, int]:
        """Evaluate trials until the study holds ``job.problem.trials`` finished ones (continuing an interrupted
        search); returns the evaluator builds per process id."""

    # -- hooks for test backends -------------------------------------------------------------------------------

    def worker_session(self, session: Session) -> Session:
        """The session a training worker runs with (a test backend wraps it to inject faults)."""
        return session

    def evaluate(self, problem: SearchProblem, genes: dict[str, Any]) -> dict[str, Any]:
        """One trial's evaluation (a test backend makes chosen trials fail)."""
        return problem.evaluate(genes)

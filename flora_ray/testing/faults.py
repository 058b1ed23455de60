"""Fault injection for tests: a session wrapper for training workers and backends that break chosen trials.

Production code knows nothing of these: a training worker runs whatever session ``Backend.worker_session``
returns, and a trial is evaluated by ``Backend.evaluate``; the backends here override those two hooks.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from flora_ray.backends.base import TaskMap
from flora_ray.backends.local import LocalBackend
from flora_ray.backends.ray import RayBackend
from flora_ray.search.study import SearchProblem
from flora_ray.training.sampling import config_digest
from flora_ray.training.trainer import Callback, Session, Trainer


class _Faults(Callback):
    def __init__(self, fail: dict[str, Any] | None, sample_log: str | None) -> None:
        self.fail, self.sample_log = fail, Path(sample_log) if sample_log else None

    def on_epoch_start(self, trainer: Trainer) -> None:
        """Raise once (a marker file remembers) at the start of epoch ``fail["epoch"]`` on rank ``fail["rank"]``."""
        if self.fail and "step" not in self.fail:
            self._maybe_fail(trainer, "")

    def on_step_end(self, trainer: Trainer, step: int, images: int) -> None:
        """With ``fail["step"]``: raise once after that step of epoch ``fail["epoch"]`` (after its checkpoint)."""
        if self.fail and self.fail.get("step") == step:
            self._maybe_fail(trainer, f" step {step}")

    def _maybe_fail(self, trainer: Trainer, where: str) -> None:
        fail, rank = self.fail, trainer.session.world_rank
        if rank != fail.get("rank", 0) or trainer.epoch != fail["epoch"]:
            return
        marker = Path(fail["marker"])
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"failed at epoch {trainer.epoch}{where}\n")
        raise RuntimeError(f"injected failure at epoch {trainer.epoch}{where} on rank {rank}")

    def on_configs(self, trainer: Trainer, step: int, configs: Sequence[dict[str, int]]) -> None:
        """Append ``{epoch, step, digest}`` of each step's subnet to ``sample_log/rank<r>.jsonl``."""
        if self.sample_log is None:
            return
        self.sample_log.mkdir(parents=True, exist_ok=True)
        record = {"epoch": trainer.epoch, "step": step, "digest": config_digest(configs[-1])}
        record.update(global_step=trainer.global_step, time=time.time(), pid=os.getpid())
        with open(self.sample_log / f"rank{trainer.session.world_rank}.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")


def log_event(directory: str | os.PathLike | None, kind: str, **fields: Any) -> None:
    """Append one JSON line ``{kind, time, pid, host, ...}`` to ``directory/<pid>.jsonl`` (one file per process, so
    processes on several nodes never interleave within a file)."""
    if directory is None:
        return
    Path(directory).mkdir(parents=True, exist_ok=True)
    record = {"kind": kind, "time": time.time(), "pid": os.getpid(), "host": socket.gethostname(), **fields}
    with open(Path(directory) / f"{os.getpid()}.jsonl", "a") as handle:
        handle.write(json.dumps(record, default=str) + "\n")


def read_events(directory: str | os.PathLike) -> list[dict[str, Any]]:
    """Every event ``log_event`` wrote into ``directory``, in time order."""
    events = []
    for path in sorted(Path(directory).glob("*.jsonl")):
        events += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sorted(events, key=lambda e: e["time"])


def logged_task(fn: Callable[[Any, Any], Any], event_log: str, min_seconds: float = 0.0) -> Callable[[Any, Any], Any]:
    """``fn`` for a ``TaskMap``, logging ``task_start`` / ``task_end`` events (with the item) around it and lasting
    at least ``min_seconds`` (a plain function: ``ray.remote`` takes functions, not callable objects)."""

    def logged(shared: Any, item: Any) -> Any:
        started = time.monotonic()
        log_event(event_log, "task_start", item=item)
        result = fn(shared, item)
        time.sleep(max(0.0, min_seconds - (time.monotonic() - started)))
        log_event(event_log, "task_end", item=item)
        return result

    return logged


class FaultSession:
    """A training session that fails once at a chosen epoch and/or logs every step's sampled subnet.

    Args:
        inner: The real session (everything else is delegated to it).
        fail: ``{"epoch": E, "rank": R, "marker": PATH}``: raise at the start of epoch E on rank R, once; with
            ``"step": S`` after step S of epoch E instead.
        sample_log: Directory of the per-rank sample logs.
    """

    def __init__(self, inner: Session, fail: dict[str, Any] | None = None, sample_log: str | None = None) -> None:
        self.inner = inner
        self.callbacks = [_Faults(fail, sample_log)]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class FaultInjection:
    """Backend mixin: training workers run a ``FaultSession``; trials whose first gene (in name order) equals
    ``raise_if_first_gene`` raise, those with ``nan_if_first_gene`` return a NaN accuracy. With ``event_log`` (a
    directory every node sees), every task of a ``map`` and every trial evaluation logs its start and end there.
    ``min_work_seconds`` stretches every logged task and evaluation to at least that long (as ImageNet-sized work
    would take, so that a reclaim can catch one in flight)."""

    def __init__(
        self,
        fail: dict[str, Any] | None = None,
        sample_log: str | None = None,
        raise_if_first_gene: int | None = None,
        nan_if_first_gene: int | None = None,
        event_log: str | None = None,
        min_work_seconds: float = 0.0,
    ) -> None:
        self.fail, self.sample_log, self.event_log = fail, sample_log, event_log
        self.min_work_seconds = min_work_seconds
        self.raise_if_first_gene, self.nan_if_first_gene = raise_if_first_gene, nan_if_first_gene

    def worker_session(self, session: Session) -> Session:
        return FaultSession(session, self.fail, self.sample_log)

    def map(self, job: TaskMap) -> Iterator[tuple[Any, Any]]:
        if self.event_log is not None:
            job = replace(job, fn=logged_task(job.fn, self.event_log, self.min_work_seconds))
        return super().map(job)

    def evaluate(self, problem: SearchProblem, genes: dict[str, Any]) -> dict[str, Any]:
        first = genes[sorted(genes)[0]]
        started = time.monotonic()
        log_event(self.event_log, "trial_start", genes=genes)
        if first == self.raise_if_first_gene:
            raise RuntimeError(f"injected evaluation failure (first gene {first})")
        metrics = problem.evaluate(genes)
        if first == self.nan_if_first_gene:
            metrics["accuracy"] = math.nan
        time.sleep(max(0.0, self.min_work_seconds - (time.monotonic() - started)))
        log_event(self.event_log, "trial_end", genes=genes)
        return metrics


class FaultyRayBackend(FaultInjection, RayBackend):
    """``RayBackend`` with ``FaultInjection``."""


class FaultyLocalBackend(FaultInjection, LocalBackend):
    """``LocalBackend`` with ``FaultInjection``."""

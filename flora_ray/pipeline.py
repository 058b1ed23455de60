"""``flora-ray run``: every stage of a run in order, each recorded as done in the run store.

A finished stage writes ``stages/<stage>.json`` (wall time and summary); re-running the same command skips finished
stages and resumes the unfinished one from its own checkpoints (training checkpoints, filter block files, the
search journal). A run belongs to one configuration (``stages.inputs.claim_run``).
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from typing import Any

from flora_ray import notify
from flora_ray.backends.base import Backend
from flora_ray.config import Config
from flora_ray.errors import StageUnfinished, note_stage
from flora_ray.records import StageMarker
from flora_ray.stages import STAGES
from flora_ray.stages.inputs import claim_run
from flora_ray.storage.lease import check_lease, hold_lease
from flora_ray.storage.run_store import RunStore

logger = logging.getLogger(__name__)


def stage_marker(store: RunStore, stage: str) -> dict[str, Any] | None:
    """The completion record of ``stage`` as its file holds it (``StageMarker.read`` gives it typed), or ``None``
    while it has not finished."""
    marker = StageMarker.read(store, stage=stage)
    return None if marker is None else marker.to_dict()


def run_stage(cfg: Config, stage: str, backend: Backend) -> dict[str, Any]:
    """Run one stage and record it as done, holding the run's lease (``flora_ray.storage.lease``); returns its
    completion record. An exception records the stage it happened in (``errors.note_stage``) for the CLI."""
    store = RunStore.for_config(cfg)
    with hold_lease(store):
        check_lease(store)
        started = time.perf_counter()
        try:
            summary = STAGES[stage].run(cfg, backend)
        except BaseException as exc:
            note_stage(exc, stage)
            notify.stage_failed(cfg, stage, exc)
            raise
        unfinished = STAGES[stage].left_work(cfg, summary)
        if unfinished:
            raise StageUnfinished(unfinished)
        marker = StageMarker(
            stage=stage,
            seconds=time.perf_counter() - started,
            finished_at=datetime.now(timezone.utc).isoformat(timespec="microseconds"),  # orders stages a second apart
            summary=summary,
        )
        marker.write(store)
    notify.stage_done(cfg, stage, marker.seconds)
    return marker.to_dict()


def run_pipeline(cfg: Config, backend: Backend) -> dict[str, dict[str, Any]]:
    """Run every unfinished stage of ``cfg``'s run in order on ``backend``, holding the run's lease; returns the
    completion records."""
    with hold_lease(RunStore.for_config(cfg)):
        return _run_stages(cfg, backend, claim_run(cfg))


def _run_stages(cfg: Config, backend: Backend, store: RunStore) -> dict[str, dict[str, Any]]:
    markers: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    for index, stage in enumerate(STAGES, start=1):
        marker = StageMarker.read(store, stage=stage)
        if marker is not None:
            logger.info("[%d/%d] %s: done earlier (%.0f s), skipped", index, len(STAGES), stage, marker.seconds)
            markers[stage] = marker.to_dict()
            continue
        elapsed = time.perf_counter() - started
        logger.info("[%d/%d] %s: starting (%.0f s into this run)", index, len(STAGES), stage, elapsed)
        markers[stage] = run_stage(cfg, stage, backend)
        logger.info("[%d/%d] %s: done in %.0f s", index, len(STAGES), stage, markers[stage]["seconds"])
    notify.run_finished(cfg, markers, time.perf_counter() - started)
    return markers

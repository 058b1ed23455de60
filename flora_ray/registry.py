"""The runs under a storage prefix: what each is doing (``list_runs``, ``run_status``) and their fronts side by side
(``compare``).

A run is a directory (local path, ``s3://`` or ``gs://`` prefix) holding ``run_config.yaml``; ``list_runs(prefix)``
looks at the prefix itself and its direct children. Its **state** is read from storage alone, first rule that applies:

1. ``finished``: every stage has its marker (``stages/<stage>.json``).
2. ``running``: a lease (``lease.json``, ``flora_ray.storage.lease``) is held and not stale (renewed within its
   ``ttl_s``, and on this host its process exists).
3. ``failed``: a stale lease: its holder stopped renewing it without releasing it (killed, or its node was lost).
4. No lease: how the last job ended (``job.json``, written when it released the lease): ``failed`` (an error,
   named in ``detail``), ``interrupted`` (Ctrl-C, SIGTERM) or ``incomplete`` (a stage command finished, later stages
   were not run).
5. No lease and no job record (a run made before leases): ``running`` while a file of the run was modified within
   the lease's time-to-live, else ``incomplete``.

The stage running (or where the run stopped) is the first stage without a marker; its progress is the trials done
(search, from the Optuna journal), the filter's finished blocks, or the time of the training stage's last
checkpoint. ``best_acc_50`` / ``_75`` / ``_90`` are the front's best accuracy within 50%, 75% and 90% of the dense
model's cost on the searched axis (``flora_ray.results.best_under``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from flora_ray.errors import InputError
from flora_ray.results import best_under, cost_axis, load_front, load_uniform
from flora_ray.storage.lease import LEASE_TTL_S, describe_holder, now_iso, read_lease, staleness
from flora_ray.storage.run_store import ARTEFACTS, RunStore, join

if TYPE_CHECKING:
    import pandas as pd

    from flora_ray.api import Run

BUDGET_SHARES = (0.5, 0.75, 0.9)
"""Shares of the dense model's cost (on the searched axis) under which the best front accuracy is shown."""
BUDGET_COLUMNS = {share: f"best_acc_{round(100 * share)}" for share in BUDGET_SHARES}
"""Column of the best front accuracy within each share of the dense model's cost."""
COLUMNS = ["run", "state", "stages", "current", "progress", "trials", "front", *BUDGET_COLUMNS.values(),
           "cost_axis", "model", "data", "updated", "location", "detail"]  # fmt: skip
"""``list_runs``'s columns, in order."""


def find_runs(prefix: str | os.PathLike[str]) -> list[RunStore]:
    """The runs at ``prefix``: the prefix itself when it is a run, else its direct children that are, by name."""
    import pyarrow.fs as pafs

    store = RunStore(prefix)
    if store.is_file(ARTEFACTS.run_config):
        return [store]
    info = store.filesystem.get_file_info(store.root)
    if info.type == pafs.FileType.NotFound and store.is_local:
        raise InputError(f"{os.fspath(prefix)!r} does not exist: give the run.storage (or output) folder of the runs")
    selector = pafs.FileSelector(store.root, allow_not_found=True)
    children = [i.base_name for i in store.filesystem.get_file_info(selector) if i.type == pafs.FileType.Directory]
    runs = [RunStore(join(store.uri, name)) for name in sorted(children)]
    return [run for run in runs if run.is_file(ARTEFACTS.run_config)]


def _open(location: Any) -> Run:
    from flora_ray.api import Run

    if isinstance(location, Run):
        return location
    try:
        return Run.open(location)
    except FileNotFoundError as exc:
        raise InputError(f"{exc}; give a run directory or URI (flora-ray list STORAGE shows them)") from None


def last_update(store: RunStore) -> float | None:
    """The Unix time of the newest file of the run (its lease's renewal included), or ``None`` for an empty one."""
    import pyarrow.fs as pafs

    infos = store.filesystem.get_file_info(pafs.FileSelector(store.root, recursive=True, allow_not_found=True))
    times = [i.mtime.timestamp() for i in infos if i.type == pafs.FileType.File and i.mtime is not None]
    return max(times) if times else None


def run_state(store: RunStore, done: Sequence[str], updated: float | None) -> tuple[str, str, dict | None]:
    """``(state, detail, lease)`` of a run by the rules of this module's docstring."""
    from flora_ray.stages import STAGES

    if all(stage in done for stage in STAGES):
        return "finished", "", None
    lease = read_lease(store)
    if lease is not None:
        why = staleness(lease)
        if why is None:
            return "running", f"held by {describe_holder(lease)}", lease
        return "failed", f"its job (host {lease['host']} pid {lease['pid']}) stopped renewing its lease: {why}", lease
    if store.is_file(ARTEFACTS.job):
        job = store.read_json(ARTEFACTS.job, "job record")
        where = f"host {job.get('host')} pid {job.get('pid')} at {job.get('ended_at')}"
        if job.get("outcome") == "failed":
            return "failed", f"{job.get('error')} ({where})", None
        if job.get("outcome") == "interrupted":
            return "interrupted", f"stopped by a signal ({where})", None
        return "incomplete", f"the last job ended without error ({where}); later stages were not run", None
    if updated is not None and time.time() - updated < LEASE_TTL_S:
        return "running", f"no lease (an older flora-ray?), modified {time.time() - updated:.0f} s ago", None
    return "incomplete", "no job holds it and none recorded how it ended", None


def stage_progress(run: Run, stage: str | None) -> str:
    """How far the unfinished ``stage`` got, from what it has written so far."""
    store = run.store
    if stage == "search":
        from flora_ray.search.study import finished_trials

        study = search_study(run)
        return f"{0 if study is None else finished_trials(study)}/{run.config.search.trials} trials"
    if stage == "filter":
        return f"{len(store.list(ARTEFACTS.filter_blocks, '.json'))} blocks filtered"
    if stage in ("pretrain", "train"):
        folder = RunStore(join(store.uri, f"{ARTEFACTS.ray}/{run.config.run.name}-{stage}"))
        latest = last_update(folder)
        return "no checkpoint yet" if latest is None else f"last checkpoint {now_iso(latest)}"
    return ""


def search_study(run: Run):
    """The Optuna study of a search under way, or ``None`` before its journal holds it."""
    if not run.store.is_file(ARTEFACTS.journal):
        return None
    try:
        return run.study
    except KeyError:  # the journal does not hold the study yet
        return None


def complete_trials(study) -> int:
    """The complete trials of a search so far, as ``trials.parquet`` will count them (no repeated proposals)."""
    from flora_ray.search.study import DUPLICATE_OF

    return sum(t.state.name == "COMPLETE" and DUPLICATE_OF not in t.user_attrs for t in study.trials)


def search_figures(run: Run, done: Sequence[str]) -> dict[str, Any]:
    """Trials, front size, best accuracy under the budgets and cost axis of a run whose search finished."""
    empty: dict[str, Any] = {"trials": None, "front": None, "cost_axis": None, **dict.fromkeys(BUDGET_COLUMNS.values())}
    if "search" not in done or not run.store.is_file(ARTEFACTS.pareto):
        return empty
    summary = run.search_summary
    front = load_front(run.store)
    axis = cost_axis(front)
    figures = {"trials": int(summary.complete), "front": len(front), "cost_axis": axis}
    for share, column in BUDGET_COLUMNS.items():
        best = best_under(front, share * summary.dense(axis), axis)
        figures[column] = None if best is None else float(best["accuracy"])
    return figures


def run_status(location: str | os.PathLike[str] | RunStore | Run) -> dict[str, Any]:
    """One run's row of ``list_runs`` as a dict, with ``stages_done`` (names) and ``holder`` (the lease) added."""
    from flora_ray.stages import STAGES

    run = _open(location)
    store = run.store
    done = [name.rsplit("/", 1)[-1].removesuffix(".json") for name in store.list(ARTEFACTS.stages, ".json")]
    done = [stage for stage in STAGES if stage in done]
    updated = last_update(store)
    state, detail, lease = run_state(store, done, updated)
    current = next((stage for stage in STAGES if stage not in done), None)
    figures = search_figures(run, done)
    study = search_study(run) if current == "search" else None
    if study is not None:
        figures["trials"] = complete_trials(study)
    cfg = run.config
    return {"run": store.name, "state": state, "stages": f"{len(done)}/{len(STAGES)}", "current": current,
            "progress": stage_progress(run, current), **figures, "model": cfg.model.name, "data": cfg.data.name,
            "updated": None if updated is None else now_iso(updated), "location": store.uri, "detail": detail,
            "stages_done": done, "holder": lease}  # fmt: skip


def list_runs(prefix: str | os.PathLike[str]) -> pd.DataFrame:
    """One row per run under ``prefix`` (a local folder or an ``s3://`` / ``gs://`` prefix), columns ``COLUMNS``:
    state, stages done, the stage running and its progress, trials, front size, best accuracy within 50/75/90% of
    the dense cost, last update."""
    import pandas as pd

    rows = [run_status(store) for store in find_runs(prefix)]
    frame = pd.DataFrame([{k: row[k] for k in COLUMNS} for row in rows], columns=COLUMNS)
    return frame.astype({"trials": "Int64", "front": "Int64"})  # counts stay integers beside missing ones


def format_runs(frame: pd.DataFrame) -> str:
    """``flora-ray list``'s table."""
    if frame.empty:
        return "no runs"
    shown = ["run", "state", "stages", "current", "progress", "trials", "front", *BUDGET_COLUMNS.values(), "updated"]
    cells = [[_cell(row[c]) for c in shown] for _, row in frame.iterrows()]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(shown)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(shown, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


def _cell(value: Any) -> str:
    import pandas as pd

    if value is None or pd.isna(value):
        return "-"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def format_status(status: dict[str, Any]) -> str:
    """``flora-ray status``'s text."""
    budgets = ", ".join(f"{round(100 * s)}%: {_cell(status[c])}" for s, c in BUDGET_COLUMNS.items())
    lines = [
        f"{status['run']} ({status['model']} on {status['data']}): {status['state']}"
        + (f", {status['detail']}" if status["detail"] else ""),
        f"  stages done ({status['stages']}): {', '.join(status['stages_done']) or '-'}",
        f"  current: {status['current'] or '-'} {status['progress']}".rstrip(),
        f"  trials {_cell(status['trials'])}, front {_cell(status['front'])}, best accuracy within a share of the "
        f"dense {status['cost_axis'] or 'cost'}: {budgets}",
        f"  updated {status['updated'] or '-'}, {status['location']}",
    ]
    return "\n".join(lines)


FRAME_COLUMNS = ["run", "kind", "trial", "ratio", "macs", "params", "latency_ms", "accuracy", "triples", "location"]
"""``compare``'s columns: ``kind`` is ``front``, ``uniform`` or ``dense``; ``trial`` (front) or ``ratio`` (uniform)."""


def run_points(run: Run) -> pd.DataFrame:
    """A finished search's front, uniform baseline and dense model as rows of ``FRAME_COLUMNS``."""
    import pandas as pd

    if not run.store.is_file(ARTEFACTS.pareto) or not run.store.is_file(ARTEFACTS.search_summary):
        raise InputError(f"run {run.location!r} has no finished search (no pareto.parquet): run its search first")
    summary = run.search_summary
    dense = {"kind": "dense", "accuracy": summary.dense_accuracy,
             **{axis: summary.dense(axis) for axis in ("macs", "params", "latency_ms")}}  # fmt: skip
    parts = [load_front(run.store).assign(kind="front"), load_uniform(run.store).assign(kind="uniform")]
    frame = pd.concat([*parts, pd.DataFrame([dense])], ignore_index=True)
    frame = frame.reindex(columns=FRAME_COLUMNS)
    return frame.assign(run=run.store.name, location=run.location)


def compare(runs: Sequence[str | os.PathLike[str] | RunStore | Run], cost: str | None = None) -> pd.DataFrame:
    """One tidy frame of several runs' fronts, uniform baselines and dense models (``FRAME_COLUMNS``; a ``run``
    column names each, its location where two share a name). ``cost``: the axis to compare on (default: the first
    run's searched axis), kept in ``frame.attrs["cost_axis"]``."""
    import pandas as pd

    from flora_ray.results import COST_UNITS

    opened = [_open(location) for location in runs]
    if not opened:
        raise InputError("compare needs at least one run: give run directories or URIs")
    frames = [run_points(run) for run in opened]
    names = [run.store.name for run in opened]
    if len(set(names)) < len(names):  # two runs of one name under different prefixes: tell them apart
        frames = [f.assign(run=run.location) for f, run in zip(frames, opened, strict=True)]
    axis = cost or cost_axis(load_front(opened[0].store))
    if axis not in COST_UNITS:
        raise InputError(f"cost axis {axis!r} is not one of {sorted(COST_UNITS)}")
    frame = pd.concat(frames, ignore_index=True)
    missing = sorted(set(frame.loc[frame[axis].isna() & (frame["kind"] != "dense"), "run"]))
    if missing:
        raise InputError(
            f"run(s) {missing} have no {axis} (searched without a latency table): compare on macs or params"
        )
    frame.attrs["cost_axis"] = axis
    return frame

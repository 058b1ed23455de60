"""``flora-ray run``: every stage of a run in order, each recorded as done in the run directory.

Stages: ``pretrain`` (dense teacher; skipped when ``model.pretrained`` names weights), ``filter``, ``train``,
``search``, ``export`` (the knee point of the front) and ``report``. A finished stage writes
``stages/<stage>.json`` (wall time and summary); re-running the same command skips finished stages and resumes the
unfinished one from its own checkpoints (Ray Train checkpoints, filter block files, the search journal).

A run directory belongs to one configuration: ``run_config.yaml`` is written on first use, and a later command
with a configuration that would change the results is refused (keys that only change speed may differ).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from flora_ray.config import Config, config_to_dict, dump_config
from flora_ray.report import STAGES_DIR, write_report
from flora_ray.storage.files import read_json, write_json, write_text

logger = logging.getLogger(__name__)

PIPELINE_STAGES = ("pretrain", "filter", "train", "search", "export", "report")
RUN_CONFIG_FILE = "run_config.yaml"
# Keys that change speed or placement but not the results: they may differ between commands on one run directory.
SPEED_ONLY_KEYS = (
    "run.output_dir",
    "run.storage",
    "run.max_failures",
    "run.threads_per_worker",
    "scaling",
    "pretrain.log_every",
    "pretrain.checkpoint_every",
    "filter.concurrency",
    "filter.cpus_per_task",
    "filter.log_every",
    "train.log_every",
    "train.checkpoint_every",
    "search.concurrency",
    "search.cpus_per_trial",
    "search.gpus_per_trial",
    "search.batch_size",
)


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value and dotted not in ("model.kwargs",):
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _speed_only(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in SPEED_ONLY_KEYS)


def claim_run_dir(cfg: Config, record: bool = True) -> None:
    """Refuse a configuration that differs from what the run directory was made with; else record it there
    (``record=False``: only check)."""
    path = cfg.run.run_dir / RUN_CONFIG_FILE
    current = config_to_dict(cfg)
    if path.is_file():
        try:
            stored = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ValueError(
                f"{str(path)!r} is not valid YAML ({exc.__class__.__name__}); remove the run directory"
            ) from None
        old, new = _flatten(stored), _flatten(current)
        changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k) and not _speed_only(k)]
        if changed:
            shown = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:3])
            raise ValueError(
                f"run directory {str(cfg.run.run_dir)!r} was made with a different configuration ({shown}"
                f"{'; ...' if len(changed) > 3 else ''}): choose another run.name or --output, or remove it"
            )
        return
    if record:
        cfg.run.run_dir.mkdir(parents=True, exist_ok=True)
        write_text(path, dump_config(cfg))


def stage_marker(run_dir: Path, stage: str) -> dict[str, Any] | None:
    """The completion record of ``stage`` in ``run_dir``, or ``None`` while it has not finished."""
    path = run_dir / STAGES_DIR / f"{stage}.json"
    return read_json(path) if path.is_file() else None


def _mark_done(run_dir: Path, stage: str, seconds: float, summary: dict[str, Any]) -> dict[str, Any]:
    marker = {
        "stage": stage,
        "seconds": seconds,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "summary": summary,
    }
    write_json(run_dir / STAGES_DIR / f"{stage}.json", marker)
    return marker


def _pretrain(cfg: Config) -> dict[str, Any]:
    if cfg.model.pretrained:
        return {"skipped": f"dense weights from model.pretrained={cfg.model.pretrained!r}"}
    from flora_ray.ray_train import run_stage

    outcome = run_stage(cfg, "pretrain")
    return {"output": outcome["output"], "metrics": _numbers(outcome["metrics"])}


def _filter(cfg: Config) -> dict[str, Any]:
    from flora_ray.ray_filter import run_filter

    return run_filter(cfg)


def _train(cfg: Config) -> dict[str, Any]:
    from flora_ray.ray_train import run_stage

    outcome = run_stage(cfg, "train")
    return {"output": outcome["output"], "metrics": _numbers(outcome["metrics"])}


def _search(cfg: Config) -> dict[str, Any]:
    from flora_ray.ray_search import run_search

    summary = run_search(cfg)
    if summary["complete"] + summary["failed"] < cfg.search.trials:
        raise RuntimeError(
            f"search stopped after {summary['complete'] + summary['failed']} of {cfg.search.trials} trials; "
            "re-run the same command to continue"
        )
    return summary


def _export(cfg: Config) -> dict[str, Any]:
    from flora_ray.export_run import export_from_run
    from flora_ray.results import knee_point, load_front

    front = load_front(cfg.run.run_dir)
    if front.empty:
        raise RuntimeError("the search produced no feasible subnet to export (every trial failed or broke the budget)")
    knee = knee_point(front)
    return export_from_run(cfg.run.run_dir, trial=int(knee["trial"]))


def _report(cfg: Config) -> dict[str, Any]:
    path, _ = write_report(cfg.run.run_dir)
    return {"report": str(path)}


def _numbers(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, int | float)}


STAGE_FUNCTIONS: dict[str, Callable[[Config], dict[str, Any]]] = {
    "pretrain": _pretrain,
    "filter": _filter,
    "train": _train,
    "search": _search,
    "export": _export,
    "report": _report,
}


def run_pipeline(cfg: Config) -> dict[str, dict[str, Any]]:
    """Run every unfinished stage of ``cfg``'s run in order (Ray already initialised); returns the markers."""
    claim_run_dir(cfg)
    run_dir = cfg.run.run_dir
    markers: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    for index, stage in enumerate(PIPELINE_STAGES, start=1):
        marker = stage_marker(run_dir, stage)
        if marker is not None:
            logger.info(
                "[%d/%d] %s: done earlier (%.0f s), skipped", index, len(PIPELINE_STAGES), stage, marker["seconds"]
            )
            markers[stage] = marker
            continue
        logger.info(
            "[%d/%d] %s: starting (%.0f s into this run)",
            index,
            len(PIPELINE_STAGES),
            stage,
            time.perf_counter() - started,
        )
        stage_started = time.perf_counter()
        summary = STAGE_FUNCTIONS[stage](cfg)
        markers[stage] = _mark_done(run_dir, stage, time.perf_counter() - stage_started, summary)
        logger.info("[%d/%d] %s: done in %.0f s", index, len(PIPELINE_STAGES), stage, markers[stage]["seconds"])
    return markers

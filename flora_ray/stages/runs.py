"""What a searched run holds, read back: its configuration, one chosen trial, its supernet and a subnet's BatchNorm
statistics. The export, the fine-tune, the API and the CLI read runs through these. Choosing a trial reads
Parquet only: torch is imported where a supernet is read."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

import pandas as pd
import yaml

from flora_ray.config import Config, apply_override, build_dataclass, changed_result_keys, config_to_dict, dotted_value
from flora_ray.errors import InputError, MissingInput
from flora_ray.results import best_under, cost_axis, format_cost, knee_point, load_front, load_trials
from flora_ray.storage.run_store import ARTEFACTS, RunStore

if TYPE_CHECKING:
    import torch

    from flora_ray.core.supernet import Supernet

# What a request may name to choose a trial (as the CLI spells it).
CHOICES = "--trial N, a budget (--max-macs M, --max-latency-ms T) or --knee"


class NothingWithin(InputError):
    """No front point is within the budget asked for."""


def load_run_config(store: RunStore) -> Config:
    """The configuration a run was made with (``run_config.yaml``)."""
    if not store.is_file(ARTEFACTS.run_config):
        raise MissingInput(
            f"{store.location(ARTEFACTS.run_config)!r} does not exist: this is not a flora-ray run directory"
        )
    try:
        data = yaml.safe_load(store.read_text(ARTEFACTS.run_config))
    except yaml.YAMLError as exc:
        raise InputError(
            f"{store.location(ARTEFACTS.run_config)!r} is not valid YAML; remove the run directory"
        ) from exc
    return build_dataclass(Config, data, "")


def config_with_overrides(
    store: RunStore, *, overrides: Sequence[str], sections: Sequence[str], what: str, config: Config | None = None
) -> Config:
    """The run's configuration (or ``config``) with ``key=value`` ``overrides`` applied, refusing any that would
    change the run's results outside ``sections`` (what a command that reads the run, ``what``, may set: the keys
    of its own sections and speed-only keys)."""
    stored = config_to_dict(config if config is not None else load_run_config(store))
    data = json.loads(json.dumps(stored))
    for item in overrides:
        apply_override(data, item)
    cfg = build_dataclass(Config, data, "")
    other = [k for k in changed_result_keys(stored, config_to_dict(cfg)) if k.split(".")[0] not in sections]
    if other:
        allowed = " and ".join(f"{s}.*" for s in sections)
        raise InputError(
            f"{other[0]}={dotted_value(config_to_dict(cfg), other[0])!r} would change the run's results (it was made "
            f"with {dotted_value(stored, other[0])!r}): {what} may override {allowed} keys and speed-only keys"
        )
    return cfg


def budget_of(
    max_macs: float | None = None, max_latency_ms: float | None = None, max_params: float | None = None
) -> tuple[str, float] | None:
    """``(axis, value)`` of the one budget given (``None`` for none); more than one is an error."""
    given = [(a, v) for a, v in (("macs", max_macs), ("latency_ms", max_latency_ms), ("params", max_params))
             if v is not None]  # fmt: skip
    if len(given) > 1:
        raise InputError(f"give exactly one budget, not {' and '.join(a for a, _ in given)}")
    return given[0] if given else None


def select_trial(
    store: RunStore,
    *,
    trial: int | None = None,
    budget: tuple[str, float] | None = None,
    knee: bool = False,
    cost: str | None = None,
) -> pd.Series:
    """The trials.parquet row of completed trial ``trial``, the most accurate front point within ``budget``
    (``(axis, value)``: ``macs``, ``params`` or ``latency_ms``; the cheaper one on ties), or the front's knee point on
    ``cost`` (default: the axis the run searched). Exactly one of the three; ``NothingWithin`` when no front point
    is within the budget."""
    if (trial is not None) + (budget is not None) + bool(knee) != 1:
        raise InputError(f"give exactly one of {CHOICES}")
    if trial is not None:
        trials = load_trials(store)
        rows = trials[(trials["trial"] == trial) & (trials["state"] == "COMPLETE")]
        if rows.empty:
            raise InputError(f"trial {trial} is not a completed trial of {store.root!r} (0..{trials['trial'].max()})")
        return rows.iloc[0]
    front = load_front(store)
    if front.empty:
        raise InputError(f"the front of {store.root!r} is empty: every trial failed or broke the budget")
    if knee:
        return knee_point(front, cost or cost_axis(front))
    axis, value = budget
    if front[axis].isna().all():
        raise InputError(f"the run's front has no {axis}: run `flora-ray profile` and search again, or use --max-macs")
    row = best_under(front, value, axis)
    if row is None:
        raise NothingWithin(
            f"no front point has {axis} <= {format_cost(axis, value)}; the cheapest needs "
            f"{format_cost(axis, front[axis].min())}"
        )
    return row


def run_supernet(store: RunStore, device: torch.device | str = "cpu") -> Supernet:
    """The run's trained supernet (``supernet.safetensors``)."""
    from flora_ray.search.evaluator import supernet_from_numpy

    tensors, header = store.read_checkpoint(ARTEFACTS.supernet)
    return supernet_from_numpy(header, {k: v.numpy() for k, v in tensors.items()}, device)


def calibrate_subnet(supernet: Supernet, ranks: dict[str, int], cfg: Config) -> bool:
    """Set the supernet to ``ranks`` and, when the run recalibrates BatchNorm (``search.bn_recalibration_images``)
    and the model has any, give it that subnet's statistics on the run's recalibration images, as the search
    scored it: the exported weights then carry them. Returns whether anything was recalibrated."""
    from flora_ray.search.evaluator import batchnorm_calibration

    supernet.set_ranks(ranks, within_candidates=False)
    calibration = batchnorm_calibration(cfg, supernet.model)
    return calibration is not None and calibration(supernet.model)

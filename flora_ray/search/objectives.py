"""The search's objectives and constraints: accuracy against one cost axis, within budgets.

The cost axis is ``macs`` or ``params`` (exact, from the cost model) or ``latency_ms`` (predicted from the run's
latency table, ``core.latency``). Every evaluated subnet carries all three whichever axis is searched (latency
when the run has a table). Budgets (``search.max_*``, lower bounds ``search.min_*``) are absolute or relative to
the dense model (``"60%"``); ``resolve_bounds`` turns them into absolute numbers and refuses a window that no
configuration of the space can meet, before any trial runs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from flora_ray.config import COST_AXES, SearchConfig, parse_budget
from flora_ray.core.cost import CostModel
from flora_ray.core.latency import LatencyModel
from flora_ray.core.space import RankSpace
from flora_ray.errors import InputError

UNITS = {"macs": "MACs per image", "params": "parameters", "latency_ms": "ms per batch"}


@dataclass(frozen=True)
class Objectives:
    """What a search optimises: ``accuracy`` (maximised) and ``cost`` (minimised), with absolute ``bounds``
    ``{axis: (lower or None, upper or None)}``; ``latency`` is the predictor (``LatencyModel.to_dict()``) when the
    run has a latency table."""

    cost: str = "macs"
    bounds: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)
    latency: dict[str, Any] | None = None

    @property
    def names(self) -> list[str]:
        return ["accuracy", self.cost]

    def constraints(self, values: Mapping[str, float]) -> dict[str, float]:
        """Optuna constraint values (feasible when all are <= 0): ``max_<axis>`` and ``min_<axis>``."""
        out = {}
        for axis, (low, high) in self.bounds.items():
            if high is not None:
                out[f"max_{axis}"] = float(values[axis]) - high
            if low is not None:
                out[f"min_{axis}"] = low - float(values[axis])
        return out

    def feasible(self, values: Mapping[str, float]) -> bool:
        """Within every bound (values that are missing or NaN are not judged)."""
        present = all(isinstance(values.get(a), int | float) and not math.isnan(values[a]) for a in self.bounds)
        return not present or all(v <= 0 for v in self.constraints(values).values())


def latency_predictor(objectives: Objectives) -> LatencyModel | None:
    return LatencyModel.from_dict(objectives.latency) if objectives.latency else None


def subnet_costs(ranks: Mapping[str, int], cost: CostModel, latency: LatencyModel | None) -> dict[str, float]:
    """``macs``, ``params`` and ``latency_ms`` (NaN without a latency table) of the exported subnet ``ranks``."""
    return {
        "macs": float(cost.macs(ranks)),
        "params": float(cost.params(ranks)),
        "latency_ms": latency.predict(ranks) if latency is not None else math.nan,
    }


def axis_range(axis: str, space: RankSpace, cost: CostModel, latency: LatencyModel | None) -> tuple[float, float]:
    """The cheapest and dearest value of ``axis`` over every configuration of ``space`` (exact: all three axes
    are sums over layers, so each block's extreme candidate makes the extreme configuration), and the dense one."""
    if axis == "latency_ms":
        if latency is None:
            raise InputError("latency_ms needs the run's latency table: run `flora-ray profile CONFIG` first")
        return latency.cheapest_ms(space), latency.dearest_ms(space)
    per_layer = (lambda f, r: cost.sites[f].macs(r)) if axis == "macs" else (lambda f, r: cost.sites[f].params(r))
    total = cost.macs({}) if axis == "macs" else cost.params({})
    base = total - sum(per_layer(f, None) for f in space.fqns)
    ends = []
    for pick in (min, max):
        value = base
        for block in space.blocks:
            value += pick(sum(per_layer(f, r) for f, r in zip(block.fqns, c, strict=True)) for c in block.candidates)
        ends.append(float(value))
    return ends[0], ends[1]


def dense_value(axis: str, cost: CostModel, latency: LatencyModel | None) -> float:
    if axis == "latency_ms":
        if latency is None:
            raise InputError("a latency budget needs the run's latency table: run `flora-ray profile CONFIG` first")
        return latency.dense_ms
    return float(cost.dense_macs if axis == "macs" else cost.dense_params)


def resolve_bounds(
    search: SearchConfig, space: RankSpace, cost: CostModel, latency: LatencyModel | None
) -> dict[str, tuple[float | None, float | None]]:
    """Absolute ``{axis: (lower, upper)}`` of the configured budgets; raises when no configuration of ``space``
    can meet them (an upper bound below the cheapest, a lower bound above the dearest, or lower above upper)."""
    bounds = {}
    for axis in COST_AXES:
        raw = {side: getattr(search, f"{side}_{axis}") for side in ("min", "max")}
        if all(v is None for v in raw.values()):
            continue
        dense = dense_value(axis, cost, latency)
        absolute = {}
        for side, value in raw.items():
            amount, relative = parse_budget(value) if value is not None else (None, False)
            absolute[side] = None if amount is None else amount * dense if relative else amount
        low, high = absolute["min"], absolute["max"]
        cheapest, dearest = axis_range(axis, space, cost, latency)
        where = f"{UNITS[axis]}; dense {_fmt(dense)}, the space spans {_fmt(cheapest)}..{_fmt(dearest)}"
        if high is not None and high < cheapest:
            raise InputError(
                f"search.max_{axis}={raw['max']!r} ({_fmt(high)}) is below the cheapest configuration of the space "
                f"({where}): raise the budget"
            )
        if low is not None and low > dearest:
            raise InputError(
                f"search.min_{axis}={raw['min']!r} ({_fmt(low)}) is above the dearest configuration of the space "
                f"({where}): lower it"
            )
        if low is not None and high is not None and low > high:
            raise InputError(f"search.min_{axis}={raw['min']!r} is above search.max_{axis}={raw['max']!r}: swap them")
        bounds[axis] = (low, high)
    return bounds


def _fmt(value: float) -> str:
    return f"{value:.4g}"

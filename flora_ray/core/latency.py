"""Latency table of a rank space and the latency predictor built from it.

``flora-ray profile`` measures, on the target device, every distinct item the space's exported subnets can run
(``profile_items``) and writes them as rows of ``latency_table.parquet``:

- ``linear``: one factorised layer in the form the exported subnet runs it (``core.lowrank``): ``lowrank`` at a
  rank below break-even (two Linears), or ``merged`` (one dense Linear, the same for every rank at or above it:
  ``rank`` 0), keyed by its shape, bias and token rows per image. Identical layers of different blocks share a row.
- ``rest``: everything but the factorised layers (patch embedding, attention products, softmax, norms, GELU,
  residual adds, the head and any Linear that is not factorised), measured by running the model (scope ``model``)
  or one block (scope: the block's name) with every factorised Linear replaced by a zero-cost stand-in.
- ``model``: an exported configuration (``dense`` and every uniform one) measured end to end, which calibrates
  the sum (``LatencyModel``) and is the table's own check of it.

Every row is measured at each configured batch size; ``ms`` is the median of ``torch.utils.benchmark``'s blocked
measurements. ``LatencyModel.predict(ranks)`` is ``scale * (rest + sum of the layers' rows) + offset``, with
``scale`` and ``offset`` fitted by least squares on the ``model`` rows: the parts measured alone run a little
faster or slower than inside the model (caches, per-call overhead of the stand-ins), by an amount that the
calibration measures instead of assuming.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from flora_ray.core.cost import CostModel
from flora_ray.core.lowrank import low_rank_is_cheaper
from flora_ray.core.space import RankSpace
from flora_ray.errors import InputError

TABLE_COLUMNS = (
    "kind", "scope", "batch", "in_features", "out_features", "tokens", "bias", "form", "rank", "ranks", "ms",
    "iqr_ms", "measurements",
)  # fmt: skip
MERGED = 0  # the ``rank`` of a merged (dense) layer row: every rank at or above break-even runs the same layer


def layer_item(cost: CostModel, fqn: str, rank: int | None) -> dict[str, Any]:
    """The ``linear`` table item that layer ``fqn`` runs at ``rank`` (``None``: the dense layer)."""
    site = cost.sites[fqn]
    lowrank = rank is not None and low_rank_is_cheaper(site.in_features, site.out_features, rank)
    return {
        "kind": "linear",
        "scope": "",
        "in_features": site.in_features,
        "out_features": site.out_features,
        "tokens": site.tokens,
        "bias": site.bias,
        "form": "lowrank" if lowrank else "merged",
        "rank": int(rank) if lowrank else MERGED,
        "ranks": "",
    }


def item_key(item: Mapping[str, Any]) -> tuple:
    """What identifies a measurement (without the batch size)."""
    if item["kind"] == "linear":
        fields = ("in_features", "out_features", "tokens", "bias", "rank")
        return ("linear", *(int(item[f]) for f in fields))
    return (item["kind"], str(item["scope"]))


def profile_items(space: RankSpace, cost: CostModel, model_configs: Mapping[str, Mapping[str, int]]) -> list[dict]:
    """Every item a table for ``space`` needs: each distinct layer form of every rank choice and of the dense layer,
    the rest of the model and of each block, and the end-to-end ``model_configs`` (label: ranks)."""
    items: dict[tuple, dict[str, Any]] = {}
    for layer in space.layers:
        for rank in (*layer.rank_choices, None):
            item = layer_item(cost, layer.fqn, rank)
            items.setdefault(item_key(item), item)
    blank = {"in_features": 0, "out_features": 0, "tokens": 0, "bias": False, "form": "", "rank": MERGED}
    for scope in ("model", *(block.name for block in space.blocks)):
        items[("rest", scope)] = {"kind": "rest", "scope": scope, **blank, "ranks": ""}
    for label, ranks in model_configs.items():
        items[("model", label)] = {"kind": "model", "scope": label, **blank, "ranks": json.dumps(dict(ranks))}
    return list(items.values())


def calibration_configs(space: RankSpace, random_configs: int = 4, seed: int = 0) -> dict[str, dict[str, int]]:
    """The configurations a profile measures end to end: the dense model, every uniform configuration and
    ``random_configs`` seeded random ones of the space (a spread of mixed ranks, as the search produces)."""
    configs: dict[str, dict[str, int]] = {"dense": {}}
    configs.update({f"uniform {ratio:g}": ranks for ratio, ranks in space.uniform_all().items()})
    rng = random.Random(seed)
    for i in range(random_configs):
        configs[f"random {i}"] = space.from_block_tuples([rng.choice(b.candidates) for b in space.blocks])
    return configs


def missing_items(table: pd.DataFrame | None, items: Iterable[Mapping[str, Any]], batch: int) -> list[dict]:
    """The items without a row at ``batch`` in ``table``."""
    done = set()
    if table is not None and len(table):
        done = {item_key(row) for row in table[table["batch"] == batch].to_dict("records")}
    return [dict(item) for item in items if item_key(item) not in done]


def empty_table() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=_dtype(c)) for c in TABLE_COLUMNS})


def _dtype(column: str) -> str:
    if column in ("kind", "scope", "form", "ranks"):
        return "object"
    if column == "bias":
        return "bool"
    return "float64" if column in ("ms", "iqr_ms") else "int64"


@dataclass(frozen=True)
class LatencyModel:
    """Predicted latency (ms per batch of ``batch`` images) of any configuration of a space.

    Attributes:
        batch: The batch size the rows were measured at.
        layers: Per factorised layer, ms by rank (every rank choice of the space).
        dense_layers: Per factorised layer, ms of the dense layer (a layer absent from a configuration).
        rest_ms: The model without its factorised layers.
        scale, offset: The calibration: ``predict = scale * raw + offset``.
        device: Where the table was measured (the table's metadata).
        fit: The calibration points and their residuals, for reports.
    """

    batch: int
    layers: dict[str, dict[int, float]]
    dense_layers: dict[str, float]
    rest_ms: float
    scale: float = 1.0
    offset: float = 0.0
    device: dict[str, Any] = field(default_factory=dict)
    fit: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_table(
        cls, table: pd.DataFrame, space: RankSpace, cost: CostModel, batch: int, device: Mapping[str, Any] = ()
    ) -> LatencyModel:
        """The predictor of ``space`` at ``batch``; raises naming the first item the table lacks."""
        rows = table[table["batch"] == batch]
        measured = {item_key(row): float(row["ms"]) for row in rows.to_dict("records")}
        if not measured:
            batches = sorted(int(b) for b in table["batch"].unique())
            raise InputError(f"the latency table has no rows at batch {batch} (measured: {batches})")

        def ms(item: Mapping[str, Any]) -> float:
            try:
                return measured[item_key(item)]
            except KeyError:
                raise InputError(
                    f"the latency table has no row for {describe_item(item)} at batch {batch}: run `flora-ray "
                    "profile` for this run's model and space"
                ) from None

        layers = {
            layer.fqn: {r: ms(layer_item(cost, layer.fqn, r)) for r in layer.rank_choices} for layer in space.layers
        }
        dense = {layer.fqn: ms(layer_item(cost, layer.fqn, None)) for layer in space.layers}
        model = cls(batch, layers, dense, ms({"kind": "rest", "scope": "model"}), device=dict(device))
        points = [(json.loads(r["ranks"] or "{}"), float(r["ms"]), r["scope"]) for r in rows.to_dict("records")
                  if r["kind"] == "model"]  # fmt: skip
        return model.calibrated(points)

    def raw_ms(self, ranks: Mapping[str, int] | None = None) -> float:
        """The sum of the parts: the rest plus each factorised layer at its rank (dense where absent)."""
        ranks = ranks or {}
        unknown = set(ranks) - set(self.layers)
        if unknown:
            raise ValueError(f"the latency model has no layer {sorted(unknown)[0]!r}")
        total = self.rest_ms
        for fqn, by_rank in self.layers.items():
            if fqn not in ranks:
                total += self.dense_layers[fqn]
            elif ranks[fqn] in by_rank:
                total += by_rank[ranks[fqn]]
            else:
                raise InputError(
                    f"rank {ranks[fqn]!r} of layer {fqn!r} is not in the latency table ({sorted(by_rank)})"
                )
        return total

    def predict(self, ranks: Mapping[str, int] | None = None) -> float:
        """Predicted latency (ms) of the exported subnet ``ranks`` (``{}``: the dense model) at ``self.batch``."""
        return self.scale * self.raw_ms(ranks) + self.offset

    @property
    def dense_ms(self) -> float:
        return self.predict({})

    def calibrated(self, points: list[tuple[Mapping[str, int], float, str]]) -> LatencyModel:
        """This model calibrated on ``(ranks, measured ms, label)`` points: of an offset alone (the parts' sum is
        right up to a constant, such as the stand-ins' call overhead) and an affine map fitted by least squares
        (the layers also run faster or slower inside the model), the one with the lower leave-one-out error."""
        if not points:
            return self
        raw = np.array([self.raw_ms(ranks) for ranks, _, _ in points])
        measured = np.array([ms for _, ms, _ in points])
        fits = {"offset": _fit_offset}
        if len(points) >= 4 and np.ptp(raw) > 0:
            fits["affine"] = _fit_affine
        errors = {name: _leave_one_out(fit, raw, measured) for name, fit in fits.items()}
        kind = min(errors, key=errors.get)
        scale, offset = fits[kind](raw, measured)
        predicted = scale * raw + offset
        fit = {
            "kind": kind,
            "leave_one_out_mape": errors,
            "mape": float(np.mean(np.abs(predicted - measured) / measured)),
            "points": [
                {"label": label, "measured_ms": float(m), "raw_ms": float(r), "predicted_ms": float(p)}
                for (_, _, label), m, r, p in zip(points, measured, raw, predicted, strict=True)
            ],
        }
        return LatencyModel(self.batch, self.layers, self.dense_layers, self.rest_ms, float(scale), float(offset),
                            self.device, fit)  # fmt: skip

    def cheapest_ms(self, space: RankSpace) -> float:
        """The lowest prediction of any configuration of ``space`` (exact: the sum is additive over blocks)."""
        return self._extreme_ms(space, min)

    def dearest_ms(self, space: RankSpace) -> float:
        return self._extreme_ms(space, max)

    def _extreme_ms(self, space: RankSpace, pick) -> float:
        total = self.rest_ms + sum(self.dense_layers[f] for f in self.layers if f not in set(space.fqns))
        for block in space.blocks:
            total += pick(
                sum(self.layers[f][r] for f, r in zip(block.fqns, cand, strict=True)) for cand in block.candidates
            )
        return self.scale * total + self.offset

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch": self.batch,
            "layers": {f: {str(r): ms for r, ms in by_rank.items()} for f, by_rank in self.layers.items()},
            "dense_layers": dict(self.dense_layers),
            "rest_ms": self.rest_ms,
            "scale": self.scale,
            "offset": self.offset,
            "device": self.device,
            "fit": self.fit,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatencyModel:
        layers = {f: {int(r): float(ms) for r, ms in by_rank.items()} for f, by_rank in data["layers"].items()}
        return cls(int(data["batch"]), layers, {f: float(v) for f, v in data["dense_layers"].items()},
                   float(data["rest_ms"]), float(data["scale"]), float(data["offset"]), dict(data.get("device", {})),
                   dict(data.get("fit", {})))  # fmt: skip


def _fit_offset(raw: np.ndarray, measured: np.ndarray) -> tuple[float, float]:
    return 1.0, float(np.median(measured - raw))


def _fit_affine(raw: np.ndarray, measured: np.ndarray) -> tuple[float, float]:
    scale, offset = np.polyfit(raw, measured, 1)
    return (float(scale), float(offset)) if scale > 0 else _fit_offset(raw, measured)


def _leave_one_out(fit, raw: np.ndarray, measured: np.ndarray) -> float:
    """Mean absolute percentage error of ``fit`` on each point when fitted on the others."""
    if len(raw) < 2:
        return 0.0
    errors = []
    for i in range(len(raw)):
        keep = np.arange(len(raw)) != i
        scale, offset = fit(raw[keep], measured[keep])
        errors.append(abs(scale * raw[i] + offset - measured[i]) / measured[i])
    return float(np.mean(errors))


def describe_item(item: Mapping[str, Any]) -> str:
    """A table item in words (progress lines, errors)."""
    if item["kind"] == "linear":
        form = f"rank {item['rank']}" if item["form"] == "lowrank" else "merged"
        bias = "" if item["bias"] else ", no bias"
        return f"Linear {item['in_features']}->{item['out_features']} x{item['tokens']} tokens ({form}{bias})"
    if item["kind"] == "rest":
        return f"the rest of {item['scope']}"
    return f"the {item['scope']} model"

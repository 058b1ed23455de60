"""Per-layer sensitivity and the sensitivity-guided allocations: what the search evaluates first beside the uniform
configurations (``search.guided_anchors``) and what the benchmarks (``sensitivity.py``, ``flora_vs_uniform.py``)
compare the front with.

``configurations`` lists full rank, each layer and each block alone at its lowest ranks, and uniform lowest rank;
``score`` scores configurations with an ``Evaluator`` and pairs each with full rank image by image;
``layer_sensitivity`` is each layer's drop alone at its lowest rank; ``guided_allocations`` builds from those drops
the allocations a pruning tool's cheap heuristic makes (least sensitive layers lowered first, the most sensitive
kept high); ``guided_points`` keeps those the (filtered) space holds, as genes; ``evenly`` picks some of them
over their cost range.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

from flora_ray.core.cost import CostModel
from flora_ray.core.space import RankSpace, rank_for_ratio
from flora_ray.results import paired_difference, unpack_correct
from flora_ray.search.evaluator import Evaluator, config_to_genes


def configurations(space: RankSpace) -> list[dict[str, Any]]:
    """Full rank, each layer alone at its lowest rank, each block at its lowest ranks, uniform lowest."""
    full = {layer.fqn: layer.max_rank for layer in space.layers}
    lowest = {layer.fqn: min(layer.rank_choices) for layer in space.layers}
    out = [{"kind": "full", "name": "full rank", "ranks": full}]
    out += [{"kind": "layer", "name": fqn, "block": block.name, "ranks": {**full, fqn: lowest[fqn]}}
            for block in space.blocks for fqn in block.fqns]  # fmt: skip
    out += [{"kind": "block", "name": block.name, "block": block.name,
             "ranks": {**full, **{fqn: lowest[fqn] for fqn in block.fqns}}} for block in space.blocks]  # fmt: skip
    out.append({"kind": "uniform", "name": f"uniform {min(space.ratios):g}", "ranks": lowest})
    return out


def score(evaluator: Evaluator, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each configuration's MACs and accuracy, and its paired drop from the first one (full rank): ``drop`` (points,
    full rank - this one), ``drop_se`` and ``macs_saved``."""
    rows = []
    for item in items:
        metrics = evaluator.evaluate(item["ranks"])
        correct = unpack_correct(metrics["correct"], metrics["eval_images"])
        rows.append({**{k: v for k, v in item.items() if k != "ranks"}, "macs": metrics["macs"],
                     "accuracy": metrics["accuracy"], "correct": correct})  # fmt: skip
    full = rows[0]
    for row in rows:
        diff, se = paired_difference(row["correct"], full["correct"])
        row.update(drop=-diff, drop_se=se, macs_saved=1.0 - row["macs"] / full["macs"])
    return rows


def layer_rows(evaluator: Evaluator) -> list[dict[str, Any]]:
    """``score`` of full rank and of each layer alone at its lowest rank, every other layer at full rank, on the
    evaluator's images (the full-rank row first)."""
    return score(evaluator, [c for c in configurations(evaluator.supernet.space) if c["kind"] in ("full", "layer")])


def layer_sensitivity(evaluator: Evaluator) -> dict[str, float]:
    """Each layer's accuracy drop (points) alone at its lowest rank (``layer_rows``): what ``guided_allocations``
    orders layers by."""
    return {r["name"]: r["drop"] for r in layer_rows(evaluator) if r["kind"] == "layer"}


def guided_allocations(
    space: RankSpace, drops: Mapping[str, float], cost: CostModel, *, keep_full: int | None = None, step: int = 1
) -> list[dict[str, Any]]:
    """The sensitivity-guided baseline: allocations that lower the least sensitive layers first.

    Layers are ordered by ``drops`` (each layer's accuracy drop alone at its lowest rank; least sensitive first,
    ties in the space's layer order). For each pair of adjacent ratios ``low < mid`` of the space and each ``n``
    from 0 to L: the ``n`` least sensitive layers at ``low`` and the rest at ``mid``; and, where ``mid < 1``, the
    ``keep_full`` most sensitive layers at full rank, the ``n`` (up to ``L - keep_full``) least sensitive at ``low``
    and the rest at ``mid`` (default ``keep_full``: L / 6 rounded, at least 1; 2 of 12 layers gives the issue's
    example, the 4 least sensitive at 1/16, the 2 most at full rank, the rest at 1/8). A configuration reached
    twice is kept once (the first name). ``step``: ``n`` runs in steps of ``step`` (its last value always
    included), for a smaller family. Returns per configuration ``name``, ``low``, ``mid``, ``lowered``,
    ``full`` (layers at full rank, ``mid == 1`` counted), ``ranks`` and ``macs`` (``cost.macs``).
    """
    if set(drops) != set(space.fqns):
        raise ValueError(f"drops name {sorted(drops)}; need exactly the space's layers {list(space.fqns)}")
    position = {fqn: i for i, fqn in enumerate(space.fqns)}
    order = sorted(space.fqns, key=lambda fqn: (drops[fqn], position[fqn]))  # least sensitive first
    n_layers, ratios = len(order), sorted(space.ratios)
    keep_full = max(1, round(n_layers / 6)) if keep_full is None else keep_full
    if not 0 <= keep_full <= n_layers:
        raise ValueError(f"keep_full={keep_full} must be between 0 and the {n_layers} layers")
    if step < 1:
        raise ValueError(f"step={step} must be at least 1")
    out, seen = [], set()
    for low, mid in itertools.pairwise(ratios):
        for full in sorted({0, keep_full if mid < 1 else 0}):
            for lowered in sorted({*range(0, n_layers - full + 1, step), n_layers - full}):
                at = {f: low for f in order[:lowered]} | {f: 1.0 for f in order[n_layers - full :]}
                ranks = {f: rank_for_ratio(at.get(f, mid), space.layer(f).max_rank) for f in space.fqns}
                key = tuple(ranks.values())
                if key in seen:
                    continue
                seen.add(key)
                name = f"{lowered} least sensitive at {low:g}, " + (f"{full} most at 1, " if full else "")
                out.append({"name": f"{name}rest at {mid:g}", "low": low, "mid": mid, "lowered": lowered,
                            "full": n_layers - lowered if mid == 1 else full, "ranks": ranks, "macs": float(cost.macs(ranks))})  # fmt: skip
    return out


def guided_points(space: RankSpace, drops: Mapping[str, float], cost: CostModel) -> list[dict[str, int]]:
    """Genes of the guided allocations (``guided_allocations``, every ``n``) that ``space`` holds (a filtered space
    keeps some of them), cheapest first."""
    held = [a for a in guided_allocations(space, drops, cost) if space.contains(a["ranks"])]
    return [config_to_genes(space, a["ranks"]) for a in sorted(held, key=lambda a: a["macs"])]


def evenly(items: list[Any], limit: int) -> list[Any]:
    """``items`` when there are at most ``limit``, else ``limit`` of them evenly spaced in their order (both ends
    kept when ``limit`` >= 2)."""
    if len(items) <= limit:
        return list(items)
    if limit <= 1:
        return items[:limit]
    return [items[i] for i in sorted({round(i * (len(items) - 1) / (limit - 1)) for i in range(limit)})]

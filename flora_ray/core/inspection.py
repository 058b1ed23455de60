"""A model configuration laid out layer by layer: shapes, ranks, the executed form and exact MACs."""

from __future__ import annotations

from typing import Any

from flora_ray.core.cost import build_cost_model
from flora_ray.core.families import family_of
from flora_ray.core.lowrank import low_rank_is_cheaper
from flora_ray.core.models import create_model
from flora_ray.core.space import default_ratios, load_rank_file
from flora_ray.core.supernet import build_space


def inspect_model(
    model: str,
    ranks_file: str | None = None,
    ratio: float | None = None,
    model_kwargs: dict[str, Any] | None = None,
    include_proj: bool = False,
) -> dict[str, Any]:
    """Per-layer shapes, ranks, executed form and MACs of a configuration, with totals against dense (built on the
    meta device: no weights, no SVD). What ``flora-ray inspect`` prints."""
    kwargs = dict(model_kwargs or {})
    dense = create_model(model, device="meta", **kwargs)
    ratios = sorted(set(default_ratios(model)) | ({ratio} if ratio else set()))
    space = build_space(dense, ratios=ratios, include_proj=include_proj, model_name=model)
    cost = build_cost_model(dense)
    if ranks_file:
        ranks = load_rank_file(ranks_file, space)
    elif ratio:
        ranks = space.uniform(ratio)
    else:
        ranks = space.largest()
    layers = []
    for layer in space.layers:
        rank = ranks[layer.fqn]
        layers.append(
            {
                "fqn": layer.fqn,
                "in_features": layer.in_features,
                "out_features": layer.out_features,
                "rank": rank,
                "max_rank": layer.max_rank,
                "form": "low_rank" if low_rank_is_cheaper(layer.in_features, layer.out_features, rank) else "dense",
                "macs": cost.layer_macs(layer.fqn, rank),
            }
        )
    img_size = family_of(dense).img_size(dense)  # build_space above has checked that a family matches
    return {
        "model": model,
        "img_size": list(img_size),
        "macs": cost.macs(ranks),
        "params": cost.params(ranks),
        "dense_macs": cost.dense_macs,
        "dense_params": cost.dense_params,
        "layers": layers,
    }

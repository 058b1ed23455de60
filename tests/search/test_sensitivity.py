"""The product's sensitivity-guided allocations (``flora_ray.search.sensitivity``): the pruning tools' cheap
heuristic that the search evaluates first (``search.guided_anchors``) and the benchmarks compare with."""

import itertools

import pytest
from helpers import counted_macs, input_for

import flora_ray as fr
from flora_ray.core.space import rank_for_ratio
from flora_ray.search.sensitivity import guided_allocations

# --- the sensitivity-guided baseline (issue 29 item 5) ----------------------------------------------------------------

LAYERS = ["blocks.0.attn.qkv", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2",
          "blocks.1.attn.qkv", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]  # fmt: skip
# least sensitive first: b0.fc1 and b1.fc1 (a tie, kept in layer order), b1.fc2, b0.fc2, b0.qkv, b1.qkv
DROPS = dict(zip(LAYERS, [0.9, 0.1, 0.5, 1.2, 0.1, 0.3], strict=True))


@pytest.fixture(scope="module")
def tiny():
    kwargs = {"img_size": 8, "in_chans": 1, "num_classes": 10, "patch_size": 2, "embed_dim": 32, "depth": 2,
              "num_heads": 2, "mlp_ratio": 2}  # fmt: skip
    supernet = fr.build_supernet("test_vit", model_kwargs=kwargs, ratios=[0.25, 0.5, 1.0])
    assert list(supernet.space.fqns) == LAYERS
    return supernet


def at(supernet, ratios: dict[str, float]) -> dict[str, int]:
    return {f: rank_for_ratio(ratios[f], supernet.space.layer(f).max_rank) for f in LAYERS}


def test_guided_allocations_lower_the_least_sensitive_layers_first(tiny):
    configs = guided_allocations(tiny.space, DROPS, tiny.cost, keep_full=2)
    by_name = {c["name"]: c for c in configs}
    # the example at this size: the 2 least sensitive at the lowest rank, the 2 most at full, the rest between
    example = by_name["2 least sensitive at 0.25, 2 most at 1, rest at 0.5"]
    assert example["ranks"] == at(tiny, {"blocks.0.mlp.fc1": 0.25, "blocks.1.mlp.fc1": 0.25, "blocks.1.mlp.fc2": 0.5,
                                         "blocks.0.mlp.fc2": 0.5, "blocks.0.attn.qkv": 1.0, "blocks.1.attn.qkv": 1.0})  # fmt: skip
    assert by_name["3 least sensitive at 0.25, rest at 0.5"]["ranks"] == at(
        tiny, {f: 0.25 if f in ("blocks.0.mlp.fc1", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2") else 0.5 for f in LAYERS}
    )
    assert by_name["1 least sensitive at 0.5, rest at 1"]["ranks"] == at(
        tiny, {f: 0.5 if f == "blocks.0.mlp.fc1" else 1.0 for f in LAYERS}
    )
    # (0.25, 0.5): 7 + 5 with two at full rank; (0.5, 1): 7; uniform 0.5 and "2 most at 1, rest at 0.5" twice
    assert len(configs) == 7 + 5 + 7 - 2
    assert len({tuple(c["ranks"].values()) for c in configs}) == len(configs)
    order = ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2", "blocks.0.mlp.fc2", "blocks.0.attn.qkv",
             "blocks.1.attn.qkv"]  # fmt: skip
    for c in configs:
        expected = {f: c["low"] for f in order[: c["lowered"]]} | {f: 1.0 for f in order[len(order) - c["full"] :]}
        assert c["ranks"] == at(tiny, {f: expected.get(f, c["mid"]) for f in LAYERS}), c["name"]


def test_guided_allocations_macs_are_the_cost_models_and_fall_as_layers_are_lowered(tiny):
    configs = guided_allocations(tiny.space, DROPS, tiny.cost)  # default: 1 of 6 layers kept at full
    assert {c["full"] for c in configs if c["mid"] < 1} == {0, 1}
    x = input_for(tiny.model, batch=1)
    for c in configs:
        assert c["macs"] == tiny.cost.macs(c["ranks"])
    for c in configs[::5]:  # the cost model against FlopCounterMode on the extracted subnet
        assert counted_macs(fr.extract_subnet(tiny, c["ranks"], within_candidates=False).eval(), x) == c["macs"]
    series: dict[tuple, list[float]] = {}
    for c in sorted(configs, key=lambda c: c["lowered"]):
        series.setdefault((c["low"], c["mid"], c["full"] if c["mid"] < 1 else None), []).append(c["macs"])
    assert all(all(a > b for a, b in itertools.pairwise(s)) for s in series.values())


def test_guided_allocations_in_steps_keep_both_ends(tiny):
    every = {c["name"]: c for c in guided_allocations(tiny.space, DROPS, tiny.cost, keep_full=2)}
    stepped = guided_allocations(tiny.space, DROPS, tiny.cost, keep_full=2, step=3)
    assert all(every[c["name"]] == c for c in stepped)
    assert sorted({c["lowered"] for c in stepped if c["full"] == 2}) == [0, 3, 4]  # 0..4 in steps of 3, and 4
    assert sorted({c["lowered"] for c in stepped if c["mid"] == 1}) == [0, 3]  # 6 is uniform 0.5, met before


def test_guided_allocations_need_every_layers_sensitivity(tiny):
    with pytest.raises(ValueError, match="drops name"):
        guided_allocations(tiny.space, {k: v for k, v in DROPS.items() if "qkv" not in k}, tiny.cost)


def test_guided_points_are_the_allocations_a_filtered_space_holds_cheapest_first(tiny):
    from flora_ray.search.evaluator import genes_to_config
    from flora_ray.search.sensitivity import guided_points

    every = guided_allocations(tiny.space, DROPS, tiny.cost)
    assert [genes_to_config(tiny.space, g) for g in guided_points(tiny.space, DROPS, tiny.cost)] == [
        a["ranks"] for a in sorted(every, key=lambda a: a["macs"])
    ]
    # block 0 keeps only the triples with fc1 at its lowest rank: the allocations with fc1 higher do not fit
    lowest = min(tiny.space.layer("blocks.0.mlp.fc1").rank_choices)
    kept = {b.name: [c for c in b.candidates if b.name != "blocks.0" or c[1] == lowest] for b in tiny.space.blocks}
    space = tiny.space.restrict(kept)
    held = [genes_to_config(space, g) for g in guided_points(space, DROPS, tiny.cost)]
    expected = [a["ranks"] for a in sorted(every, key=lambda a: a["macs"]) if a["ranks"]["blocks.0.mlp.fc1"] == lowest]
    assert held == expected and 0 < len(held) < len(every)


def test_evenly_spreads_over_the_order_and_keeps_both_ends():
    from flora_ray.search.sensitivity import evenly

    assert evenly(list(range(5)), 8) == [0, 1, 2, 3, 4]
    assert evenly(list(range(10)), 4) == [0, 3, 6, 9]
    assert (
        evenly(list(range(21)), 19) == sorted(set(evenly(list(range(21)), 19)))
        and len(evenly(list(range(21)), 19)) == 19
    )
    assert evenly(list(range(10)), 1) == [0] and evenly(list(range(10)), 0) == []

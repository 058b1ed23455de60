"""Candidate filtering: cached prefix/suffix forward, local supernets, keep rule, outputs and resume on Ray."""

import json
import math
import random
from dataclasses import replace

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from helpers import TINY_MODELS, input_for

import flora_ray as fr
from flora_ray.config import DataConfig, FilterConfig
from flora_ray.core.space import RankSpace
from flora_ray.data.datasets import build_datasets
from flora_ray.search.filtering import filter_block, local_space, score_candidates, select, split_forward
from flora_ray.stages.inputs import build_run_supernet
from flora_ray.storage.run_store import ARTEFACTS, RunStore
from flora_ray.training.sampling import BlockwiseSampler


@pytest.mark.parametrize("family", ["vit", "swin_padded", "deit_distilled"])
def test_prefix_then_suffix_equals_the_full_forward(family):
    name, kwargs = TINY_MODELS[family]
    supernet = fr.build_supernet(name, model_kwargs=kwargs).eval()
    x = input_for(supernet.model)
    with torch.no_grad():
        expected = supernet(x)
        for block in supernet.space.blocks:
            prefix, suffix = split_forward(supernet.model, block.name)
            torch.testing.assert_close(suffix(prefix(x)), expected, rtol=1e-5, atol=1e-5)


def test_local_supernet_never_changes_other_blocks():
    supernet = fr.build_supernet(*TINY_MODELS["vit"][:1], model_kwargs=TINY_MODELS["vit"][1])
    space = supernet.space
    full = space.largest()
    for i, block in enumerate(space.blocks[:3]):
        sampler = BlockwiseSampler(local_space(space, i), "uniform")
        rng = np.random.default_rng(i)
        seen = set()
        for _ in range(300):
            config = sampler.sample(rng)[0]
            assert all(config[f] == full[f] for f in space.fqns if f not in block.fqns)
            seen.add(tuple(config[f] for f in block.fqns))
        assert len(seen) > 150  # block i really varies (216 candidates)


def test_cached_scores_equal_full_forward_accuracy():
    dense = fr.create_model("test_vit", img_size=8, patch_size=2, in_chans=1, num_classes=10, depth=2, embed_dim=32)
    with torch.no_grad():
        for p in dense.parameters():  # large random weights: predictions differ between candidates
            p.normal_(0, 0.5)
    supernet = fr.build_supernet(dense)
    search = torch.utils.data.Subset(
        build_datasets(DataConfig(name="digits", img_size=8, in_chans=1)).search, range(100)
    )
    # 100 images in batches of 32: the prefix is cached per batch and every candidate's counts add up across batches
    scores = score_candidates(supernet, 1, search, torch.device("cpu"), batch_size=32)
    block = supernet.space.blocks[1]
    x = torch.stack([search[i][0] for i in range(100)])
    y = torch.tensor([search[i][1] for i in range(100)])
    rng = random.Random(0)
    for index in rng.sample(range(len(block.candidates)), 8):
        config = {**supernet.space.largest(), **dict(zip(block.fqns, block.candidates[index], strict=True))}
        supernet.set_ranks(config)
        with torch.no_grad():
            acc = 100.0 * (supernet(x).argmax(-1) == y).float().mean().item()
        assert scores[index] == pytest.approx(acc, abs=1e-4)
    assert len(set(scores)) > 1  # the scores differ between candidates


def _rows(accuracies, macs):
    return [
        {"block": "b", "block_index": 0, "candidate": i, "ranks": [r, r], "macs": m, "accuracy": a}
        for i, (r, a, m) in enumerate(zip(range(1, len(macs) + 1), accuracies, macs, strict=True))
    ]


def test_flops_aware_keep_rule_on_hand_made_rows():
    # Candidate ranks (1,1) .. (5,5); (5,5) is full rank with 100 MACs and 90% accuracy.
    rows = _rows([80.0, 89.0, 85.0, 89.5, 90.0], [20, 40, 60, 80, 100])
    select(rows, (5, 5), keep_fraction=0.6, score="flops_aware")
    scores = [r["score"] for r in rows]
    assert scores[0] == pytest.approx(10 / 0.8) and scores[1] == pytest.approx(1 / 0.6)
    assert scores[3] == pytest.approx(0.5 / 0.2) and scores[4] == -math.inf
    assert [r["kept"] for r in rows] == [False, True, False, True, True]  # ceil(0.6 * 5) = 3, full included
    # Tuples that lose nothing come first, the larger saving first: (2,2) gains 0.5 pt saving 60%, (4,4) 1 pt saving 20%.
    rows = _rows([80.0, 90.5, 85.0, 91.0, 90.0], [20, 40, 60, 80, 100])
    select(rows, (5, 5), keep_fraction=0.6, score="flops_aware")
    assert rows[1]["score"] == pytest.approx(-0.5 * 0.6) and rows[3]["score"] == pytest.approx(-1.0 * 0.2)
    assert [r["kept"] for r in rows] == [False, True, False, True, True]
    select(rows, (5, 5), keep_fraction=0.4, score="flops_aware")
    assert [r["kept"] for r in rows] == [False, True, False, False, True]
    select(rows, (5, 5), keep_fraction=0.4, score="accuracy")
    assert [r["kept"] for r in rows] == [False, False, False, True, True]  # 91.0 and the full rank
    with pytest.raises(ValueError, match="has no full-rank candidate"):
        select(rows, (9, 9), 0.5, "accuracy")


def test_uniform_tuples_survive_whatever_they_score():
    """filter.keep_uniform: each block keeps its uniform tuples (kept_for 'uniform'), even the worst-scoring one."""
    rows = _rows([10.0, 89.0, 85.0, 89.5, 90.0], [20, 40, 60, 80, 100])  # (1,1): the worst score by far
    select(rows, (5, 5), keep_fraction=0.4, score="flops_aware")
    assert [r["kept"] for r in rows] == [False, True, False, False, True]
    select(rows, (5, 5), keep_fraction=0.4, score="flops_aware", uniform=[(1, 1), (3, 3), (5, 5)])
    assert [r["kept_for"] for r in rows] == ["uniform", "score", "uniform", None, "full_rank"]


def test_zero_training_scores_every_triple_once_and_deterministically():
    supernet = fr.build_supernet(
        "test_vit",
        model_kwargs={"img_size": 8, "patch_size": 2, "in_chans": 1, "num_classes": 10, "depth": 2, "embed_dim": 32},
    )
    splits = build_datasets(DataConfig(name="digits", img_size=8, in_chans=1))
    cfg = FilterConfig(mode="zero_training", eval_images=64)
    first = filter_block(supernet, None, 0, splits.train, splits.search, cfg, 0, torch.device("cpu"))
    second = filter_block(supernet, None, 0, splits.train, splits.search, cfg, 0, torch.device("cpu"))
    assert [tuple(r["ranks"]) for r in first["rows"]] == list(supernet.space.blocks[0].candidates)
    assert [r["accuracy"] for r in first["rows"]] == [r["accuracy"] for r in second["rows"]]
    assert first["losses"] == []


@pytest.mark.slow
def test_filter_on_ray_outputs_resume_and_feed_training(digits_config, with_teacher, tmp_path):
    import ray

    from flora_ray.backends.ray import RayBackend, init_ray
    from flora_ray.stages.filter import filter_stage

    BLOCKS_DIR, SCORES_FILE = ARTEFACTS.filter_blocks, ARTEFACTS.filter_scores

    def run_filter(cfg):
        return filter_stage(cfg, RayBackend())

    cfg = digits_config(
        "filter.epochs=1",
        "filter.batch_size=64",
        "filter.eval_images=100",
        "filter.subset=0.3",
        "model.ratios=[0.5, 1.0]",
    )
    cfg = replace(cfg, model=replace(cfg.model, kwargs={**cfg.model.kwargs, "depth": 3}))
    with_teacher(cfg)
    init_ray(num_cpus=2)
    try:
        summary = run_filter(cfg)
        run_dir = cfg.run.run_dir
        df = pd.read_parquet(run_dir / SCORES_FILE)
        assert list(df.columns) == [
            "block", "block_index", "candidate", "ranks", "ranks_by_fqn", "macs", "accuracy", "score", "kept",
            "kept_for", "mode",
        ]  # fmt: skip
        assert len(df) == 3 * 8 and not df.duplicated(["block", "candidate"]).any()
        assert (df.groupby("block").kept.sum() == math.ceil(0.3 * 8)).all()
        full = df[df.ranks.map(lambda r: list(r) == [32, 32, 32])]
        assert len(full) == 3 and full.kept.all()
        metadata = pq.read_schema(run_dir / SCORES_FILE).metadata
        assert json.loads(metadata[b"flora_ray.config"])["filter"]["epochs"] == 1
        space = RankSpace.load(run_dir / ARTEFACTS.space)
        assert [len(b.candidates) for b in space.blocks] == [3, 3, 3] == summary["kept_per_block"]
        assert summary["configs_before"] == 8**3 and summary["configs_after"] == 27
        # Training reads the filtered space.
        supernet, _ = build_run_supernet(cfg, RunStore(run_dir))
        assert supernet.space == space
        # Resume: only the missing block is recomputed; the result is deterministic for the seed.
        kept_files = {p.name: p.stat().st_mtime_ns for p in (run_dir / BLOCKS_DIR).glob("block_*.json")}
        (run_dir / BLOCKS_DIR / "block_001.json").unlink()
        run_filter(cfg)
        after = {p.name: p.stat().st_mtime_ns for p in (run_dir / BLOCKS_DIR).glob("block_*.json")}
        assert after["block_000.json"] == kept_files["block_000.json"]
        assert after["block_002.json"] == kept_files["block_002.json"]
        assert after["block_001.json"] != kept_files["block_001.json"]
        again = pd.read_parquet(run_dir / SCORES_FILE)
        pd.testing.assert_frame_equal(again, df)
        # A block file from another space is rejected.
        (run_dir / BLOCKS_DIR / "block_000.json").write_text(json.dumps({"block": "blocks.9", "rows": []}))
        with pytest.raises(ValueError, match="does not belong to this model's space"):
            run_filter(cfg)
    finally:
        ray.shutdown()


def _band_rows(space, cost, block_index, rng):
    """Rows of one block in which the flops-aware score rises with the saving (accuracy lost grows as its
    square), plus a little score noise: pure score ranking keeps a band of expensive tuples and drops every
    cheap one."""
    block, full = space.blocks[block_index], space.largest()
    full_macs = cost.macs(full)
    rows = []
    for index, candidate in enumerate(block.candidates):
        macs = cost.macs({**full, **dict(zip(block.fqns, candidate, strict=True))})
        saved = (full_macs - macs) / full_macs
        accuracy = 90.0 - 400.0 * saved**2 + rng.normal(0, 0.05) * (saved > 0)
        rows.append({"block": block.name, "block_index": block_index, "candidate": index, "ranks": list(candidate),
                     "macs": macs, "accuracy": accuracy})  # fmt: skip
    return rows


def _cheapest(space, cost):
    """The MACs of the cheapest configuration of a (filtered) space, by brute force over each block's tuples."""
    full = space.largest()
    config = dict(full)
    for block in space.blocks:
        costs = {c: cost.macs({**full, **dict(zip(block.fqns, c, strict=True))}) for c in block.candidates}
        config.update(dict(zip(block.fqns, min(costs, key=costs.get), strict=True)))
    return cost.macs(config)


@pytest.mark.parametrize("floor_value", ["uniform_min", "60%"])
def test_cost_floor_stays_reachable_where_score_ranking_drops_every_cheap_triple(floor_value):
    from flora_ray.search.filtering import cost_floor_macs, floor_thresholds, kept_space

    supernet = fr.build_supernet("test_vit", model_kwargs={"img_size": 32, "depth": 3})
    space, cost = supernet.space, supernet.cost
    rng = np.random.default_rng(0)
    blocks = [_band_rows(space, cost, i, rng) for i in range(len(space.blocks))]
    full_macs = cost.macs(space.largest())
    floor = cost_floor_macs(floor_value, space, cost)
    if floor_value == "uniform_min":
        assert floor == cost.macs(space.uniform(min(space.ratios))) == _cheapest(space, cost)
    else:
        assert floor == pytest.approx(0.6 * cost.dense_macs) and floor > _cheapest(space, cost)

    def keep(threshold_of, bins=0):
        thresholds = floor_thresholds(blocks, full_macs, threshold_of)
        full = space.largest()
        for block, rows, threshold in zip(space.blocks, blocks, thresholds, strict=True):
            select(rows, tuple(full[f] for f in block.fqns), 0.3, "flops_aware", threshold, bins)
        return kept_space(space, [r for rows in blocks for r in rows])

    plain = keep(None)  # the faithful rule alone: a band of expensive tuples, nothing cheap
    assert _cheapest(plain, cost) > floor
    assert all(r["kept_for"] in ("full_rank", "score", None) for rows in blocks for r in rows)
    reached = keep(floor)
    assert _cheapest(reached, cost) <= floor
    for rows in blocks:
        extra = [r for r in rows if r["kept_for"] == "floor"]
        assert len(extra) == 1 and sum(r["kept"] for r in rows) == math.ceil(0.3 * len(rows)) + 1
    if floor_value == "uniform_min":
        for block, kept in zip(space.blocks, reached.blocks, strict=True):  # the uniform-lowest tuple
            assert tuple(min(c[j] for c in block.candidates) for j in range(3)) in kept.candidates
    # Coverage: the best-scoring tuple of each of 4 equal bins of a block's MAC range is kept.
    covered = keep(None, bins=4)
    for rows in blocks:
        low, high = min(r["macs"] for r in rows), max(r["macs"] for r in rows)
        for i in range(4):
            in_bin = [r for r in rows if min(int((r["macs"] - low) / (high - low) * 4), 3) == i]
            if in_bin:
                assert min(in_bin, key=lambda r: (tuple(r["ranks"]) != (64, 64, 64), r["score"], r["macs"]))["kept"]
        assert any(r["kept_for"] == "coverage" for r in rows)
    assert _cheapest(covered, cost) < _cheapest(plain, cost)


def test_cost_floor_below_every_configuration_is_refused():
    from flora_ray.search.filtering import cost_floor_macs, floor_thresholds

    supernet = fr.build_supernet("test_vit", model_kwargs={"img_size": 32, "depth": 2})
    space, cost = supernet.space, supernet.cost
    cheapest = cost.macs(space.smallest())
    assert cost_floor_macs(cheapest, space, cost) == cheapest and cost_floor_macs(None, space, cost) is None
    with pytest.raises(ValueError, match=r"filter.cost_floor=1000 \(1000 MACs\) is below the cheapest configuration"):
        cost_floor_macs(1000, space, cost)
    with pytest.raises(ValueError, match="filter.cost_floor='1%'"):
        cost_floor_macs("1%", space, cost)
    rows = [{"macs": 100}, {"macs": 60}]
    assert floor_thresholds([rows, rows], 100, 20) == [60.0, 60.0]  # both blocks at their cheapest: 100 - 40 - 40
    assert floor_thresholds([rows, rows], 100, 80) == [90.0, 90.0]  # a quarter of each block's saving: 100 - 10 - 10
    assert floor_thresholds([rows, rows], 100, 120) == [100.0, 100.0]
    with pytest.raises(ValueError, match="below the cheapest configuration of the space"):
        floor_thresholds([rows, rows], 100, 19)

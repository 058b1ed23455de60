"""The LeViT family: targets, exact cost against FlopCounterMode, full-rank and export equivalence with BatchNorm,
the split forward, and one run of every pipeline stage on the in-process backend."""

import json
import random

import pytest
import torch
from helpers import TINY_MODELS, counted_macs, input_for, random_config, randomise_batchnorm
from torch import nn

import flora_ray as fr
from flora_ray.core.cost import build_cost_model
from flora_ray.core.families import family_of
from flora_ray.core.lowrank import ElasticLowRankLinear
from flora_ray.search.filtering import split_forward

NAME, KWARGS = TINY_MODELS["levit"]
TRIPLES = {"blocks": ("attn.qkv.linear", "mlp.ln1.linear", "mlp.ln2.linear")}
TRIPLES["downsample"] = ("attn_downsample.kv.linear", "mlp.ln1.linear", "mlp.ln2.linear")


def _dense():
    return randomise_batchnorm(fr.create_model(NAME, **KWARGS)).eval()


def _max_abs_diff(actual, expected):
    return (actual - expected).abs().max().item()


def test_levit_128s_macs_are_dominated_by_linear_layers_and_counted_exactly():
    dense = fr.create_model("levit_128s").eval()  # 224 px, 1000 classes, distillation head
    assert family_of(dense).name == "levit" and family_of(dense).img_size(dense) == (224, 224)
    cost = build_cost_model(dense)
    assert cost.dense_macs == counted_macs(dense, torch.randn(1, 3, 224, 224)) == 304_660_832  # paper: 305M
    assert cost.dense_params == sum(p.numel() for p in dense.parameters())
    linear_share = sum(site.macs() for site in cost.sites.values()) / cost.dense_macs
    assert 0.75 < linear_share < 0.77  # 76.0%; the stem and the attention products are the rest


def test_targets_are_triples_of_residual_and_downsampling_blocks():
    supernet = fr.build_supernet(NAME, model_kwargs=KWARGS)
    names = ["stages.0.blocks.0", "stages.1.downsample", "stages.1.blocks.0", "stages.1.blocks.1"]
    assert [b.name for b in supernet.space.blocks] == [*names, "stages.2.downsample", "stages.2.blocks.0"]
    for block in supernet.space.blocks:
        kind = block.name.split(".")[2]
        assert block.fqns == tuple(f"{block.name}.{layer}" for layer in TRIPLES[kind])
    layer_norm = supernet.model.stages[1].downsample.mlp.ln1  # timm LinearNorm: the BatchNorm stays after it
    assert isinstance(layer_norm.linear, ElasticLowRankLinear) and isinstance(layer_norm.bn, nn.BatchNorm1d)
    assert isinstance(supernet.model.stages[0].blocks[0].attn.proj.ln.linear, nn.Linear)
    assert isinstance(supernet.model.head.linear, nn.Linear)
    with_proj = fr.build_supernet(NAME, model_kwargs=KWARGS, include_proj=True).space.fqns
    added = sorted(set(with_proj) - set(supernet.space.fqns))
    assert added[0] == "stages.0.blocks.0.attn.proj.ln.linear"
    assert added[1] == "stages.1.blocks.0.attn.proj.ln.linear" and len(added) == 6
    assert "stages.1.downsample.attn_downsample.proj.ln.linear" in added


@pytest.mark.parametrize("include_proj", [False, True])
def test_cost_equals_flop_counter_on_extracted_subnets(include_proj):
    supernet = fr.build_supernet(NAME, model_kwargs=KWARGS, include_proj=include_proj)
    x = input_for(supernet.model, batch=1)
    rng = random.Random(1)
    configs = [supernet.space.largest(), supernet.space.smallest()]
    configs += [random_config(supernet.space, rng) for _ in range(4)]
    for config in configs:
        subnet = fr.extract_subnet(supernet, config).eval()
        assert supernet.cost.macs(config) == counted_macs(subnet, x)
        assert supernet.cost.params(config) == sum(p.numel() for p in subnet.parameters())


def test_cost_equals_flop_counter_at_other_grids():
    # 80 px: odd stage grids (5x5 -> 3x3 -> 2x2), where the subsampled queries round up; no distillation head.
    kwargs = {**KWARGS, "img_size": 80, "depth": (2, 1, 1)}
    dense = fr.create_model("levit_128s", distilled=False, **kwargs).eval()
    assert not hasattr(dense, "head_dist")
    supernet = fr.build_supernet(dense, ratios=[0.25, 1.0])
    x = input_for(dense, batch=1)
    for config in (supernet.space.smallest(), random_config(supernet.space, random.Random(2))):
        assert supernet.cost.macs(config) == counted_macs(fr.extract_subnet(supernet, config).eval(), x)


def test_full_rank_supernet_equals_the_dense_model_with_batchnorm():
    dense = _dense()
    x = input_for(dense, batch=4)
    with torch.no_grad():
        expected = dense(x)
        supernet = fr.build_supernet(dense, model_name=NAME, model_kwargs=KWARGS).eval()
        assert _max_abs_diff(supernet(x), expected) <= 1e-5 * expected.abs().max().item()
        supernet.set_ranks(supernet.space.smallest())  # the check above is not vacuous: low ranks change the output
        assert _max_abs_diff(supernet(x), expected) > 1e-2 * expected.abs().max().item()


def test_export_keeps_batchnorm_exact_at_full_and_low_rank(tmp_path):
    dense = _dense()
    x = input_for(dense)
    with torch.no_grad():
        expected = dense(x)
    supernet = fr.build_supernet(dense, model_name=NAME, model_kwargs=KWARGS).eval()
    full = supernet.space.largest()
    for config in (full, supernet.space.smallest(), random_config(supernet.space, random.Random(5))):
        out = fr.save_subnet(supernet, config, tmp_path / str(len(list(tmp_path.iterdir()))))
        loaded = fr.load_subnet(out)
        assert isinstance(loaded.stages[0].blocks[0].mlp.ln1.bn, nn.BatchNorm1d)  # not folded away
        supernet.set_ranks(config)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), supernet(x), rtol=1e-5, atol=1e-6)
            if config == full:
                assert _max_abs_diff(loaded(x), expected) <= 1e-5 * expected.abs().max().item()


def test_prefix_then_suffix_equals_the_full_forward_at_every_block():
    supernet = fr.build_supernet(_dense(), ratios=[0.5, 1.0]).eval()
    x = input_for(supernet.model)
    supernet.set_ranks(supernet.space.smallest())
    with torch.no_grad():
        expected = supernet(x)
        for block in supernet.space.blocks:
            prefix, suffix = split_forward(supernet.model, block.name)
            hidden = prefix(x)
            assert hidden.shape[1] != x.shape[1]  # a real split: the prefix ran the stem, not an identity
            torch.testing.assert_close(suffix(hidden), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_every_pipeline_stage_runs_for_levit_on_digits(digits_config):
    """Teacher, profile, filter, supernet training, search, export and report in process (about 30 s on CPU)."""
    import pandas as pd

    from flora_ray.backends.local import LocalBackend
    from flora_ray.core.space import RankSpace
    from flora_ray.pipeline import run_pipeline
    from flora_ray.stages import STAGES
    from flora_ray.storage.run_store import ARTEFACTS

    cfg = digits_config(
        f"model.name={NAME}",
        "model.kwargs={embed_dim: [32, 48, 64], key_dim: 8, num_heads: [2, 3, 4], depth: [1, 2, 1]}",
        "model.ratios=[0.5, 1.0]",
        "data.img_size=32",  # 8x8 digits upsampled: LeViT's stem divides by 16, a 2x2 grid -> 1x1 -> 1x1
        "pretrain.epochs=1",
        "filter.epochs=1",
        "filter.eval_images=100",
        "train.epochs=1",
        "search.trials=6",
        "search.population=3",
        "search.eval_images=100",
    )
    markers = run_pipeline(cfg, LocalBackend())
    assert list(markers) == list(STAGES)
    run_dir = cfg.run.run_dir
    space = RankSpace.load(run_dir / ARTEFACTS.space)
    assert [b.name for b in space.blocks][:2] == ["stages.0.blocks.0", "stages.1.downsample"]
    filtered = pd.read_parquet(run_dir / ARTEFACTS.filter_scores)
    assert set(filtered["block"]) == {b.name for b in space.blocks}
    trials = pd.read_parquet(run_dir / ARTEFACTS.trials)
    assert len(trials) == 6 and (trials["state"] == "COMPLETE").all()
    exported = [p.parent for p in run_dir.rglob("subnet.json")]
    assert exported
    subnet = fr.load_subnet(exported[0]).eval()
    assert subnet(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    # The export carries its own recalibrated BatchNorm statistics (search.bn_recalibration_images), the ones
    # Run.subnet gives too, not the supernet's shared ones.
    figures = json.loads((exported[0] / "export.json").read_text())
    assert figures["bn_recalibration_images"] == cfg.search.bn_recalibration_images > 0
    run = fr.Run.open(run_dir)
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(subnet(x), run.subnet(figures["trial"])(x), rtol=1e-5, atol=1e-5)
        supernet = run.supernet
        supernet.set_ranks(run.ranks(figures["trial"]), within_candidates=False)
        assert (subnet(x) - supernet(x)).abs().max() > 1e-4

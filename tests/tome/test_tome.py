"""ToMe token merging: the published matching on a hand-checked example, r = 0 as the identity, exact cost parity
with FlopCounterMode at merged token counts, the same merging model in supernet, subnet and loaded export, and
clear errors for models and r it cannot serve."""

import random

import pytest
import torch
from helpers import TINY_MODELS, counted_macs, input_for, random_config

import flora_ray as fr
from flora_ray.core.cost import build_cost_model
from flora_ray.core.models import ModelSpec
from flora_ray.core.tome import (
    ToMeBlock,
    ToMeVisionTransformer,
    bipartite_soft_matching,
    max_tome_r,
    merge_wavg,
    token_merging_r,
    token_schedule,
)

VIT, VIT_KWARGS = "test_vit", {"img_size": 64}  # 4x4 patches + class token = 17 tokens, 6 blocks


def _unit(*xy):
    v = torch.tensor(xy, dtype=torch.float64)
    return v / v.norm()


def _hand_example():
    """Five tokens, t0 the class token. A = (t0, t2, t4), B = (t1, t3). Cosine similarities:
    t2.t1 = 0, t2.t3 = 0.8, t4.t1 = 0.8, t4.t3 = 0.96; t0 is protected. So r = 1 merges t4 into t3 (0.96 is the
    best edge), and r = 2 merges t2 into t3 as well (its best edge, 0.8, to t3)."""
    metric = torch.stack([_unit(1, 0), _unit(1, 0), _unit(0, 1), _unit(0.6, 0.8), _unit(0.8, 0.6)])[None]
    x = torch.tensor([[0.0], [10.0], [20.0], [30.0], [40.0]], dtype=torch.float64)[None]
    return metric, x


def test_bipartite_matching_merges_the_hand_checked_tokens():
    metric, x = _hand_example()
    merged, size = merge_wavg(bipartite_soft_matching(metric, 1, class_token=True), x, None)
    # unmerged A tokens in order (t0, t2), then B (t1, t3 + t4)
    assert merged[0, :, 0].tolist() == [0.0, 20.0, 10.0, 35.0]
    assert size[0, :, 0].tolist() == [1.0, 1.0, 1.0, 2.0]
    merged, size = merge_wavg(bipartite_soft_matching(metric, 2, class_token=True), x, None)
    assert merged[0, :, 0].tolist() == [0.0, 10.0, 30.0]  # t3 = mean(t2, t3, t4)
    assert size[0, :, 0].tolist() == [1.0, 1.0, 3.0]


def test_merging_is_size_weighted_and_protects_the_class_token():
    metric, x = _hand_example()
    sizes = torch.tensor([[1.0], [1.0], [1.0], [1.0], [3.0]], dtype=torch.float64)[None]
    merged, size = merge_wavg(bipartite_soft_matching(metric, 1, class_token=True), x, sizes)
    assert merged[0, -1, 0].item() == pytest.approx((30 + 3 * 40) / 4) and size[0, -1, 0].item() == 4
    # without protection the class token (A, best edge t0.t1 = 1.0) is the first to go, and the unmerged A tokens
    # stay in the published algorithm's order, by descending best edge (t4: 0.96, t2: 0.8), not sorted back
    merged, _ = merge_wavg(bipartite_soft_matching(metric, 1, class_token=False), x, None)
    assert merged[0, :, 0].tolist() == [40.0, 20.0, 5.0, 30.0]


def test_r_is_clipped_as_published():
    metric, x = _hand_example()
    assert bipartite_soft_matching(metric, 5, class_token=True)(x, "sum").shape[1] == 3  # (5 - 1) // 2 merged
    assert bipartite_soft_matching(metric, 0, class_token=True)(x, "sum") is x


@pytest.mark.parametrize("fused", [False, True])
def test_r_zero_is_the_identity(fused):
    torch.manual_seed(0)
    dense = fr.create_model(VIT, **VIT_KWARGS).eval()
    for block in dense.blocks:
        block.attn.fused_attn = fused
    x = input_for(dense)
    assert type(ModelSpec(VIT, VIT_KWARGS, 0).create()) is not ToMeVisionTransformer  # r = 0 builds plain timm
    with torch.no_grad():
        expected = dense(x)
        dense.__class__, dense.tome_r = ToMeVisionTransformer, 0  # ToMe's forward path, merging nothing
        for block in dense.blocks:
            block.__class__, block.tome_r = ToMeBlock, 0
        assert torch.allclose(dense(x), expected, atol=1e-6, rtol=0)


def test_merged_token_counts_per_block():
    model = ModelSpec(VIT, VIT_KWARGS, 2).create().eval()
    seen = {}

    def record(key):
        def hook(module, args):
            seen[key] = args[0].shape[1]

        return hook

    for i, block in enumerate(model.blocks):
        block.attn.qkv.register_forward_pre_hook(record(("attn", i)))
        block.mlp.fc1.register_forward_pre_hook(record(("mlp", i)))
    with torch.no_grad():
        model(input_for(model))
    assert [seen["attn", i] for i in range(6)] == [17, 15, 13, 11, 9, 7] == token_schedule(17, 6, 2, 1)
    assert [seen["mlp", i] for i in range(6)] == [15, 13, 11, 9, 7, 5]


PARITY_MODELS = [
    (VIT, VIT_KWARGS, [1, 2]),
    (VIT, {**VIT_KWARGS, "class_token": False, "global_pool": "avg"}, [2]),  # no protected token, mean pooling
    ("deit_tiny_patch16_224", {}, [8, 13]),  # 197 tokens, 12 blocks: the ToMe paper's setting (r = 13 for ViT-S)
]


@pytest.mark.parametrize(("name", "kwargs", "rs"), PARITY_MODELS, ids=["test_vit", "test_vit_avg", "deit_tiny"])
def test_cost_model_equals_flop_counter_with_token_merging(name, kwargs, rs):
    for r in rs:
        dense = ModelSpec(name, kwargs, r).create().eval()
        x = input_for(dense, batch=1)
        cost = build_cost_model(dense)
        assert cost.dense_macs == counted_macs(dense, x) < build_cost_model(fr.create_model(name, **kwargs)).dense_macs
        supernet = fr.build_supernet(dense, model_name=name, model_kwargs=kwargs)
        assert supernet.spec.tome_r == r
        rng = random.Random(r)
        for config in [supernet.space.smallest(), random_config(supernet.space, rng)]:
            subnet = fr.extract_subnet(supernet, config)
            assert token_merging_r(subnet) == r
            assert supernet.cost.macs(config) == counted_macs(subnet, x)


def test_supernet_subnet_and_loaded_export_merge_alike(tmp_path):
    supernet = fr.build_supernet(VIT, model_kwargs=VIT_KWARGS, tome_r=2).eval()
    config = random_config(supernet.space, random.Random(1))
    supernet.set_ranks(config)
    x = input_for(supernet.model)
    fr.save_supernet(supernet, tmp_path / "supernet.safetensors")
    fr.save_subnet(supernet, config, tmp_path / "export")
    loaded = fr.load_subnet(tmp_path / "export")
    reloaded = fr.load_supernet(tmp_path / "supernet.safetensors")
    reloaded.set_ranks(config)
    assert token_merging_r(loaded) == token_merging_r(reloaded.model) == 2
    with torch.no_grad():
        expected = supernet(x)
        assert torch.allclose(loaded(x), expected, atol=1e-4)
        assert torch.equal(reloaded.eval()(x), expected)


def test_errors_name_the_model_and_the_largest_r():
    with pytest.raises(ValueError, match=r"model.tome_r=3 is too large: block 4 of 6 sees 5 tokens .* largest r .* 2"):
        ModelSpec(VIT, VIT_KWARGS, 3).create(device="meta")
    assert max_tome_r(17, 6, 1) == 2
    swin, swin_kwargs = TINY_MODELS["swin"]
    with pytest.raises(ValueError, match="supports timm VisionTransformer models .* not SwinTransformer"):
        ModelSpec(swin, swin_kwargs, 1).create(device="meta")
    name, kwargs = TINY_MODELS["deit_distilled"]
    with pytest.raises(ValueError, match="not VisionTransformerDistilled"):
        ModelSpec(name, kwargs, 1).create(device="meta")
    with pytest.raises(ValueError, match="at most a class token .* 3 prefix tokens"):
        ModelSpec(VIT, {**VIT_KWARGS, "reg_tokens": 2}, 1).create(device="meta")
    with pytest.raises(ValueError, match="model.tome_r=-1"):
        ModelSpec(VIT, VIT_KWARGS, -1)


def test_spec_records_tome_r_only_when_merging():
    assert "tome_r" not in ModelSpec(VIT, VIT_KWARGS).to_dict()  # artefacts made before token merging still match
    spec = ModelSpec(VIT, VIT_KWARGS, 2)
    assert ModelSpec.from_dict(spec.to_dict()) == spec

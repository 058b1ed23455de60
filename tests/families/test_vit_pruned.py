"""A timm ViT with whole heads and MLP units removed structurally (as Torch-Pruning does): set_attention_heads makes
it run, and the analytic cost model counts what it executes (FlopCounterMode), at non-uniform widths per block."""

import pytest
import torch
from helpers import TINY_MODELS, counted_macs, input_for
from torch import nn

import flora_ray as fr
from flora_ray.core.cost import build_cost_model
from flora_ray.core.families.vit import set_attention_heads

NAME, KWARGS = TINY_MODELS["vit"]


def _sliced(layer: nn.Linear, rows=None, cols=None) -> nn.Linear:
    weight = layer.weight.detach()
    weight = weight[rows] if rows is not None else weight
    weight = weight[:, cols] if cols is not None else weight
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=layer.bias is not None)
    out.weight.data.copy_(weight)
    if layer.bias is not None:
        out.bias.data.copy_(layer.bias.detach()[rows] if rows is not None else layer.bias.detach())
    return out


def _prune(model, keep_heads: list[list[int]], mlp_width: list[int]):
    """Keep the listed heads of each block's attention and the first units of each MLP."""
    for block, heads, width in zip(model.blocks, keep_heads, mlp_width, strict=True):
        attn, dim = block.attn, block.attn.head_dim
        cols = torch.cat([torch.arange(h * dim, (h + 1) * dim) for h in heads])
        rows = torch.cat([cols + part * attn.num_heads * dim for part in range(3)])  # q, k and v of those heads
        attn.qkv, attn.proj = _sliced(attn.qkv, rows=rows), _sliced(attn.proj, cols=cols)
        units = torch.arange(width)
        block.mlp.fc1, block.mlp.fc2 = _sliced(block.mlp.fc1, rows=units), _sliced(block.mlp.fc2, cols=units)
    set_attention_heads(model, {f"blocks.{i}.attn": len(h) for i, h in enumerate(keep_heads)})
    return model.eval()


def test_pruned_vit_runs_and_costs_what_it_counts():
    dense = fr.create_model(NAME, **KWARGS).eval()
    x = input_for(dense, batch=1)
    heads = dense.blocks[0].attn.num_heads
    keep = [[i % heads] if i % 3 else list(range(heads)) for i in range(len(dense.blocks))]  # 1 or all heads
    widths = [7 + 5 * i for i in range(len(dense.blocks))]
    pruned = _prune(fr.create_model(NAME, **KWARGS), keep, widths)
    assert pruned(x).shape == dense(x).shape
    cost = build_cost_model(pruned)
    assert cost.dense_macs == counted_macs(pruned, x) < build_cost_model(dense).dense_macs
    assert [b.attn.num_heads for b in pruned.blocks] == [len(h) for h in keep]


def test_pruned_heads_compute_what_the_dense_heads_did():
    # Keeping every head reproduces the dense model; the reshape follows attn_dim, not the residual width.
    dense = fr.create_model(NAME, **KWARGS).eval()
    heads = dense.blocks[0].attn.num_heads
    full = _prune(fr.create_model(NAME, **KWARGS), [list(range(heads))] * len(dense.blocks),
                  [b.mlp.fc1.out_features for b in dense.blocks])  # fmt: skip
    full.load_state_dict(dense.state_dict())
    x = input_for(dense)
    torch.testing.assert_close(full(x), dense(x))


def test_bad_head_counts_are_refused():
    model = fr.create_model(NAME, **KWARGS)
    with pytest.raises(ValueError, match="not an attention module"):
        set_attention_heads(model, {"blocks.0.mlp": 1})
    with pytest.raises(ValueError, match="not 3 x a multiple"):
        set_attention_heads(model, {"blocks.0.attn": 5})

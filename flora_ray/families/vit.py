"""The timm ``VisionTransformer`` family: ViT, DeiT and distilled DeiT.

Blocks are ``blocks.i``; every Linear layer of a block sees the whole sequence (patches plus prefix tokens), the
head (and the distillation head) one token under pooling, the whole sequence without.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from flora_ray.families import ModelFamily, Split, TokenGeometry, conv_macs, linear_fqns, register_family

BLOCKS = r"blocks\.\d+"  # the FQN of one transformer block


def is_vit(model: nn.Module) -> bool:
    """Whether ``model`` belongs to this family."""
    return isinstance(model, VisionTransformer)


def _head_tokens(model: nn.Module, seq_len: int) -> int:
    return 1 if getattr(model, "global_pool", "") else seq_len


def vit_token_geometry(model: nn.Module) -> TokenGeometry:
    """Tokens per Linear FQN and MACs outside Linear layers of a timm ViT at its configured ``img_size``."""
    if getattr(model, "attn_pool", None) is not None:
        raise ValueError("no analytic cost model for ViTs with attention pooling (global_pool='map')")
    grid_h, grid_w = model.patch_embed.grid_size
    seq_len = grid_h * grid_w + model.num_prefix_tokens
    other = conv_macs(model.patch_embed.proj, grid_h, grid_w)
    tokens: dict[str, int] = {}
    for i, block in enumerate(model.blocks):
        for fqn in linear_fqns(block):
            tokens[f"blocks.{i}.{fqn}"] = seq_len
        attn_dim = block.attn.qkv.out_features // 3
        other += 2 * seq_len * seq_len * attn_dim  # q k^T and attn v over all heads
    head_tokens = _head_tokens(model, seq_len)
    for name in ("head", "head_dist"):
        if isinstance(getattr(model, name, None), nn.Linear):
            tokens[name] = head_tokens
    return tokens, other


def vit_split_forward(model: nn.Module, block_name: str) -> Split | None:
    """``(prefix, suffix)`` around block ``blocks.i``; ``None`` for any other name."""
    parts = block_name.split(".")
    if len(parts) != 2 or parts[0] != "blocks":
        return None
    i = int(parts[1])

    def prefix(x: torch.Tensor) -> torch.Tensor:
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        for block in model.blocks[:i]:
            x = block(x)
        return x

    def suffix(x: torch.Tensor) -> torch.Tensor:
        for block in model.blocks[i:]:
            x = block(x)
        return model.forward_head(model.norm(x))

    return prefix, suffix


VIT = register_family(
    ModelFamily(
        "vit", is_vit, BLOCKS, vit_token_geometry, vit_split_forward, description="timm VisionTransformer: ViT, DeiT"
    )
)

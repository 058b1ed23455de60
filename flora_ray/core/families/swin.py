"""The timm ``SwinTransformer`` family.

Blocks are ``layers.s.blocks.j``. Attention layers see the window-padded token grid (timm pads the feature map to
a multiple of the window), the MLP the unpadded one; each patch-merging ``downsample.reduction`` runs on the
halved grid of its stage, and the head on one token under pooling.
"""

from __future__ import annotations

import math

import torch
from timm.models.swin_transformer import SwinTransformer
from torch import nn

from flora_ray.core.families.base import ModelFamily, Split, TokenGeometry, conv_macs, linear_fqns, register_family

BLOCKS = r"layers\.\d+\.blocks\.\d+"  # the FQN of one transformer block


def is_swin(model: nn.Module) -> bool:
    """Whether ``model`` belongs to this family."""
    return isinstance(model, SwinTransformer)


def swin_token_geometry(model: nn.Module) -> TokenGeometry:
    """Tokens per Linear FQN and MACs outside Linear layers of a timm Swin at its configured ``img_size``."""
    grid_h, grid_w = model.patch_embed.grid_size
    other = conv_macs(model.patch_embed.proj, grid_h, grid_w)
    tokens: dict[str, int] = {}
    height, width = grid_h, grid_w
    for s, stage in enumerate(model.layers):
        if isinstance(stage.downsample, nn.Module) and hasattr(stage.downsample, "reduction"):
            height, width = math.ceil(height / 2), math.ceil(width / 2)
            tokens[f"layers.{s}.downsample.reduction"] = height * width
        for b, block in enumerate(stage.blocks):
            win_h, win_w = block.window_size
            padded = math.ceil(height / win_h) * win_h * math.ceil(width / win_w) * win_w
            for fqn in linear_fqns(block):
                tokens[f"layers.{s}.blocks.{b}.{fqn}"] = padded if fqn.startswith("attn.") else height * width
            attn_dim = block.attn.qkv.out_features // 3
            other += 2 * padded * (win_h * win_w) * attn_dim  # per window: 2 N^2 d; padded / N windows
    if isinstance(getattr(model.head, "fc", None), nn.Linear):
        tokens["head.fc"] = 1 if model.head.global_pool.pool_type else height * width
    return tokens, other


def swin_split_forward(model: nn.Module, block_name: str) -> Split | None:
    """``(prefix, suffix)`` around block ``layers.s.blocks.j``; ``None`` for any other name."""
    parts = block_name.split(".")
    if len(parts) != 4 or parts[0] != "layers":
        return None
    s, j = int(parts[1]), int(parts[3])

    def prefix(x: torch.Tensor) -> torch.Tensor:
        x = model.patch_embed(x)
        for stage in model.layers[:s]:
            x = stage(x)
        x = model.layers[s].downsample(x)
        for block in model.layers[s].blocks[:j]:
            x = block(x)
        return x

    def suffix(x: torch.Tensor) -> torch.Tensor:
        for block in model.layers[s].blocks[j:]:
            x = block(x)
        for stage in model.layers[s + 1 :]:
            x = stage(x)
        return model.forward_head(model.norm(x))

    return prefix, suffix


SWIN = register_family(
    ModelFamily("swin", is_swin, BLOCKS, swin_token_geometry, swin_split_forward, description="timm SwinTransformer")
)

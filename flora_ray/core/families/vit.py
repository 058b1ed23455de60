"""The timm ``VisionTransformer`` family: ViT, DeiT and distilled DeiT.

Blocks are ``blocks.i``; every Linear layer of a block sees the whole sequence (patches plus prefix tokens), the
head (and the distillation head) one token under pooling, the whole sequence without. With ToMe token merging
(``core.tome``, ``r`` tokens per block) block ``i`` sees ``t_i`` tokens in its attention (``qkv``, ``proj``) and
``t_i - r`` in its MLP, ``t_{i+1} = t_i - r``, and the matching adds one ``ceil(t_i/2) x floor(t_i/2)`` similarity
product over the head dimension per block.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from flora_ray.core.families.base import ModelFamily, Split, TokenGeometry, conv_macs, linear_fqns, register_family
from flora_ray.core.tome import token_merging_r, token_schedule
from flora_ray.errors import InputError

BLOCKS = r"blocks\.\d+"  # the FQN of one transformer block


def is_vit(model: nn.Module) -> bool:
    """Whether ``model`` belongs to this family."""
    return isinstance(model, VisionTransformer)


def _head_tokens(model: nn.Module, seq_len: int) -> int:
    return 1 if getattr(model, "global_pool", "") else seq_len


def vit_token_geometry(model: nn.Module) -> TokenGeometry:
    """Tokens per Linear FQN and MACs outside Linear layers of a timm ViT at its configured ``img_size``."""
    if getattr(model, "attn_pool", None) is not None:
        raise InputError("no analytic cost model for ViTs with attention pooling (global_pool='map')")
    grid_h, grid_w = model.patch_embed.grid_size
    r, prefix = token_merging_r(model), model.num_prefix_tokens
    schedule = token_schedule(grid_h * grid_w + prefix, len(model.blocks) + 1, r, prefix)
    other = conv_macs(model.patch_embed.proj, grid_h, grid_w)
    tokens: dict[str, int] = {}
    for i, block in enumerate(model.blocks):
        seq_len, merged = schedule[i], schedule[i + 1]
        for fqn in linear_fqns(block):
            tokens[f"blocks.{i}.{fqn}"] = seq_len if fqn.startswith("attn.") else merged
        attn_dim = block.attn.qkv.out_features // 3
        other += 2 * seq_len * seq_len * attn_dim  # q k^T and attn v over all heads
        if seq_len != merged:  # ToMe's bipartite matching: A tokens x B tokens x head_dim
            other += ((seq_len + 1) // 2) * (seq_len // 2) * block.attn.head_dim
    head_tokens = _head_tokens(model, schedule[-1])
    for name in ("head", "head_dist"):
        if isinstance(getattr(model, name, None), nn.Linear):
            tokens[name] = head_tokens
    return tokens, other


def set_attention_heads(model: nn.Module, heads: Mapping[str, int]) -> None:
    """Make each timm ``Attention`` of a ViT whose heads were removed structurally (by a pruning tool that cut
    ``qkv``'s output rows and ``proj``'s input columns head by head) run with its remaining heads: ``num_heads``,
    ``head_dim`` and ``attn_dim`` (timm's reshape after attention) are set from ``heads``, by the attention's FQN
    (``blocks.0.attn``), and the layers' shapes. The cost model reads the shapes, so it needs nothing else.

    Raises:
        ValueError: An FQN that is not an attention module, or a head count that does not divide its layers.
    """
    modules = dict(model.named_modules())
    for fqn, count in heads.items():
        attn = modules.get(fqn)
        if attn is None or not hasattr(attn, "qkv") or not hasattr(attn, "num_heads"):
            raise ValueError(f"heads: {fqn!r} is not an attention module of the model")
        out = attn.qkv.out_features
        if count < 1 or out % (3 * count):
            raise ValueError(f"heads[{fqn!r}]={count}: qkv has {out} outputs, not 3 x a multiple of {count}")
        attn.num_heads, attn.head_dim = count, out // (3 * count)
        attn.attn_dim = count * attn.head_dim
        if attn.proj.in_features != attn.attn_dim:
            raise ValueError(
                f"heads[{fqn!r}]: proj takes {attn.proj.in_features} inputs, attention gives {attn.attn_dim}"
            )


def vit_split_forward(model: nn.Module, block_name: str) -> Split | None:
    """``(prefix, suffix)`` around block ``blocks.i``; ``None`` for any other name, and with token merging (the
    token sizes would have to cross the split)."""
    parts = block_name.split(".")
    if len(parts) != 2 or parts[0] != "blocks" or token_merging_r(model):
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

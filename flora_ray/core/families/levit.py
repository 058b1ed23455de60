"""The timm ``Levit`` family (LeViT in its Linear form): a compact conv/transformer hybrid.

LeViT (Graham et al., ICCV 2021) runs a stem of four stride-2 convolutions (16x downsampling), then stages of
residual blocks ``stages.s.blocks.j`` (attention ``attn.qkv`` and ``attn.proj.ln``, MLP ``mlp.ln1`` and
``mlp.ln2``) and, from the second stage on, a shrinking block ``stages.s.downsample`` (attention
``attn_downsample.kv``, ``attn_downsample.q.ln`` on the subsampled grid, ``attn_downsample.proj.ln``, then
``mlp.ln1`` and ``mlp.ln2``). Each of these is a timm ``LinearNorm``: a bias-free ``nn.Linear`` (child ``linear``)
followed by a ``BatchNorm1d`` (child ``bn``). About three quarters of LeViT's MACs run in these Linear layers
(76% for ``levit_128s`` at 224 px), the rest in the stem and the attention products.

What is factorised: the ``linear`` child, so the BatchNorm stays a module of its own after the low-rank layer, in
the supernet and in the export; nothing is folded into the factors. In eval mode the BatchNorm is a fixed affine
map of the Linear's output, so a full-rank supernet computes the dense model's function and an exported subnet the
supernet's at every rank. A block's rank tuple is the FLORA triple ``(qkv, fc1, fc2)`` transposed to LeViT:
``(attn.qkv, mlp.ln1, mlp.ln2)`` in residual blocks and ``(attn_downsample.kv, mlp.ln1, mlp.ln2)`` in downsampling
blocks; the attention output projections join with ``include_proj``, the tiny ``q`` projection and the classifier
heads stay dense.

Tokens: every Linear of a residual block sees its stage's ``h * w`` grid; in a downsampling block ``kv`` sees the
incoming grid and every other Linear the subsampled one; the heads one token (average pooling). The convolutional
LeViT variants (``levit_conv_*``, 1x1 convolutions instead of Linear layers) are not part of this family.
"""

from __future__ import annotations

import math

import torch
from timm.models.levit import Levit, LevitDownsample
from torch import nn

from flora_ray.core.families.base import ModelFamily, Split, TokenGeometry, conv_macs, linear_fqns, register_family

BLOCKS = r"stages\.\d+\.(?:blocks\.\d+|downsample)"  # the FQN of one residual or downsampling block
LAYERS = ("attn.qkv.linear", "attn_downsample.kv.linear", "mlp.ln1.linear", "mlp.ln2.linear")
PROJ_LAYERS = ("attn.proj.ln.linear", "attn_downsample.proj.ln.linear")


def is_levit(model: nn.Module) -> bool:
    """Whether ``model`` belongs to this family (a timm ``Levit`` or ``LevitDistilled`` built with Linear layers)."""
    return isinstance(model, Levit) and not model.use_conv


def levit_img_size(model: nn.Module) -> tuple[int, int]:
    """``(height, width)`` the model is built for: its first attention's grid times the stem's stride.

    timm's ``Levit`` keeps no ``img_size``; its attention biases fix the grid, so this is the input size it runs.
    """
    first = next((m for m in model.stages.modules() if hasattr(m, "attention_biases")), None)
    if first is None:
        raise ValueError("a LeViT without attention blocks has no input size; give it at least one block")
    height, width = first.resolution
    return int(height) * model.stem.stride, int(width) * model.stem.stride


def _conv_out(conv: nn.Conv2d, height: int, width: int) -> tuple[int, int]:
    sizes = []
    for size, kernel, stride, pad, dilation in zip(
        (height, width), conv.kernel_size, conv.stride, conv.padding, conv.dilation, strict=True
    ):
        sizes.append((size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1)
    return sizes[0], sizes[1]


def _stem_geometry(model: nn.Module) -> tuple[int, int, int]:
    """MACs of the stem's convolutions and the ``(height, width)`` of the grid it hands to the first stage."""
    height, width = levit_img_size(model)
    macs = 0
    for conv in (m for m in model.stem.modules() if isinstance(m, nn.Conv2d)):
        height, width = _conv_out(conv, height, width)
        macs += conv_macs(conv, height, width)
    return macs, height, width


def _downsample_geometry(block: LevitDownsample, name: str, tokens: dict[str, int]) -> tuple[int, int]:
    """Place a downsampling block's Linear layers in ``tokens``; returns ``(attention MACs, output tokens)``."""
    attn = block.attn_downsample
    height, width = attn.resolution
    keys = height * width
    queries = math.ceil(height / attn.stride) * math.ceil(width / attn.stride)
    for fqn in linear_fqns(block):
        tokens[f"{name}.{fqn}"] = keys if fqn.startswith("attn_downsample.kv.") else queries
    return queries * keys * attn.num_heads * (attn.key_dim + attn.val_dim), queries


def levit_token_geometry(model: nn.Module) -> TokenGeometry:
    """Tokens per Linear FQN and MACs outside Linear layers of a timm LeViT at its configured input size."""
    other, height, width = _stem_geometry(model)
    seq_len = height * width
    tokens: dict[str, int] = {}
    for s, stage in enumerate(model.stages):
        if isinstance(stage.downsample, LevitDownsample):
            macs, seq_len = _downsample_geometry(stage.downsample, f"stages.{s}.downsample", tokens)
            other += macs
        for j, block in enumerate(stage.blocks):
            attn = block.attn
            seq_len = attn.resolution[0] * attn.resolution[1]
            for fqn in linear_fqns(block):
                tokens[f"stages.{s}.blocks.{j}.{fqn}"] = seq_len
            other += seq_len * seq_len * attn.num_heads * (attn.key_dim + attn.val_dim)  # q k^T and attn v
    for name in ("head", "head_dist"):
        for fqn in linear_fqns(getattr(model, name, nn.Identity())):
            tokens[f"{name}.{fqn}"] = 1 if model.global_pool else seq_len
    return tokens, other


def _block_position(block_name: str) -> tuple[int, int | None] | None:
    """``(stage, block index)`` of ``stages.s.blocks.j``, ``(stage, None)`` of ``stages.s.downsample``."""
    parts = block_name.split(".")
    if len(parts) == 4 and parts[0] == "stages" and parts[2] == "blocks":
        return int(parts[1]), int(parts[3])
    if len(parts) == 3 and parts[0] == "stages" and parts[2] == "downsample":
        return int(parts[1]), None
    return None


def levit_split_forward(model: nn.Module, block_name: str) -> Split | None:
    """``(prefix, suffix)`` around ``stages.s.blocks.j`` or ``stages.s.downsample``; ``None`` for other names."""
    position = _block_position(block_name)
    if position is None:
        return None
    s, j = position

    def prefix(x: torch.Tensor) -> torch.Tensor:
        x = model.stem(x).flatten(2).transpose(1, 2)
        for stage in model.stages[:s]:
            x = stage(x)
        if j is not None:
            x = model.stages[s].downsample(x)
            for block in model.stages[s].blocks[:j]:
                x = block(x)
        return x

    def suffix(x: torch.Tensor) -> torch.Tensor:
        if j is None:
            x = model.stages[s](x)
        else:
            for block in model.stages[s].blocks[j:]:
                x = block(x)
        for stage in model.stages[s + 1 :]:
            x = stage(x)
        return model.forward_head(x)

    return prefix, suffix


LEVIT = register_family(
    ModelFamily(
        "levit",
        is_levit,
        BLOCKS,
        levit_token_geometry,
        levit_split_forward,
        layers=LAYERS,
        proj_layers=PROJ_LAYERS,
        img_size=levit_img_size,
        description="timm Levit: LeViT (Linear form)",
    )
)

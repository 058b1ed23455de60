"""Exact analytic cost model: MACs and parameters of any rank configuration, without running the model.

Unit: ``macs`` are multiply-accumulates per image (one image at the model's input size) of every matrix
product the model executes: Linear layers, the patch-embedding convolution and the attention products
``q k^T`` and ``attn v``. This is what ViT papers call "FLOPs" and what ``torch.utils.flop_counter`` reports
divided by two. Element-wise work (norms, softmax, GELU, residual adds) is not counted; it is well under 1% of
the total for the supported models.

A factorised layer of rank ``r`` is charged exactly what the exported subnet runs (``lowrank.to_static``): two
matmuls, ``r (d_in + d_out)`` MACs per token, below the break-even rank, and the merged dense layer,
``d_in d_out`` per token, at or above it.

The geometry (how many tokens each Linear sees) is read off the model's modules, which may be on the ``meta``
device, at the model's configured ``img_size`` (also for models built with ``dynamic_img_size=True``); supported: timm ``VisionTransformer`` (ViT, DeiT, distilled DeiT) and ``SwinTransformer``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from flora_ray.core.lowrank import ElasticLowRankLinear, low_rank_is_cheaper


@dataclass(frozen=True)
class LinearSite:
    """One Linear layer of the model and how many token rows it processes per image."""

    fqn: str
    in_features: int
    out_features: int
    bias: bool
    tokens: int

    def macs(self, rank: int | None = None) -> int:
        """MACs per image at ``rank`` (``None``: the dense layer)."""
        return self.tokens * self.weights(rank)

    def weights(self, rank: int | None = None) -> int:
        """Weight-matrix entries at ``rank`` (without bias): what the executed form stores."""
        dense = self.in_features * self.out_features
        if rank is None or not low_rank_is_cheaper(self.in_features, self.out_features, rank):
            return dense
        return rank * (self.in_features + self.out_features)

    def params(self, rank: int | None = None) -> int:
        return self.weights(rank) + (self.out_features if self.bias else 0)


@dataclass(frozen=True)
class CostModel:
    """MACs and parameters of a model as a function of the ranks of its factorised layers.

    Attributes:
        sites: Every Linear layer of the model, by FQN.
        other_macs: MACs outside Linear layers (patch-embedding convolution, attention products).
        other_params: Parameters outside Linear layers (embeddings, norms, tokens, bias tables, convolution).
    """

    sites: Mapping[str, LinearSite]
    other_macs: int
    other_params: int

    def _site(self, fqn: str) -> LinearSite:
        try:
            return self.sites[fqn]
        except KeyError:
            raise ValueError(f"cost model has no layer {fqn!r}") from None

    def _check_ranks(self, ranks: Mapping[str, int]) -> None:
        for fqn, rank in ranks.items():
            site = self._site(fqn)
            max_rank = min(site.in_features, site.out_features)
            if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= max_rank:
                raise ValueError(f"rank {rank!r} for layer {fqn!r} is out of range 1..{max_rank}")

    def layer_macs(self, fqn: str, rank: int | None = None) -> int:
        return self._site(fqn).macs(rank)

    def macs(self, ranks: Mapping[str, int] | None = None) -> int:
        """MACs per image; layers absent from ``ranks`` are dense."""
        ranks = ranks or {}
        self._check_ranks(ranks)
        return self.other_macs + sum(site.macs(ranks.get(fqn)) for fqn, site in self.sites.items())

    def params(self, ranks: Mapping[str, int] | None = None) -> int:
        """Parameter count of the exported subnet; layers absent from ``ranks`` are dense."""
        ranks = ranks or {}
        self._check_ranks(ranks)
        return self.other_params + sum(site.params(ranks.get(fqn)) for fqn, site in self.sites.items())

    @property
    def dense_macs(self) -> int:
        return self.macs({})

    @property
    def dense_params(self) -> int:
        return self.params({})


def build_cost_model(model: nn.Module) -> CostModel:
    """The cost model of a timm ViT/DeiT/Swin (dense or supernet, any device including ``meta``)."""
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, SwinTransformer):
        tokens, other_macs = _swin_geometry(model)
    elif isinstance(model, VisionTransformer):
        tokens, other_macs = _vit_geometry(model)
    else:
        raise ValueError(
            f"no analytic cost model for {type(model).__name__}: supported are timm VisionTransformer "
            "(ViT, DeiT) and SwinTransformer"
        )
    sites = {}
    linear_param_ids = set()
    for fqn, module in model.named_modules():
        if not isinstance(module, nn.Linear | ElasticLowRankLinear):
            continue
        if fqn not in tokens:
            raise ValueError(f"cost model cannot place Linear layer {fqn!r} of {type(model).__name__}")
        sites[fqn] = LinearSite(fqn, module.in_features, module.out_features, module.bias is not None, tokens[fqn])
        linear_param_ids.update(id(p) for p in module.parameters())
    other_params = sum(p.numel() for p in model.parameters() if id(p) not in linear_param_ids)
    return CostModel(sites, other_macs, other_params)


def _conv_macs(conv: nn.Conv2d, out_h: int, out_w: int) -> int:
    kh, kw = conv.kernel_size
    return out_h * out_w * conv.out_channels * (conv.in_channels // conv.groups) * kh * kw


def _head_tokens(model: nn.Module, seq_len: int) -> int:
    return 1 if getattr(model, "global_pool", "") else seq_len


def _vit_geometry(model: nn.Module) -> tuple[dict[str, int], int]:
    if getattr(model, "attn_pool", None) is not None:
        raise ValueError("no analytic cost model for ViTs with attention pooling (global_pool='map')")
    grid_h, grid_w = model.patch_embed.grid_size
    seq_len = grid_h * grid_w + model.num_prefix_tokens
    other = _conv_macs(model.patch_embed.proj, grid_h, grid_w)
    tokens: dict[str, int] = {}
    for i, block in enumerate(model.blocks):
        for fqn, module in block.named_modules():
            if isinstance(module, nn.Linear | ElasticLowRankLinear):
                tokens[f"blocks.{i}.{fqn}"] = seq_len
        attn_dim = block.attn.qkv.out_features // 3
        other += 2 * seq_len * seq_len * attn_dim  # q k^T and attn v over all heads
    head_tokens = _head_tokens(model, seq_len)
    for name in ("head", "head_dist"):
        if isinstance(getattr(model, name, None), nn.Linear):
            tokens[name] = head_tokens
    return tokens, other


def _swin_geometry(model: nn.Module) -> tuple[dict[str, int], int]:
    grid_h, grid_w = model.patch_embed.grid_size
    other = _conv_macs(model.patch_embed.proj, grid_h, grid_w)
    tokens: dict[str, int] = {}
    height, width = grid_h, grid_w
    for s, stage in enumerate(model.layers):
        if isinstance(stage.downsample, nn.Module) and hasattr(stage.downsample, "reduction"):
            height, width = math.ceil(height / 2), math.ceil(width / 2)
            tokens[f"layers.{s}.downsample.reduction"] = height * width
        for b, block in enumerate(stage.blocks):
            win_h, win_w = block.window_size
            padded = math.ceil(height / win_h) * win_h * math.ceil(width / win_w) * win_w
            prefix = f"layers.{s}.blocks.{b}"
            for fqn, module in block.named_modules():
                if isinstance(module, nn.Linear | ElasticLowRankLinear):
                    tokens[f"{prefix}.{fqn}"] = padded if fqn.startswith("attn.") else height * width
            attn_dim = block.attn.qkv.out_features // 3
            other += 2 * padded * (win_h * win_w) * attn_dim  # per window: 2 N^2 d; padded / N windows
    if isinstance(getattr(model.head, "fc", None), nn.Linear):
        tokens["head.fc"] = 1 if model.head.global_pool.pool_type else height * width
    return tokens, other

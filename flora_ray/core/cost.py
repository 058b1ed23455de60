"""Exact analytic cost model: MACs and parameters of any rank configuration, without running the model.

Unit: ``macs`` are multiply-accumulates per image (one image at the model's input size) of every matrix
product the model executes: Linear layers, the patch-embedding convolution and the attention products
``q k^T`` and ``attn v``. This is what ViT papers call "FLOPs" and what ``torch.utils.flop_counter`` reports
divided by two. Element-wise work (norms, softmax, GELU, residual adds) is not counted; it is well under 1% of
the total for the built-in families.

A factorised layer of rank ``r`` is charged exactly what the exported subnet runs (``lowrank.to_static``): two
matmuls, ``r (d_in + d_out)`` MACs per token, below the break-even rank, and the merged dense layer,
``d_in d_out`` per token, at or above it.

The geometry (how many tokens each Linear sees, and the MACs outside Linear layers) comes from the model's
family (``families.family_of(model).token_geometry``), read off the model's modules, which may be on the ``meta``
device, at the model's configured ``img_size`` (also for models built with ``dynamic_img_size=True``). Built-in
families: timm ``VisionTransformer`` (ViT, DeiT, distilled DeiT) and ``SwinTransformer``; others register with
``families.register_family``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from flora_ray.core.families import describe_families, family_of, is_linear
from flora_ray.core.lowrank import low_rank_is_cheaper
from flora_ray.errors import InputError


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
    """The cost model of a model of a registered family (dense or supernet, any device including ``meta``).

    Raises:
        ValueError: No registered family matches the model, or its geometry misses a Linear layer.
    """
    family = family_of(model)
    if family is None:
        raise InputError(
            f"no analytic cost model for {type(model).__name__}: no registered model family matches it "
            f"(registered: {describe_families()})"
        )
    tokens, other_macs = family.token_geometry(model)
    sites = {}
    linear_param_ids = set()
    for fqn, module in model.named_modules():
        if not is_linear(module):
            continue
        if fqn not in tokens:
            raise ValueError(f"cost model cannot place Linear layer {fqn!r} of {type(model).__name__}")
        sites[fqn] = LinearSite(fqn, module.in_features, module.out_features, module.bias is not None, tokens[fqn])
        linear_param_ids.update(id(p) for p in module.parameters())
    other_params = sum(p.numel() for p in model.parameters() if id(p) not in linear_param_ids)
    return CostModel(sites, other_macs, other_params)

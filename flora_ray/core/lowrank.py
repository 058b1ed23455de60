"""Elastic low-rank Linear layer (the supernet's building block) and its static export twins.

An ``nn.Linear`` with weight ``W (d_out x d_in)`` is factorised by SVD, ``W = P S Q^T``, and kept at full rank
``k = min(d_in, d_out)``. The layer computes ``y = U (V^T x) + b`` with ``V^T`` (k x d_in, no bias) and ``U``
(d_out x k, the original bias). Rank ``r`` uses the leading r components: rows ``[:r]`` of ``V^T`` and columns
``[:, :r]`` of ``U``, as views that share storage with every other rank.

Placement of the singular values (docs/design.md, section 2):
    ``"faithful"``: all of S goes into one factor, ``V^T = S Q^T`` when ``d_out >= d_in`` (qkv, fc1) and
    ``U = P S`` otherwise (fc2). This is the reference implementation's choice and the default.
    ``"sqrt"``: ``U = P sqrt(S)``, ``V^T = sqrt(S) Q^T``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SV_PLACEMENTS = ("faithful", "sqrt")


def low_rank_is_cheaper(in_features: int, out_features: int, rank: int) -> bool:
    """Whether the two-matmul form at ``rank`` costs fewer MACs per token than the dense layer.

    This single rule decides both what the cost model charges and what the exported model runs, so that the
    two can never disagree. At a tie the dense layer wins (one kernel instead of two).
    """
    return rank * (in_features + out_features) < in_features * out_features


def factorize(weight: torch.Tensor, sv_placement: str = "faithful") -> tuple[torch.Tensor, torch.Tensor]:
    """Full-rank SVD factors ``(u, vt)`` of a ``(d_out, d_in)`` weight with ``u @ vt == weight``.

    The SVD runs in float64 for accuracy; the factors come back in the weight's dtype.
    """
    if sv_placement not in SV_PLACEMENTS:
        raise ValueError(f"sv_placement={sv_placement!r} is not supported; use one of {SV_PLACEMENTS}")
    out_features, in_features = weight.shape
    p, s, qh = torch.linalg.svd(weight.detach().to(torch.float64), full_matrices=False)
    if sv_placement == "sqrt":
        root = s.sqrt()
        u, vt = p * root, root[:, None] * qh
    elif out_features >= in_features:
        u, vt = p, s[:, None] * qh
    else:
        u, vt = p * s, qh
    return u.to(weight.dtype).contiguous(), vt.to(weight.dtype).contiguous()


class ElasticLowRankLinear(nn.Module):
    """A Linear layer stored as full-rank factors whose active rank can change between forward passes.

    Args:
        in_features: Input width ``d_in``.
        out_features: Output width ``d_out``.
        bias: Whether the layer has a bias (carried by ``U``).
        merge_above_break_even: When the active rank is at or above the break-even rank
            (see ``low_rank_is_cheaper``), run ``F.linear(x, U[:, :r] @ V^T[:r])`` instead of two matmuls. The
            result is the same function (up to float rounding) and its gradients reach the same factors, but
            each step then costs what the exported subnet runs instead of up to 2x more.
        device: Device of the parameters.
        dtype: Dtype of the parameters.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        merge_above_break_even: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.max_rank = min(in_features, out_features)
        self.merge_above_break_even = merge_above_break_even
        factory = {"device": device, "dtype": dtype}
        self.vt = nn.Parameter(torch.empty(self.max_rank, in_features, **factory))
        self.u = nn.Parameter(torch.empty(out_features, self.max_rank, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.active_rank = self.max_rank

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, sv_placement: str = "faithful", merge_above_break_even: bool = True
    ) -> ElasticLowRankLinear:
        """Factorise a dense ``nn.Linear``; at full rank the new layer computes the same function."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            merge_above_break_even=merge_above_break_even,
            device=weight.device,
            dtype=weight.dtype,
        )
        if weight.device.type != "meta":
            u, vt = factorize(weight, sv_placement)
            with torch.no_grad():
                layer.u.copy_(u)
                layer.vt.copy_(vt)
                if linear.bias is not None:
                    layer.bias.copy_(linear.bias)
        return layer

    def set_rank(self, rank: int) -> None:
        """Set the active rank (1 to ``max_rank``)."""
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= self.max_rank:
            raise ValueError(f"rank={rank!r} is out of range: this layer allows integers 1..{self.max_rank}")
        self.active_rank = rank

    def factors(self, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Views ``(U[:, :r], V^T[:r])`` at ``rank`` (the active rank by default); no data is copied."""
        r = self.active_rank if rank is None else rank
        return self.u[:, :r], self.vt[:r]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, vt = self.factors()
        if self.merge_above_break_even and not low_rank_is_cheaper(
            self.in_features, self.out_features, self.active_rank
        ):
            return F.linear(x, u @ vt, self.bias)
        return F.linear(F.linear(x, vt), u, self.bias)

    def to_static(self, rank: int | None = None) -> nn.Module:
        """The standalone twin at ``rank``: plain torch modules that run exactly what the cost model charges.

        Below the break-even rank: ``nn.Sequential(Linear(d_in, r, bias=False), Linear(r, d_out))``.
        At or above it: one dense ``nn.Linear`` with the merged weight ``U[:, :r] V^T[:r]``.
        """
        r = self.active_rank if rank is None else rank
        if not 1 <= r <= self.max_rank:
            raise ValueError(f"rank={r!r} is out of range: this layer allows integers 1..{self.max_rank}")
        u, vt = self.factors(r)
        has_bias = self.bias is not None
        factory = {"device": self.u.device, "dtype": self.u.dtype}
        with torch.no_grad():
            if low_rank_is_cheaper(self.in_features, self.out_features, r):
                module = build_static_layer(self.in_features, self.out_features, r, has_bias, **factory)
                module[0].weight.copy_(vt)
                module[1].weight.copy_(u)
                if has_bias:
                    module[1].bias.copy_(self.bias)
            else:
                module = nn.Linear(self.in_features, self.out_features, bias=has_bias, **factory)
                module.weight.copy_(u @ vt)
                if has_bias:
                    module.bias.copy_(self.bias)
        return module

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"max_rank={self.max_rank}, active_rank={self.active_rank}, bias={self.bias is not None}"
        )


def build_static_layer(
    in_features: int,
    out_features: int,
    rank: int,
    bias: bool,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """An uninitialised static layer of the form ``to_static`` produces at ``rank`` (used to load exports)."""
    factory = {"device": device, "dtype": dtype}
    if low_rank_is_cheaper(in_features, out_features, rank):
        return nn.Sequential(
            nn.Linear(in_features, rank, bias=False, **factory),
            nn.Linear(rank, out_features, bias=bias, **factory),
        )
    return nn.Linear(in_features, out_features, bias=bias, **factory)

"""Token merging (ToMe, Bolya et al., ICLR 2023) for timm ViT/DeiT: ``r`` tokens merged in every block.

A faithful, compact port of the published algorithm (facebookresearch/ToMe ``tome/merge.py`` and
``tome/patch/timm.py``): after each block's attention, bipartite soft matching splits the tokens alternately into
sets A and B, pairs every A token with its most similar B token (cosine similarity of the attention keys averaged
over heads), and merges the ``r`` most similar A tokens into their partners by a size-weighted average; the class
token is never merged. Token sizes are tracked through the blocks and the attention is proportional (``log size``
added to the logits). No maintained ToMe package installs from PyPI (the official repository is not published
there), hence this port.

``apply_token_merging(model, r)`` turns a timm ``VisionTransformer`` into a ``ToMeVisionTransformer`` and its
blocks into ``ToMeBlock``s by swapping their classes, as the official code does (no module, parameter or FQN
changes, so surgery, extraction and checkpoints work unchanged); only ``forward_features`` and the blocks' forward
differ. ``token_schedule`` gives the tokens each block sees, for the cost model.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from flora_ray.errors import InputError

Merge = Callable[[torch.Tensor, str], torch.Tensor]


def _identity(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    return x


def bipartite_soft_matching(metric: torch.Tensor, r: int, class_token: bool = True) -> Merge:
    """The merge function of ToMe's bipartite soft matching on ``metric`` (``(batch, tokens, channels)``).

    Args:
        metric: What token similarity is measured on (ToMe: the keys averaged over heads).
        r: Tokens to remove; clipped, as published, to ``(tokens - protected) // 2``.
        class_token: Token 0 is a class token: never merged, kept first.

    Returns:
        ``merge(x, mode)``: ``x`` (``(batch, tokens, c)``) with ``r`` fewer tokens, the unmerged A tokens (in order)
        followed by the B tokens, into which the merged A tokens were reduced by ``mode`` (``"sum"``, ``"mean"``).
    """
    t = metric.shape[1]
    r = min(r, (t - int(class_token)) // 2)
    if r <= 0:
        return _identity
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        if class_token:
            scores[..., 0, :] = -math.inf
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx = edge_idx[..., r:, :]  # unmerged A tokens
        src_idx = edge_idx[..., :r, :]  # merged A tokens
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
        if class_token:
            unm_idx = unm_idx.sort(dim=1)[0]  # the class token back to position 0

    def merge(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        return torch.cat([unm, dst], dim=1)

    return merge


def merge_wavg(merge: Merge, x: torch.Tensor, size: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, size)`` after ``merge``: merged tokens are size-weighted averages, their sizes add up."""
    if size is None:
        size = torch.ones_like(x[..., 0, None])
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


def tome_attention(attn: Attention, x: torch.Tensor, size: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """timm ``Attention.forward`` with ToMe's proportional attention; returns the output and the matching metric
    (the keys averaged over heads). Uses the module's own children (``qkv``, ``proj``, ...)."""
    batch, tokens, _ = x.shape
    qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    bias = None if size is None else size.log()[:, None, None, :, 0]
    if attn.fused_attn:
        dropout = attn.attn_drop.p if attn.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
    else:
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        logits = logits if bias is None else logits + bias
        x = attn.attn_drop(logits.softmax(dim=-1)) @ v
    x = attn.norm(x.transpose(1, 2).reshape(batch, tokens, attn.attn_dim))
    return attn.proj_drop(attn.proj(x)), k.mean(1)


def tome_block(
    block: Block, x: torch.Tensor, size: torch.Tensor | None, r: int, class_token: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One timm ``Block`` with ToMe: attention on all tokens, ``r`` merged, then the MLP on the rest."""
    out, metric = tome_attention(block.attn, block.norm1(x), size)
    x = x + block.drop_path1(block.ls1(out))
    if r > 0:
        x, size = merge_wavg(bipartite_soft_matching(metric, r, class_token), x, size)
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return x, size


class ToMeBlock(Block):
    """A timm ``Block`` merging ``tome_r`` tokens (``tome_block``); called as ``block(x, size) -> (x, size)``, so
    that hooks on blocks (the latency profile's) see the token sizes too."""

    tome_r: int = 0
    class_token: bool = True

    def forward(self, x: torch.Tensor, size: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        return tome_block(self, x, size, self.tome_r, self.class_token)


class ToMeVisionTransformer(VisionTransformer):
    """A timm ``VisionTransformer`` of ``ToMeBlock``s merging ``tome_r`` tokens each (``apply_token_merging``)."""

    tome_r: int = 0

    def forward_features(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        """timm's ``forward_features`` with the blocks run as ToMe blocks, token sizes carried between them."""
        if attn_mask is not None or is_causal:
            raise ValueError("token merging (model.tome_r) does not support attention masks")
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        size = None
        for block in self.blocks:
            x, size = block(x, size)
        return self.norm(x)


def token_merging_r(model: nn.Module) -> int:
    """The tokens a model merges per block (0: no token merging)."""
    return int(getattr(model, "tome_r", 0)) if isinstance(model, ToMeVisionTransformer) else 0


def token_schedule(tokens: int, depth: int, r: int, protected: int) -> list[int]:
    """Tokens entering each of ``depth`` blocks when each merges ``r`` of them (ToMe clips ``r`` to
    ``(tokens - protected) // 2``, as the merge itself does)."""
    schedule = []
    for _ in range(depth):
        schedule.append(tokens)
        tokens -= min(r, (tokens - protected) // 2)
    return schedule


def _first_short_block(schedule: list[int], r: int, protected: int) -> int | None:
    """The first block with fewer than ``2 r`` mergeable tokens (``None``: ``r`` fits every block)."""
    return next((i for i, t in enumerate(schedule) if (t - protected) // 2 < r), None)


def max_tome_r(tokens: int, depth: int, protected: int) -> int:
    """The largest ``r`` that every one of ``depth`` blocks can merge, starting from ``tokens`` tokens."""
    r = 0
    while _first_short_block(token_schedule(tokens, depth, r + 1, protected), r + 1, protected) is None:
        r += 1
    return r


def _check_mergeable(model: nn.Module, r: int) -> None:
    where = f"model.tome_r={r}"
    if type(model) not in (VisionTransformer, ToMeVisionTransformer):
        raise InputError(
            f"token merging ({where}) supports timm VisionTransformer models (ViT, DeiT), not "
            f"{type(model).__name__}; set model.tome_r=0"
        )
    if model.num_prefix_tokens > 1 or getattr(model, "attn_pool", None) is not None:
        raise InputError(
            f"token merging ({where}) needs a ViT with at most a class token as prefix and no attention pooling "
            f"(this one has {model.num_prefix_tokens} prefix tokens); set model.tome_r=0"
        )
    odd = [i for i, b in enumerate(model.blocks) if type(b) not in (Block, ToMeBlock) or type(b.attn) is not Attention
           or b.attn.gate is not None]  # fmt: skip
    if odd:
        raise InputError(f"token merging ({where}) needs timm's plain Block and Attention; block {odd[0]} is not")


def apply_token_merging(model: nn.Module, r: int) -> nn.Module:
    """Make ``model`` (a timm ``VisionTransformer``) merge ``r`` tokens in every block, in place; returns it.

    Raises:
        ValueError: ``r`` is negative, the model is not a plain timm ViT/DeiT with at most a class token, or ``r``
            is too large: a block would have fewer than ``2 r`` mergeable tokens at the configured image size.
    """
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise InputError(f"model.tome_r={r!r} is not allowed: give a whole number of tokens >= 0")
    if r == 0:
        return model
    _check_mergeable(model, r)
    grid_h, grid_w = model.patch_embed.grid_size
    protected = model.num_prefix_tokens
    schedule = token_schedule(grid_h * grid_w + protected, len(model.blocks), r, protected)
    short = _first_short_block(schedule, r, protected)
    if short is not None:
        largest = max_tome_r(schedule[0], len(schedule), protected)
        raise InputError(
            f"model.tome_r={r} is too large: block {short} of {len(schedule)} sees {schedule[short]} tokens and can "
            f"merge at most {(schedule[short] - protected) // 2}; the largest r for this model and image size is "
            f"{largest}"
        )
    model.__class__ = ToMeVisionTransformer
    model.tome_r = r
    for block in model.blocks:
        block.__class__ = ToMeBlock
        block.tome_r, block.class_token = r, protected == 1
    return model

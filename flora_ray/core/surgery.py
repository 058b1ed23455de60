"""Module surgery on live models: find target layers by fully qualified name and swap them in place.

One generic traversal (``swap_modules``) driven by a ``filter_fn(module, fqn)`` and a ``replace_fn(module, fqn)``
does every swap in flora-ray: dense Linear -> elastic layer (supernet), elastic layer -> static twin (export),
dense Linear -> static layer of a saved shape (loading an export).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from flora_ray.core.families import describe_families, family_of
from flora_ray.core.lowrank import ElasticLowRankLinear
from flora_ray.errors import InputError

FilterFn = Callable[[nn.Module, str], bool]
ReplaceFn = Callable[[nn.Module, str], nn.Module]


def swap_modules(model: nn.Module, filter_fn: FilterFn, replace_fn: ReplaceFn) -> list[str]:
    """Replace, in place, every submodule for which ``filter_fn(module, fqn)`` is true.

    Returns:
        The FQNs that were replaced, in module order.
    """
    chosen = [(fqn, module) for fqn, module in model.named_modules() if fqn and filter_fn(module, fqn)]
    for fqn, module in chosen:
        parent_fqn, _, child = fqn.rpartition(".")
        parent = model.get_submodule(parent_fqn)
        setattr(parent, child, replace_fn(module, fqn))
    return [fqn for fqn, _ in chosen]


@dataclass(frozen=True)
class TargetLayer:
    """A factorisable layer: its FQN, the block it belongs to, and its shape."""

    fqn: str
    block: str
    in_features: int
    out_features: int


def find_targets(
    model: nn.Module,
    targets: str | None = None,
    include_proj: bool = False,
    block_pattern: str | None = None,
) -> list[TargetLayer]:
    """The layers to factorise, grouped into blocks.

    Args:
        model: A timm model (dense, or already a supernet).
        targets: A regex on FQNs for other timm transformers. If it has a named group ``block``, that group names
            the block; otherwise ``block_pattern`` (or the FQN's grandparent) does. ``None`` uses the preset of
            the model's registered family (``families.family_of``; ViT/DeiT and Swin are built in): its
            ``layers`` (``qkv``, ``fc1``, ``fc2``) of every block.
        include_proj: Also factorise ``attn.proj`` (family presets only).
        block_pattern: A regex matching a block's FQN prefix, used with ``targets``.
    """
    if targets is None:
        family = family_of(model)
        if family is None:
            raise InputError(
                f"model {type(model).__name__} has no flora-ray preset (no registered model family matches it; "
                f"registered: {describe_families()}); pass targets=REGEX naming its Linear layers"
            )
        regex = family.target_regex(include_proj)
    else:
        regex = targets
    try:
        pattern = re.compile(regex)
        block_re = re.compile(block_pattern) if block_pattern else None
    except re.error as exc:
        raise InputError(f"invalid target regex {regex!r}: {exc}") from exc
    found = []
    for fqn, module in model.named_modules():
        match = pattern.search(fqn) if fqn else None
        if match is None:
            continue
        if not isinstance(module, nn.Linear | ElasticLowRankLinear):
            if targets is None:
                continue
            raise InputError(f"target {fqn!r} is a {type(module).__name__}, not an nn.Linear; narrow the regex")
        block = _block_of(fqn, match, block_re)
        found.append(TargetLayer(fqn, block, module.in_features, module.out_features))
    if not found:
        raise InputError(f"target pattern {regex!r} matches no Linear layer of {type(model).__name__}")
    return found


def _block_of(fqn: str, match: re.Match, block_re: re.Pattern | None) -> str:
    if "block" in match.groupdict() and match.group("block"):
        return match.group("block")
    if block_re is not None:
        found = block_re.match(fqn)
        if found:
            return found.group(0)
    parts = fqn.split(".")
    return ".".join(parts[:-2]) if len(parts) > 2 else parts[0]

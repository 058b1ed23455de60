"""The model-family registry: ``ModelFamily``, ``register_family``, ``family_of`` and the helpers families use.

The built-in families live one per module beside this one; ``flora_ray.core.families`` registers them."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from flora_ray.core.lowrank import ElasticLowRankLinear

Forward = Callable[[torch.Tensor], torch.Tensor]
Split = tuple[Forward, Forward]
TokenGeometry = tuple[dict[str, int], int]

DEFAULT_LAYERS = ("attn.qkv", "mlp.fc1", "mlp.fc2")
DEFAULT_PROJ_LAYERS = ("attn.proj",)


def patch_embed_img_size(model: nn.Module) -> tuple[int, int]:
    """``(height, width)`` of a model with a timm-style ``patch_embed.img_size``."""
    height, width = model.patch_embed.img_size
    return int(height), int(width)


@dataclass(frozen=True)
class ModelFamily:
    """What flora-ray needs to know about one architecture family.

    Attributes:
        name: Short name, unique in the registry (``"vit"``, ``"swin"``).
        matches: ``matches(model)`` is true for the models of this family.
        block_pattern: Regex matching the FQN prefix of one transformer block (``blocks\\.\\d+``).
        token_geometry: ``token_geometry(model)`` is ``(tokens, other_macs)``: the token rows each Linear layer
            (dense or elastic) processes per image, by FQN, and the MACs per image outside Linear layers
            (patch-embedding convolution, attention products). It must place every Linear layer of the model.
        split_forward: ``split_forward(model, block_name)`` is ``(prefix, suffix)`` with
            ``suffix(prefix(x)) == model(x)`` and ``prefix`` stopping just before block ``block_name``, or
            ``None`` when it cannot split there; ``None`` (the field) when the family cannot split at all.
        layers: The factorisable Linear layers of a block, by FQN relative to the block, in block order. A block
            need not hold all of them (LeViT's residual and downsampling blocks each hold three of four).
        proj_layers: The attention output projections, factorised as well with ``include_proj``.
        img_size: ``img_size(model)`` is the ``(height, width)`` the model is configured for.
        description: What the family covers, for error messages (``"timm VisionTransformer: ViT, DeiT"``).
    """

    name: str
    matches: Callable[[nn.Module], bool]
    block_pattern: str
    token_geometry: Callable[[nn.Module], TokenGeometry]
    split_forward: Callable[[nn.Module, str], Split | None] | None = None
    layers: tuple[str, ...] = DEFAULT_LAYERS
    proj_layers: tuple[str, ...] = DEFAULT_PROJ_LAYERS
    img_size: Callable[[nn.Module], tuple[int, int]] = patch_embed_img_size
    description: str = ""

    def target_regex(self, include_proj: bool = False) -> str:
        """Regex over FQNs matching the target layers; its named group ``block`` is the block's FQN.

        Args:
            include_proj: Also target the ``proj_layers`` (right after the first layer, unless already targets).
        """
        layers = list(self.layers)
        if include_proj:
            layers[1:1] = [name for name in self.proj_layers if name not in layers]
        alternatives = "|".join(re.escape(name) for name in layers)
        return rf"^(?P<block>{self.block_pattern})\.(?:{alternatives})$"

    def label(self) -> str:
        """The name plus the description, for messages: ``vit (timm VisionTransformer: ViT, DeiT)``."""
        return f"{self.name} ({self.description})" if self.description else self.name


_REGISTRY: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    """Add ``family`` to the registry, after the families already there; returns it.

    Raises:
        ValueError: A family of that name is already registered.
    """
    if family.name in _REGISTRY:
        raise ValueError(f"a model family named {family.name!r} is already registered; unregister it first")
    _REGISTRY[family.name] = family
    return family


def unregister_family(name: str) -> ModelFamily:
    """Remove the family called ``name`` from the registry and return it.

    Raises:
        ValueError: No family of that name is registered.
    """
    try:
        return _REGISTRY.pop(name)
    except KeyError:
        raise ValueError(f"no model family named {name!r}; registered are {list(_REGISTRY)}") from None


def registered_families() -> tuple[ModelFamily, ...]:
    """The registered families, in registration (= matching) order."""
    return tuple(_REGISTRY.values())


def family_of(model: nn.Module) -> ModelFamily | None:
    """The first registered family that matches ``model``; ``None`` when none does."""
    return next((family for family in _REGISTRY.values() if family.matches(model)), None)


def describe_families() -> str:
    """The registered families in one line, for error messages."""
    return ", ".join(family.label() for family in _REGISTRY.values()) or "none"


def is_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a Linear layer for the cost model: a dense ``nn.Linear`` or an elastic layer."""
    return isinstance(module, nn.Linear | ElasticLowRankLinear)


def linear_fqns(module: nn.Module) -> list[str]:
    """The FQNs, relative to ``module``, of the Linear layers inside it (see ``is_linear``)."""
    return [fqn for fqn, child in module.named_modules() if is_linear(child)]


def conv_macs(conv: nn.Conv2d, out_h: int, out_w: int) -> int:
    """MACs per image of a 2-d convolution with an ``out_h x out_w`` output."""
    kh, kw = conv.kernel_size
    return out_h * out_w * conv.out_channels * (conv.in_channels // conv.groups) * kh * kw

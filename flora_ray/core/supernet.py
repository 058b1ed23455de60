"""The FLORA supernet: a live timm model whose target Linear layers are elastic low-rank layers.

``build_supernet`` takes a timm model name (plus timm kwargs and optional dense weights) or an existing
``nn.Module``, swaps the target layers in place by FQN, and returns a ``Supernet`` that knows its rank space and
cost model. Supernet checkpoints are safetensors files with a ``flora-ray/supernet`` header holding the model
spec and the space, so that they load in a fresh process.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from flora_ray.core.cost import CostModel, build_cost_model
from flora_ray.core.lowrank import SV_PLACEMENTS, ElasticLowRankLinear
from flora_ray.core.models import ModelSpec, load_state_dict_strict
from flora_ray.core.space import RankConfig, RankSpace
from flora_ray.core.surgery import find_targets, swap_modules
from flora_ray.core.tome import token_merging_r
from flora_ray.errors import InputError
from flora_ray.storage.files import read_checkpoint, read_checkpoint_header, write_checkpoint

logger = logging.getLogger(__name__)

SUPERNET_FORMAT = "flora-ray/supernet"


class Supernet(nn.Module):
    """A timm model with elastic low-rank layers, its rank space and its cost model.

    Attributes:
        model: The timm model (its target layers are ``ElasticLowRankLinear``).
        space: The rank space over the elastic layers.
        spec: The timm name and kwargs the model was built from (``None`` for a user-supplied module).
        sv_placement: How the singular values were placed at factorisation (``"faithful"`` or ``"sqrt"``).
    """

    def __init__(
        self,
        model: nn.Module,
        space: RankSpace,
        spec: ModelSpec | None = None,
        sv_placement: str = "faithful",
    ) -> None:
        super().__init__()
        self.model = model
        self.space = space
        self.spec = spec
        self.sv_placement = sv_placement
        self._cost: CostModel | None = None

    def elastic_layers(self) -> dict[str, ElasticLowRankLinear]:
        """The elastic layers by FQN (relative to ``model``)."""
        return {fqn: self.model.get_submodule(fqn) for fqn in self.space.fqns}

    def set_ranks(self, ranks: Mapping[str, int], within_candidates: bool = True) -> RankConfig:
        """Activate a rank configuration; every layer must be given a rank among its choices.

        Args:
            ranks: ``{fqn: rank}``.
            within_candidates: Also require every block's tuple to be among the space's (filtered) candidates;
                ``False`` admits any combination of the layers' rank choices (e.g. uniform baselines that a
                filter dropped).
        """
        config = self.space.validate(ranks, complete=within_candidates)
        missing = [f for f in self.space.fqns if f not in config]
        if missing:
            raise ValueError(f"rank configuration has no rank for layer {missing[0]!r} ({len(missing)} missing)")
        for fqn, layer in self.elastic_layers().items():
            layer.set_rank(config[fqn])
        return config

    def set_max_ranks(self) -> None:
        """Every layer at full rank (the dense model's function), whatever the space allows."""
        for layer in self.elastic_layers().values():
            layer.set_rank(layer.max_rank)

    def active_ranks(self) -> RankConfig:
        return {fqn: layer.active_rank for fqn, layer in self.elastic_layers().items()}

    @property
    def cost(self) -> CostModel:
        if self._cost is None:
            self._cost = build_cost_model(self.model)
        return self._cost

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def header(self) -> dict[str, Any]:
        """What a checkpoint records besides the weights."""
        if self.spec is None:
            raise InputError(
                "this supernet was built from a module without a timm name; pass model_name= (and model_kwargs=) "
                "to build_supernet so that it can be saved and rebuilt"
            )
        return {
            "format": SUPERNET_FORMAT,
            "version": 1,
            "model": self.spec.to_dict(),
            "space": self.space.to_dict(),
            "sv_placement": self.sv_placement,
        }


def build_supernet(
    model: str | nn.Module,
    *,
    model_kwargs: Mapping[str, Any] | None = None,
    model_name: str | None = None,
    pretrained: bool | str | os.PathLike = False,
    ratios: Sequence[float] | None = None,
    include_proj: bool = False,
    targets: str | None = None,
    block_pattern: str | None = None,
    sv_placement: str = "faithful",
    merge_above_break_even: bool = True,
    device: str | torch.device = "cpu",
    tome_r: int = 0,
) -> Supernet:
    """Build a FLORA supernet by SVD surgery on a live timm model.

    Args:
        model: A timm model name (created with ``model_kwargs``) or an existing ``nn.Module`` (modified in place).
        model_kwargs: timm kwargs (``img_size``, ``in_chans``, ``num_classes``, ...), for a name.
        model_name: For an ``nn.Module``: the timm name it was created with, so that the supernet can be saved.
        pretrained: Dense weights for a name (see ``models.create_model``): ``True`` (hub cache) or a file.
        ratios: Rank ratios per layer (default: the DeiT-B/DeiT-S presets, sixths otherwise).
        include_proj: Also factorise ``attn.proj``.
        targets: A regex over FQNs selecting the layers to factorise in other timm transformers.
        block_pattern: A regex matching a block's FQN prefix, with ``targets``.
        sv_placement: ``"faithful"`` (all singular values in one factor, the reference) or ``"sqrt"``.
        merge_above_break_even: See ``ElasticLowRankLinear``.
        device: Device to build a named model on.
        tome_r: Tokens merged per block (ToMe, ``core.tome``) in a named model; a module's own setting is read off
            it (``tome.token_merging_r``).
    """
    if sv_placement not in SV_PLACEMENTS:
        raise InputError(f"sv_placement={sv_placement!r} is not supported; use one of {SV_PLACEMENTS}")
    if isinstance(model, str):
        spec = ModelSpec(model, model_kwargs or {}, tome_r)
        module = spec.create(pretrained=pretrained, device=device)
    elif isinstance(model, nn.Module):
        if model_kwargs and not model_name:
            raise InputError("model_kwargs is for a model name; for a module pass model_name= with it")
        spec = ModelSpec(model_name, model_kwargs or {}, token_merging_r(model)) if model_name else None
        module = model
    else:
        raise TypeError(f"model must be a timm model name or an nn.Module, got {type(model).__name__}")
    space = build_space(
        module,
        ratios=ratios,
        include_proj=include_proj,
        targets=targets,
        block_pattern=block_pattern,
        model_name=spec.name if spec else None,
    )
    wanted = set(space.fqns)
    swap_modules(
        module,
        lambda m, fqn: fqn in wanted and isinstance(m, nn.Linear),
        lambda m, fqn: ElasticLowRankLinear.from_linear(m, sv_placement, merge_above_break_even),
    )
    logger.info("factorised %d layers in %d blocks (%s)", len(wanted), len(space.blocks), sv_placement)
    return Supernet(module, space, spec, sv_placement)


def build_space(
    model: nn.Module,
    *,
    ratios: Sequence[float] | None = None,
    include_proj: bool = False,
    targets: str | None = None,
    block_pattern: str | None = None,
    model_name: str | None = None,
) -> RankSpace:
    """The full rank space of a dense timm model (any device, ``meta`` included) without factorising it."""
    found = find_targets(model, targets=targets, include_proj=include_proj, block_pattern=block_pattern)
    return RankSpace.from_targets(found, ratios, model=model_name or type(model).__name__)


def save_supernet(supernet: Supernet, path: str | os.PathLike, **extra: Any) -> None:
    """Write the supernet's weights and header to a safetensors file, atomically."""
    write_checkpoint(path, supernet.model.state_dict(), {**supernet.header(), **extra})


def load_supernet(
    path: str | os.PathLike, device: str | torch.device = "cpu", space: RankSpace | None = None
) -> Supernet:
    """Rebuild a supernet from a checkpoint written by ``save_supernet`` (no SVD, no dense weights needed).

    Args:
        path: The checkpoint.
        device: Where to put the weights.
        space: A (filtered) space to use instead of the saved one; it must describe the same layers.
    """
    header = read_checkpoint_header(path)
    if header.get("format") != SUPERNET_FORMAT:
        raise InputError(f"{str(path)!r} is not a flora-ray supernet checkpoint (format {header.get('format')!r})")
    spec = ModelSpec.from_dict(header["model"])
    saved_space = RankSpace.from_dict(header["space"], source=f"checkpoint {str(path)!r}")
    module = elastic_skeleton(spec, saved_space.fqns, device, source=f"checkpoint {str(path)!r}")
    tensors, _ = read_checkpoint(path, device=device)
    load_state_dict_strict(module, tensors, path)
    if space is not None:
        saved_space.check_compatible(space)
    return Supernet(module, space or saved_space, spec, header.get("sv_placement", "faithful"))


def elastic_skeleton(
    spec: ModelSpec, fqns: Sequence[str], device: torch.device | str = "cpu", source: str = "checkpoint"
) -> nn.Module:
    """The timm model of ``spec`` with uninitialised elastic layers at ``fqns``, ready for a state-dict load.

    On the ``meta`` device nothing is allocated; load with ``assign=True``.
    """
    module = spec.create(device=device)
    wanted = set(fqns)
    swapped = swap_modules(
        module,
        lambda m, fqn: fqn in wanted and isinstance(m, nn.Linear),
        lambda m, fqn: ElasticLowRankLinear(m.in_features, m.out_features, m.bias is not None, device=device),
    )
    if set(swapped) != wanted:
        missing = sorted(wanted - set(swapped))[0]
        raise InputError(f"{source} does not match {spec.name}: it has no Linear layer {missing!r}")
    return module

"""Subnet extraction and export: a standalone timm model at fixed ranks, saved as safetensors plus a JSON spec.

The exported model contains only timm and plain torch modules: each factorised layer becomes either
``nn.Sequential(Linear(d_in, r, bias=False), Linear(r, d_out))`` or a merged ``nn.Linear``, whichever the cost
model charges (``lowrank.low_rank_is_cheaper``). Loading it needs the timm name and kwargs, the per-layer forms
(all in ``subnet.json``) and the weights (``model.safetensors``); no supernet is built.
"""

from __future__ import annotations

import copy
import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flora_ray import __version__
from flora_ray.core.lowrank import build_static_layer, low_rank_is_cheaper
from flora_ray.core.models import ModelSpec, load_state_dict_strict
from flora_ray.core.quantize import load_int8, save_int8
from flora_ray.core.supernet import Supernet
from flora_ray.core.surgery import swap_modules
from flora_ray.errors import InputError, MissingInput
from flora_ray.storage.files import read_checkpoint, read_json, sha256_file, write_checkpoint, write_json

SUBNET_FORMAT = "flora-ray/subnet"
WEIGHTS_FILE = "model.safetensors"
INT8_WEIGHTS_FILE = "model.int8.safetensors"  # --format int8 (core.quantize)
SPEC_FILE = "subnet.json"


def extract_subnet(supernet: Supernet, ranks: Mapping[str, int], within_candidates: bool = True) -> nn.Module:
    """A standalone copy of the supernet's timm model at ``ranks``; the supernet itself is not modified.

    Its outputs equal the supernet's with ``set_ranks(ranks)`` (up to float rounding of the merged layers).
    ``within_candidates=False`` also accepts block tuples a filtered space dropped (each rank must still be one of
    its layer's choices), such as the uniform configurations a search compares with.
    """
    config = supernet.space.validate(ranks, complete=within_candidates)
    if len(config) != len(supernet.space.fqns):
        missing = [f for f in supernet.space.fqns if f not in config]
        raise ValueError(f"rank configuration has no rank for layer {missing[0]!r} ({len(missing)} missing)")
    layers = supernet.elastic_layers()
    # train(mode) with the current mode changes nothing but drops the tensors that timm modules cache from their
    # parameters in eval mode (LeViT's attention biases): deepcopy cannot copy such non-leaf tensors.
    supernet.model.train(supernet.model.training)
    # Pre-seed deepcopy's memo so that each elastic layer is replaced by its static twin instead of copied.
    memo = {id(layers[fqn]): layers[fqn].to_static(config[fqn]) for fqn in config}
    return copy.deepcopy(supernet.model, memo)


def subnet_spec(supernet: Supernet, ranks: Mapping[str, int]) -> dict[str, Any]:
    """The JSON spec of an exported subnet (without the weights checksum)."""
    supernet.header()  # raises a clear error when the supernet cannot be rebuilt by name
    config = supernet.space.validate(ranks)
    cost = supernet.cost
    layers = {}
    for fqn, layer in supernet.elastic_layers().items():
        layers[fqn] = {
            "in_features": layer.in_features,
            "out_features": layer.out_features,
            "rank": config[fqn],
            "max_rank": layer.max_rank,
            "bias": layer.bias is not None,
            "form": "low_rank" if low_rank_is_cheaper(layer.in_features, layer.out_features, config[fqn]) else "dense",
        }
    return {
        "format": SUBNET_FORMAT,
        "version": 1,
        "model": supernet.spec.to_dict(),
        "ranks": config,
        "layers": layers,
        "macs": cost.macs(config),
        "params": cost.params(config),
        "dense_macs": cost.dense_macs,
        "dense_params": cost.dense_params,
        "sv_placement": supernet.sv_placement,
        "versions": package_versions(),
    }


def package_versions() -> dict[str, str]:
    """Versions recorded with every artefact."""
    import timm

    return {
        "flora_ray": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
    }


def save_subnet(
    supernet: Supernet,
    ranks: Mapping[str, int],
    directory: str | os.PathLike,
    model: nn.Module | None = None,
    **extra: Any,
) -> Path:
    """Extract the subnet at ``ranks`` and write ``model.safetensors`` and ``subnet.json`` into ``directory``.

    ``model``: write these weights instead (a subnet extracted at ``ranks`` and trained further, e.g. fine-tuned);
    its state must load into the extracted subnet strictly. Both files are written atomically, weights first; the
    spec records the weights' SHA-256, so a directory whose two files do not belong together is detected at load
    time.
    """
    out = Path(directory)
    spec = {**subnet_spec(supernet, ranks), **extra}
    extracted = extract_subnet(supernet, ranks)
    if model is not None:
        load_state_dict_strict(extracted, model.state_dict(), "the subnet to save")
    model = extracted
    write_checkpoint(out / WEIGHTS_FILE, model.state_dict(), {"format": SUBNET_FORMAT, "version": 1})
    spec["weights_sha256"] = sha256_file(out / WEIGHTS_FILE)
    write_json(out / SPEC_FILE, spec)
    return out


def save_subnet_int8(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Quantize an exported subnet (``model``, loaded from ``directory``) to int8 (``core.quantize``), write
    ``model.int8.safetensors`` beside it and record the file's SHA-256 in ``subnet.json`` (both atomically), so that
    an int8 file of another subnet of the same shapes is refused at load time. Returns the quantized model."""
    d = Path(directory)
    quantized = save_int8(model, d / INT8_WEIGHTS_FILE)
    spec = read_json(d / SPEC_FILE, "subnet spec")
    write_json(d / SPEC_FILE, {**spec, "int8_weights_sha256": sha256_file(d / INT8_WEIGHTS_FILE)})
    return quantized


def load_subnet(directory: str | os.PathLike, device: str | torch.device = "cpu", int8: bool = False) -> nn.Module:
    """Load an exported subnet in any process: timm builds the architecture, the saved layer forms replace the
    factorised Linear layers, and the weights load strictly.

    Args:
        directory: The export folder (``subnet.json``, ``model.safetensors``).
        device: Where to load it; the int8 model runs on CPU only.
        int8: Load the int8 model of ``--format int8`` (``model.int8.safetensors``, ``core.quantize``) instead.
    """
    d = Path(directory)
    if not d.is_dir():
        raise MissingInput(f"subnet directory {str(d)!r} does not exist")
    spec = read_json(d / SPEC_FILE, "subnet spec")
    if not isinstance(spec, dict) or spec.get("format") != SUBNET_FORMAT:
        raise InputError(f"{str(d / SPEC_FILE)!r} is not a flora-ray subnet spec")
    weights = d / (INT8_WEIGHTS_FILE if int8 else WEIGHTS_FILE)
    if not weights.is_file():
        hint = "export it with --format int8" if int8 else "export the subnet again"
        raise MissingInput(f"subnet weights {str(weights)!r} are missing; {hint}")
    expected = spec.get("int8_weights_sha256" if int8 else "weights_sha256")
    if expected and sha256_file(weights) != expected:
        raise InputError(f"{str(weights)!r} does not match {SPEC_FILE} (checksum differs); export the subnet again")
    if int8:
        if torch.device(device).type != "cpu":
            raise InputError(f"the int8 subnet runs on CPU only, not {str(device)!r}")
        return load_int8(subnet_skeleton(spec, "cpu"), weights)
    model = subnet_skeleton(spec, device)
    tensors, _ = read_checkpoint(weights, device=device)
    load_state_dict_strict(model, tensors, weights)
    return model.eval()


def subnet_skeleton(spec: Mapping[str, Any], device: str | torch.device = "cpu") -> nn.Module:
    """The model a subnet spec (``subnet.json``) describes, with freshly initialised weights: timm's model (with
    its token merging) whose factorised layers have the saved forms."""
    model = ModelSpec.from_dict(spec["model"]).create(device=device)
    layers = spec["layers"]
    swap_modules(
        model,
        lambda m, fqn: fqn in layers,
        lambda m, fqn: build_static_layer(
            layers[fqn]["in_features"],
            layers[fqn]["out_features"],
            layers[fqn]["rank"],
            layers[fqn]["bias"],
            device=device,
        ),
    )
    return model

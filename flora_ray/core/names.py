"""Model names, without torch or timm: timm's registry read from its source, and ``hf-hub:`` names from the local
Hugging Face cache. ``flora-ray config`` and ``plan`` check a configuration's model with these in milliseconds;
building the model (``flora_ray.core.models``) imports timm."""

from __future__ import annotations

import difflib
import functools
import importlib.util
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flora_ray.errors import InputError

HUB_PREFIX = "hf-hub:"  # timm's names for models on the Hugging Face hub: hf-hub:timm/deit_small_patch16_224.fb_in1k
HUB_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class HubModel:
    """A timm model of the Hugging Face hub as its local cache holds it (``config.json`` and weights)."""

    repo: str
    architecture: str
    model_args: dict[str, Any]
    num_classes: int | None
    weights: Path | None


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time (``HF_HUB_CACHE``, ``HF_HOME``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser() / "hub"


def resolve_hub_model(name: str) -> HubModel:
    """A ``hf-hub:owner/repo`` name from the local cache only (no network): its timm architecture, model arguments,
    class count and weight file; a one-line error naming the cache and the download command when it is missing."""
    from huggingface_hub import try_to_load_from_cache

    repo = name.removeprefix(HUB_PREFIX).split("@", 1)[0]
    cache = hub_cache_dir()
    found = try_to_load_from_cache(repo, "config.json", cache_dir=str(cache))
    if not isinstance(found, str):
        raise InputError(
            f"model {name!r} is not in the local Hugging Face cache ({cache}): download it once where there is "
            f"network (huggingface-cli download {repo}) or point HF_HUB_CACHE/HF_HOME at a cache that has it"
        )
    config = json.loads(Path(found).read_text())
    if not isinstance(config, dict) or not isinstance(config.get("architecture"), str):
        raise InputError(f"{found!r} is not a timm hub config (no 'architecture'); is {repo!r} a timm model?")
    weights = next((Path(w) for f in HUB_WEIGHTS
                    if isinstance(w := try_to_load_from_cache(repo, f, cache_dir=str(cache)), str)), None)  # fmt: skip
    classes = config.get("num_classes", (config.get("pretrained_cfg") or {}).get("num_classes"))
    return HubModel(repo, config["architecture"], dict(config.get("model_args") or {}), classes, weights)


def hub_weights(name: str) -> str:
    """The cached weight file of a ``hf-hub:`` model (its pretrained weights)."""
    hub = resolve_hub_model(name)
    if hub.weights is None:
        raise InputError(
            f"the local Hugging Face cache has {hub.repo!r}'s config.json but none of {list(HUB_WEIGHTS)}: download "
            f"the weights (huggingface-cli download {hub.repo}) or give model.pretrained a weight file"
        )
    return str(hub.weights)


# timm registers each architecture with ``@register_model`` on a function of the same name (timm/models/*.py).
_REGISTERED = re.compile(r"^@register_model\s*\ndef\s+(\w+)\s*\(", re.M)


@functools.cache
def timm_model_names() -> frozenset[str]:
    """timm's architecture names (``timm.list_models()``), read from timm's source when timm is not imported yet:
    importing it costs seconds (torch); tests/models checks both agree."""
    if "timm" in sys.modules:
        return frozenset(sys.modules["timm"].list_models())
    spec = importlib.util.find_spec("timm")
    folders = list(spec.submodule_search_locations or []) if spec else []
    found = frozenset(
        name for folder in folders for path in sorted((Path(folder) / "models").glob("*.py"))
        for name in _REGISTERED.findall(path.read_text(encoding="utf-8"))
    )  # fmt: skip
    if not found:  # a timm laid out otherwise: ask timm itself
        import timm

        return frozenset(timm.list_models())
    return found


def is_timm_model(name: str) -> bool:
    """``timm.is_model(name)``: the architecture of ``name`` (a ``.tag`` after it names pretrained weights) is
    registered."""
    if "timm" in sys.modules:
        return bool(sys.modules["timm"].is_model(name))
    return name.split(".", 1)[0] in timm_model_names()


def check_model_name(name: str) -> None:
    """Raise an ``InputError`` naming close matches when timm has no model called ``name``."""
    if is_timm_model(name):
        return
    close = difflib.get_close_matches(name, sorted(timm_model_names()), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models() for the names"
    raise InputError(f"unknown timm model {name!r}: {hint}")


def architecture(model_name: str) -> tuple[str, dict[str, Any]]:
    """The timm architecture and model arguments of a model name: the name itself, or for a ``hf-hub:`` name what
    its config in the local hub cache says."""
    if model_name.startswith(HUB_PREFIX):
        hub = resolve_hub_model(model_name)
        return hub.architecture, dict(hub.model_args)
    return model_name, {}

"""timm models: creation from a name plus kwargs, and loading of dense weights.

A ``ModelSpec`` (timm name + JSON-able kwargs) is what every flora-ray artefact records, so that a model can be
rebuilt in a fresh process. Dense weights come from timm's pretrained mechanism (a local file through the
``pretrained_cfg_overlay`` file overlay, or the Hugging Face hub cache when offline) or from a flora-ray dense
checkpoint (safetensors with a ``flora-ray/dense`` header).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from flora_ray.core.names import check_model_name
from flora_ray.core.tome import apply_token_merging
from flora_ray.errors import InputError, MissingInput
from flora_ray.storage.files import read_checkpoint, read_checkpoint_header

logger = logging.getLogger(__name__)

DENSE_FORMAT = "flora-ray/dense"


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"model kwarg value {value!r} is not JSON-serialisable; use numbers, strings and lists")


@dataclass(frozen=True)
class ModelSpec:
    """A timm model name plus the kwargs passed to ``timm.create_model`` (``img_size``, ``num_classes``, ...), and
    the tokens merged per block (``tome_r``: ToMe token merging, ``core.tome``; 0 for none).

    ``tome_r`` is part of how the model is built, so every artefact that records the spec (teacher, supernet,
    exported subnet) rebuilds the same merging model; it does not change the weights.
    """

    name: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    tome_r: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise InputError(f"model name must be a non-empty string, got {self.name!r}")
        if isinstance(self.tome_r, bool) or not isinstance(self.tome_r, int) or self.tome_r < 0:
            raise InputError(f"model.tome_r={self.tome_r!r} is not allowed: give a whole number of tokens >= 0")
        object.__setattr__(self, "kwargs", _jsonable(dict(self.kwargs)))

    def to_dict(self) -> dict[str, Any]:
        """``name``, ``kwargs`` and, with token merging, ``tome_r`` (absent at 0, as in artefacts made before it)."""
        return {"name": self.name, "kwargs": dict(self.kwargs), **({"tome_r": self.tome_r} if self.tome_r else {})}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        if not isinstance(data, Mapping) or "name" not in data:
            raise InputError(f"a model spec needs a 'name' (and optional 'kwargs'), got {data!r}")
        return cls(data["name"], data.get("kwargs") or {}, data.get("tome_r", 0))

    def create(self, pretrained: bool | str | os.PathLike = False, device: str | torch.device = "cpu") -> nn.Module:
        """Build the model (see ``create_model``), merging ``tome_r`` tokens per block (``apply_token_merging``)."""
        model = create_model(self.name, pretrained=pretrained, device=device, **self.kwargs)
        return apply_token_merging(model, self.tome_r)


def create_model(
    name: str,
    pretrained: bool | str | os.PathLike = False,
    device: str | torch.device = "cpu",
    **kwargs: Any,
) -> nn.Module:
    """Create a timm model, optionally with dense weights.

    Args:
        name: timm model name (``deit_small_patch16_224``, ``swin_tiny_patch4_window7_224``, ``test_vit``...).
        pretrained: ``False`` for random init; ``True`` for timm's pretrained weights from the Hugging Face hub
            (its local cache is used, so this works offline once downloaded); or a path: a flora-ray dense
            checkpoint, or any timm-loadable weight file (``.safetensors``, ``.pth``, ``.bin``) loaded through
            timm's file overlay, which adapts ``num_classes``, ``in_chans`` and the position embedding size.
        device: Where to build the model; ``"meta"`` builds the structure only (no memory, no init cost).
        **kwargs: timm model kwargs.
    """
    check_model_name(name)
    if isinstance(pretrained, str | os.PathLike) and not isinstance(pretrained, bool):
        path = Path(pretrained)
        if not path.is_file():
            raise MissingInput(f"weights file {str(path)!r} does not exist; give the path of a weight file")
        tensors, meta = read_checkpoint(path) if path.suffix == ".safetensors" else (None, {})
        if meta.get("format") == DENSE_FORMAT:
            return _load_dense_checkpoint(name, kwargs, tensors, meta, path, device)
        overlay: dict[str, Any] = {"file": str(path)}
        classes = weight_file_num_classes(name, path)
        if classes is not None:  # timm keeps the file's classifier only when the model has the same class count
            overlay["num_classes"] = classes
        return _timm_create(name, kwargs, device, pretrained=True, pretrained_cfg_overlay=overlay)
    return _timm_create(name, kwargs, device, pretrained=bool(pretrained))


def pretrained_num_classes(name: str, pretrained: bool | str | os.PathLike) -> int | None:
    """Classes of the classifier in a model's pretrained weights: timm's pretrained config for ``True``, the
    classifier's shape (or the flora-ray header) for a weight file; ``None`` when unknown or without weights."""
    if pretrained is True:
        check_model_name(name)
        return getattr(timm.models.get_pretrained_cfg(name), "num_classes", None)
    if not pretrained:
        return None
    return weight_file_num_classes(name, Path(pretrained))


def weight_file_num_classes(name: str, path: Path) -> int | None:
    """Rows of the classifier weight in a weight file (read from the header where the format allows)."""
    if path.suffix == ".safetensors":
        meta = read_checkpoint_header(path)
        if meta.get("format") == DENSE_FORMAT:
            return ModelSpec.from_dict(meta.get("model", {})).kwargs.get("num_classes")
    classifier = getattr(timm.models.get_pretrained_cfg(name), "classifier", None) or "head"
    names = [classifier] if isinstance(classifier, str) else list(classifier)
    shapes = _tensor_shapes(name, path)
    for key in (f"{n}.weight" for n in names):
        if key in shapes and len(shapes[key]) == 2:
            return int(shapes[key][0])
    return None


def _tensor_shapes(name: str, path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a weight file without loading it where possible (safetensors), else via a safe load."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}  # noqa: SIM118
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch's safe unpickler raises several types for foreign files
        raise InputError(
            f"cannot load pretrained weights for {name!r} from {str(path)!r}: {_first_line(exc)}; "
            "give a weight file of this architecture (safetensors, or a plain state dict)"
        ) from exc
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    return (
        {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)} if isinstance(state, dict) else {}
    )


def _timm_create(name: str, kwargs: Mapping[str, Any], device: str | torch.device, **extra: Any) -> nn.Module:
    try:
        if extra.get("pretrained"):
            model = timm.create_model(name, **extra, **kwargs)
            return model.to(device)
        with torch.device(device):
            return timm.create_model(name, **extra, **kwargs)
    except TypeError as exc:
        raise InputError(f"invalid kwargs for timm model {name!r}: {exc}") from exc
    except (OSError, ValueError) as exc:
        source = extra.get("pretrained_cfg_overlay", {}).get("file", "the Hugging Face hub cache")
        raise InputError(
            f"cannot read pretrained weights for {name!r} from {source}: {_first_line(exc)}; "
            "pass a local weight file (pretrained=PATH) when offline"
        ) from exc
    except (RuntimeError, pickle.UnpicklingError, KeyError, EOFError, IndexError, AssertionError) as exc:
        # A corrupt or foreign weight file: torch's weights-only unpickler raises any of these (older timm lets
        # them through unwrapped), timm's strict load a RuntimeError.
        source = extra.get("pretrained_cfg_overlay", {}).get("file", "the Hugging Face hub cache")
        raise InputError(
            f"cannot load pretrained weights for {name!r} from {source}: {_first_line(exc)}; "
            "give a weight file of this architecture (or download it to the hub cache)"
        ) from exc


def _first_line(exc: BaseException) -> str:
    """The gist of an exception in one line: its first line, plus the first detail line of a state-dict error."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    text = " ".join(lines[:2]) if lines[0].startswith("Error(s) in loading state_dict") else lines[0]
    return text if len(text) <= 300 else text[:297] + "..."


def _load_dense_checkpoint(
    name: str,
    kwargs: Mapping[str, Any],
    tensors: dict[str, torch.Tensor],
    meta: Mapping[str, Any],
    path: Path,
    device: str | torch.device,
) -> nn.Module:
    saved = ModelSpec.from_dict(meta.get("model", {}))
    wanted = ModelSpec(name, kwargs)
    if (saved.name, saved.kwargs) != (wanted.name, wanted.kwargs):  # token merging does not change the weights
        raise InputError(
            f"checkpoint {str(path)!r} holds {json.dumps(saved.to_dict())}, not {json.dumps(wanted.to_dict())}; "
            "use the checkpoint made for this model or change the model config"
        )
    model = _timm_create(name, kwargs, device)
    load_state_dict_strict(model, tensors, path)
    return model


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: Any) -> None:
    """``model.load_state_dict(strict=True)`` that reports a mismatch as one ``ValueError`` line."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = sorted(k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {keys[0]})")
        raise InputError(
            f"checkpoint {str(source)!r} does not match the model: {', '.join(parts)}; "
            "use a checkpoint of the same architecture and kwargs"
        )
    model.load_state_dict(state_dict, strict=True)


def dense_checkpoint_metadata(spec: ModelSpec, **extra: Any) -> dict[str, Any]:
    """Header of a flora-ray dense checkpoint (see ``fileio.write_checkpoint``)."""
    return {"format": DENSE_FORMAT, "version": 1, "model": spec.to_dict(), **extra}

"""Atomic file writes and safetensors checkpoints with a JSON header.

Every artefact flora-ray writes goes through ``atomic_path``: the data is written to a temporary file in the
same directory and renamed over the target, so a crash never leaves a half-written file and never destroys the
previous version. Checkpoints are safetensors files (no pickle) whose metadata holds one JSON document under the
key ``flora_ray``.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError

from flora_ray.errors import InputError, MissingInput

if TYPE_CHECKING:  # torch is imported where tensors are read or written: reading JSON and headers stays light
    import torch

METADATA_KEY = "flora_ray"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Read a JSON file; a missing or malformed file is a one-line error naming it."""
    p = Path(path)
    if not p.is_file():
        raise MissingInput(f"{what} {str(p)!r} does not exist")
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{what} {str(p)!r} is not valid JSON ({exc}); regenerate it") from exc


def write_checkpoint(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], header: Mapping[str, Any]) -> None:
    """Save ``tensors`` as safetensors with ``header`` as JSON metadata, atomically."""
    from safetensors.torch import save_file

    data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(data, str(tmp), metadata={METADATA_KEY: json.dumps(header)})


def read_checkpoint_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a safetensors checkpoint ({} when it has none), without reading the tensors."""
    from safetensors import safe_open

    p = Path(path)
    _check_exists(p)
    try:
        with safe_open(str(p), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"cannot read checkpoint {str(p)!r} (corrupt or not safetensors): {exc}") from exc
    return _parse_header(metadata, p)


def read_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a safetensors checkpoint: ``(tensors, header)``. Never unpickles anything."""
    from safetensors.torch import load_file

    p = Path(path)
    header = read_checkpoint_header(p)
    try:
        tensors = load_file(str(p), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise InputError(f"cannot read checkpoint {str(p)!r} (corrupt or truncated): {exc}") from exc
    return tensors, header


def parse_checkpoint_header(stream: Any, source: str) -> dict[str, Any]:
    """The flora-ray JSON header of safetensors data read from a binary ``stream`` (the format's length-prefixed
    JSON header; the tensors are not read)."""
    head = stream.read(8)
    size = int.from_bytes(head, "little") if len(head) == 8 else -1
    if not 0 < size <= 100 * 2**20:
        raise InputError(f"cannot read checkpoint {source!r} (corrupt or not safetensors)")
    try:
        metadata = json.loads(stream.read(size)).get("__metadata__") or {}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise InputError(f"cannot read checkpoint {source!r} (corrupt or not safetensors): {exc}") from exc
    return _parse_header(metadata, source)


def _check_exists(p: Path) -> None:
    if not p.is_file():
        raise MissingInput(f"checkpoint {str(p)!r} does not exist; check the path")


def _parse_header(metadata: Mapping[str, str], p: Path | str) -> dict[str, Any]:
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        return {}
    try:
        header = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InputError(f"checkpoint {str(p)!r} has a corrupt flora-ray header: {exc}") from exc
    if not isinstance(header, dict):
        raise InputError(f"checkpoint {str(p)!r} has a corrupt flora-ray header (not an object)")
    return header


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()

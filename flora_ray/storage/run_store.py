"""The run store: the one place that knows every artefact of a run and turns its name into a location.

A run is a directory (``run.storage/run.name``, else ``run.output_dir/run.name``) on a filesystem (``pyarrow.fs``:
a local directory, a shared mount, or object storage such as ``s3://bucket/prefix``).
Stages ask the store for an artefact by name (``store.read_json(ARTEFACTS.space)``, ``store.write_parquet(...)``)
and never build paths themselves; every write goes to a temporary name first and is then moved into place, so a
crash never leaves a half-written artefact and never destroys the previous version. Readers that need a real local
file (Optuna's journal, timm's weight loading) ask for ``local_path``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flora_ray.errors import InputError, MissingInput
from flora_ray.storage.files import parse_checkpoint_header


@dataclass(frozen=True)
class Artefacts:
    """File names of a run's artefacts, relative to the run directory."""

    run_config: str = "run_config.yaml"
    data_listing: str = "data_listing.parquet"
    teacher: str = "teacher.safetensors"
    space: str = "space.json"
    latency_table: str = "latency_table.parquet"
    filter_scores: str = "filter_scores.parquet"
    filter_blocks: str = "filter"
    supernet: str = "supernet.safetensors"
    checkpoints: str = "checkpoints"
    ray: str = "ray"
    sensitivity: str = "sensitivity.parquet"
    journal: str = "search_journal.log"
    trials: str = "trials.parquet"
    pareto: str = "pareto.parquet"
    uniform: str = "uniform.parquet"
    search_summary: str = "search_summary.json"
    pareto_plot: str = "pareto.png"
    hypervolume_plot: str = "hypervolume.png"
    front_html: str = "front.html"
    exports: str = "export"
    finetunes: str = "finetune"
    refine_table: str = "refine.parquet"
    refine_summary: str = "refine.json"
    report: str = "report.md"
    report_json: str = "report.json"
    stages: str = "stages"
    lease: str = "lease.json"
    job: str = "job.json"

    def history(self, stage: str) -> str:
        """Metric history of a training stage (one dict per epoch)."""
        return f"{stage}_history.json"

    def filter_block(self, index: int) -> str:
        """One block's filter result (written as soon as the block finishes)."""
        return f"{self.filter_blocks}/block_{index:03d}.json"

    def stage_marker(self, stage: str) -> str:
        """A finished stage's completion record."""
        return f"{self.stages}/{stage}.json"

    def export_dir(self, trial: int) -> str:
        """The folder an exported trial goes to."""
        return f"{self.exports}/trial_{trial}"

    def finetune_dir(self, trial: int) -> str:
        """The folder a fine-tuned trial is exported to (the model files and ``finetune.json``)."""
        return f"{self.finetunes}/trial_{trial}"

    def finetune_result(self, trial: int) -> str:
        """A fine-tuned trial's figures (what its folder's ``finetune.json`` holds), read by the report."""
        return f"{self.finetunes}/trial_{trial}.json"


ARTEFACTS = Artefacts()


def join(location: str, name: str) -> str:
    """``location/name`` for a path or a URI."""
    return f"{location.rstrip('/')}/{name}" if "://" in location else os.path.join(location, name)


class RunStore:
    """A run directory on a ``pyarrow.fs`` filesystem.

    Args:
        root: The run directory: a local path, or a URI that ``pyarrow.fs.FileSystem.from_uri`` understands.
        filesystem: The filesystem ``root`` lives on (default: derived from ``root``; local for a plain path).
    """

    def __init__(self, root: str | os.PathLike, filesystem: Any | None = None) -> None:
        import pyarrow.fs as pafs

        from flora_ray.storage.filesystems import resolve_filesystem

        if filesystem is None:
            filesystem, text = resolve_filesystem(os.fspath(root))
        else:
            text = os.fspath(root)
        self.filesystem = filesystem
        self.root = text.rstrip("/")
        self.is_local = isinstance(filesystem, pafs.LocalFileSystem)

    @classmethod
    def for_config(cls, cfg: Any) -> RunStore:
        """The store of a configuration's run: ``run.storage/run.name``, or ``run.output_dir/run.name`` when no
        storage is configured."""
        return cls(join(cfg.run.storage, cfg.run.name) if cfg.run.storage else cfg.run.run_dir)

    @property
    def uri(self) -> str:
        """The run's location as a URI (or an absolute local path) that any process can open again."""
        from flora_ray.storage.filesystems import location_uri

        return location_uri(self.filesystem, self.root)

    @property
    def name(self) -> str:
        """The run's name (the directory's last component)."""
        return self.root.rsplit("/", 1)[-1]

    def __repr__(self) -> str:
        return f"RunStore({self.uri!r})"

    def __reduce__(self):  # another process (a Ray worker) rebuilds the filesystem from its own environment
        return (RunStore, (self.uri,))

    # -- locations ---------------------------------------------------------------------------------------------

    def location(self, name: str) -> str:
        """Where artefact ``name`` lives on the store's filesystem."""
        return f"{self.root}/{name}" if name else self.root

    def local_path(self, name: str = "") -> Path:
        """The local path of artefact ``name``, for readers that need a real file (local stores only)."""
        if not self.is_local:
            raise ValueError(f"run store {self.root!r} is not on a local filesystem; {name!r} has no local path")
        return Path(self.location(name))

    def exists(self, name: str) -> bool:
        import pyarrow.fs as pafs

        return self.filesystem.get_file_info(self.location(name)).type != pafs.FileType.NotFound

    def is_file(self, name: str) -> bool:
        import pyarrow.fs as pafs

        return self.filesystem.get_file_info(self.location(name)).type == pafs.FileType.File

    def list(self, folder: str, suffix: str = "") -> list[str]:
        """Names (relative to the run) of the files directly in ``folder`` ending in ``suffix``, sorted."""
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(self.location(folder), allow_not_found=True)
        infos = self.filesystem.get_file_info(selector)
        names = [f"{folder}/{i.base_name}" if folder else i.base_name for i in infos if i.type == pafs.FileType.File]
        return sorted(n for n in names if n.endswith(suffix) and not n.rsplit("/", 1)[-1].startswith("."))

    def makedirs(self, name: str = "") -> None:
        self.filesystem.create_dir(self.location(name), recursive=True)

    # -- bytes -------------------------------------------------------------------------------------------------

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write ``data`` to artefact ``name`` atomically (temporary name, then a move over the target)."""
        target = self.location(name)
        parent, _, base = target.rpartition("/")
        self.filesystem.create_dir(parent, recursive=True)
        tmp = f"{parent}/.{base}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            with self.filesystem.open_output_stream(tmp) as stream:
                stream.write(data)
            self.filesystem.move(tmp, target)
        except BaseException:  # no half-written temporary left behind; the previous version stays intact
            with contextlib.suppress(OSError):
                self.filesystem.delete_file(tmp)
            raise

    def read_bytes(self, name: str, what: str = "file") -> bytes:
        if not self.is_file(name):
            raise MissingInput(f"{what} {self.location(name)!r} does not exist")
        with self.filesystem.open_input_stream(self.location(name)) as stream:
            return stream.read()

    # -- typed artefacts ---------------------------------------------------------------------------------------

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode())

    def read_text(self, name: str, what: str = "file") -> str:
        return self.read_bytes(name, what).decode()

    def write_json(self, name: str, data: Any) -> None:
        self.write_text(name, json.dumps(data, indent=2, default=float) + "\n")

    def read_json(self, name: str, what: str = "JSON file") -> Any:
        raw = self.read_bytes(name, what)
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{what} {self.location(name)!r} is not valid JSON ({exc}); regenerate it") from exc

    def write_parquet(self, name: str, table: Any, metadata: Mapping[str, str]) -> None:
        """A pyarrow ``Table`` (or a pandas frame) as Parquet, ``metadata`` added to its schema's metadata."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not isinstance(table, pa.Table):
            table = pa.Table.from_pandas(table, preserve_index=False)
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        self.write_bytes(name, sink.getvalue().to_pybytes())

    def read_parquet(self, name: str, what: str = "results file"):
        """A Parquet artefact as a pandas frame."""
        import pyarrow.parquet as pq

        if not self.is_file(name):
            raise MissingInput(f"{what} {self.location(name)!r} does not exist")
        return pq.read_table(self.location(name), filesystem=self.filesystem).to_pandas()

    def write_checkpoint(self, name: str, tensors: Mapping[str, Any], header: Mapping[str, Any]) -> None:
        """Tensors as safetensors with ``header`` as the flora-ray JSON metadata."""
        from safetensors.torch import save

        from flora_ray.storage.files import METADATA_KEY

        data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        self.write_bytes(name, save(data, metadata={METADATA_KEY: json.dumps(header)}))

    def read_checkpoint(self, name: str, device: str = "cpu") -> tuple[dict[str, Any], dict[str, Any]]:
        """``(tensors, header)`` of a safetensors artefact; never unpickles anything."""
        from safetensors.torch import load

        raw = self.read_bytes(name, "checkpoint")
        header = parse_checkpoint_header(io.BytesIO(raw), self.location(name))
        try:
            tensors = load(raw)
        except Exception as exc:  # safetensors raises its own error types for corrupt data
            raise InputError(f"cannot read checkpoint {self.location(name)!r} (corrupt or truncated): {exc}") from exc
        return {k: v.to(device) for k, v in tensors.items()}, header

    def read_checkpoint_header(self, name: str) -> dict[str, Any]:
        """The flora-ray header of a safetensors artefact, reading only the file's head."""
        if not self.is_file(name):
            raise MissingInput(f"checkpoint {self.location(name)!r} does not exist")
        with self.filesystem.open_input_file(self.location(name)) as stream:
            return parse_checkpoint_header(stream, self.location(name))

    def save_figure(self, name: str, fig: Any) -> None:
        """A matplotlib figure as PNG (the figure is closed afterwards)."""
        import matplotlib.pyplot as plt

        buffer = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buffer, format="png", dpi=120)
        plt.close(fig)
        self.write_bytes(name, buffer.getvalue())

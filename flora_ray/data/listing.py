"""An image folder on any filesystem pyarrow reads (local, ``s3://``, ``gs://``, ...), listed once.

``data.root`` of ``imagefolder`` may be a local directory or a URI. A URI is never copied to the nodes: the driver
lists it once (``list_image_folder``: the class folders of ``train/`` and ``val/``, every image file with its size)
and keeps the listing in the run (``ARTEFACTS.data_listing``, written by the preflight), so that every process of the
run derives the same classes and the same stratified search split from the same file list, and a resumed run reads
the files it started with. The images are then read one by one, where they are decoded: by ``FolderImages`` (the
loader path: DataLoader workers, evaluators, filter tasks) or by Ray Data's ``read_images`` (``data.pipeline:
ray_data``), both through the filesystem ``data_filesystem`` resolves in their own process.

The order of the listing is torchvision's ``ImageFolder``'s (classes sorted; within a class the files sorted by
folder, then name; the same extensions), so a folder gives the same class indices, samples and split locally and in
a bucket. ``s3://`` and ``gs://`` are configured as ``run.storage`` is (``flora_ray.storage.filesystems``: the AWS
variables, ``endpoint_override``, short timeouts; almost-URIs such as ``s3:/bucket`` refused); other schemes go to
``pyarrow.fs.FileSystem.from_uri``.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from torch.utils.data import Dataset

from flora_ray.errors import InputError, MissingInput

if TYPE_CHECKING:
    import pyarrow.fs

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
"""The image files of a class folder (torchvision's ``IMG_EXTENSIONS``)."""
SPLITS = ("train", "val")
LAYOUT = "expected an ImageNet-style layout root/train/<class>/*.jpg and root/val/<class>/*.jpg"
METADATA_KEY = b"flora_ray_listing"


def is_remote(root: str | os.PathLike | None) -> bool:
    """Whether ``data.root`` names a URI (other than ``file://``) rather than a directory of this machine."""
    from flora_ray.storage.filesystems import uri_scheme

    scheme = uri_scheme(os.fspath(root)) if root is not None else None
    return scheme is not None and scheme != "file"


def data_filesystem(root: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """The filesystem and base path of ``data.root``, without network access.

    Raises:
        InputError: One line naming ``data.root``: an almost-URI, a URI without a bucket, an unknown scheme.
    """
    from flora_ray.storage.filesystems import StorageLocationError, resolve_filesystem, uri_scheme

    scheme = uri_scheme(root)
    if scheme in (None, "file", "s3", "gs", "gcs"):
        try:
            fs, path = resolve_filesystem(root)
        except StorageLocationError as exc:
            raise InputError(f"data.root {root!r} is not a usable location: {exc.cause}; {exc.advice}") from None
        return fs, path.rstrip("/")
    import pyarrow.fs as pafs

    try:
        fs, path = pafs.FileSystem.from_uri(root)
    except (ValueError, OSError) as exc:
        raise InputError(
            f"data.root {root!r} is not a usable location: pyarrow has no filesystem for it "
            f"({' '.join(str(exc).split())[:120]}); use a local path, s3://bucket/prefix or gs://bucket/prefix"
        ) from None
    return fs, path.rstrip("/")


@dataclass(frozen=True)
class FolderListing:
    """The classes and image files of an image folder: ``paths`` relative to ``root``, per split."""

    root: str
    classes: tuple[str, ...]
    paths: dict[str, tuple[str, ...]]
    labels: dict[str, np.ndarray]
    sizes: dict[str, np.ndarray]

    def to_table(self) -> Any:
        """A pyarrow Table (``split``, ``path``, ``label``, ``size``) with the root and classes in its metadata."""
        import pyarrow as pa

        columns: dict[str, list] = {"split": [], "path": [], "label": [], "size": []}
        for split in SPLITS:
            columns["split"] += [split] * len(self.paths[split])
            columns["path"] += list(self.paths[split])
            columns["label"] += self.labels[split].tolist()
            columns["size"] += self.sizes[split].tolist()
        table = pa.table(
            {
                "split": pa.array(columns["split"]).dictionary_encode(),
                "path": pa.array(columns["path"], pa.string()),
                "label": pa.array(columns["label"], pa.int32()),
                "size": pa.array(columns["size"], pa.int64()),
            }
        )
        header = json.dumps({"root": self.root, "classes": list(self.classes)})
        return table.replace_schema_metadata({METADATA_KEY: header.encode()})

    @classmethod
    def from_table(cls, table: Any) -> FolderListing:
        header = json.loads(table.schema.metadata[METADATA_KEY])
        frame = table.to_pandas()
        split = frame["split"].astype(str)
        parts = {s: frame[split == s] for s in SPLITS}
        return cls(
            root=header["root"],
            classes=tuple(header["classes"]),
            paths={s: tuple(p["path"]) for s, p in parts.items()},
            labels={s: p["label"].to_numpy(np.int64) for s, p in parts.items()},
            sizes={s: p["size"].to_numpy(np.int64) for s, p in parts.items()},
        )


def list_image_folder(root: str) -> FolderListing:
    """List ``root/train`` and ``root/val`` (one recursive listing each) into a ``FolderListing``.

    Raises:
        InputError: One line naming ``data.root``: a bad URI, a missing bucket, an unreachable endpoint, no
            ``train/`` or ``val/``, no class folders, a class without images, different classes in the two splits.
    """
    fs, base = data_filesystem(root)
    _check_bucket(fs, root, base)
    found = {split: _list_split(fs, root, base, split) for split in SPLITS}
    classes = sorted(found["train"])
    if classes != sorted(found["val"]):
        differ = sorted(set(found["train"]) ^ set(found["val"]))[:5]
        raise InputError(
            f"image folder {root!r}: train/ and val/ have different class folders ({differ} ...); "
            "give both the same classes"
        )
    paths, labels, sizes = {}, {}, {}
    for split in SPLITS:
        rows = [(path, label, size) for label, c in enumerate(classes) for path, size in found[split][c]]
        paths[split] = tuple(r[0] for r in rows)
        labels[split] = np.array([r[1] for r in rows], dtype=np.int64)
        sizes[split] = np.array([r[2] for r in rows], dtype=np.int64)
    return FolderListing(root, tuple(classes), paths, labels, sizes)


def list_classes(root: str) -> list[str]:
    """The sorted class folders of ``root/train`` (one non-recursive listing; ``root/val`` is not checked)."""
    import pyarrow.fs as pafs

    fs, base = data_filesystem(root)
    infos = _get_file_info(fs, root, pafs.FileSelector(f"{base}/train", allow_not_found=True))
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)
    if not names:
        raise MissingInput(f"image folder {root!r} has no class folders in train/; {LAYOUT}")
    return names


def run_listing(cfg: Any, record: bool = False) -> FolderListing | None:
    """The listing of the run's ``data.root`` when it is a URI (None for a local folder or another data set): read
    from the run's ``ARTEFACTS.data_listing``, else listed here and, with ``record`` (the driver's preflight),
    written there for every other process of the run."""
    import pyarrow.parquet as pq

    from flora_ray.storage.run_store import ARTEFACTS, RunStore

    if cfg.data.name != "imagefolder" or not is_remote(cfg.data.root):
        return None
    store = RunStore.for_config(cfg)
    if store.is_file(ARTEFACTS.data_listing):
        table = pq.read_table(store.location(ARTEFACTS.data_listing), filesystem=store.filesystem)
        listing = FolderListing.from_table(table)
        if listing.root == cfg.data.root:
            return listing
    listing = list_image_folder(cfg.data.root)
    if record:
        store.write_parquet(ARTEFACTS.data_listing, listing.to_table(), {})
    return listing


def run_classes(cfg: Any) -> tuple[str, ...] | None:
    """The class folders of the run's ``data.root`` when it is a URI: from the run's listing (its footer only), else
    one listing of ``train/``. None for a local folder or another data set."""
    import pyarrow.parquet as pq

    from flora_ray.storage.run_store import ARTEFACTS, RunStore

    if cfg.data.name != "imagefolder" or not is_remote(cfg.data.root):
        return None
    store = RunStore.for_config(cfg)
    if store.is_file(ARTEFACTS.data_listing):
        schema = pq.read_schema(store.location(ARTEFACTS.data_listing), filesystem=store.filesystem)
        header = json.loads(schema.metadata[METADATA_KEY])
        if header["root"] == cfg.data.root:
            return tuple(header["classes"])
    return tuple(list_classes(cfg.data.root))


def _list_split(fs: pyarrow.fs.FileSystem, root: str, base: str, split: str) -> dict[str, list[tuple[str, int]]]:
    """``{class: [(path relative to root, size), ...]}`` of ``base/split``, in ``ImageFolder``'s order."""
    import pyarrow.fs as pafs

    top = f"{base}/{split}"
    infos = _get_file_info(fs, root, pafs.FileSelector(top, recursive=True, allow_not_found=True))
    if not infos:
        raise MissingInput(f"image folder {root!r} has no {split}/ directory (or it is empty); {LAYOUT}")
    files: dict[str, list[tuple[str, str, int]]] = {}
    for info in infos:
        relative = info.path[len(top) + 1 :]
        if "/" not in relative and info.type != pafs.FileType.Directory:
            continue  # a file beside the class folders: not an image of any class (as ImageFolder)
        name = relative.split("/", 1)[0]
        members = files.setdefault(name, [])
        if info.type == pafs.FileType.File and info.base_name.lower().endswith(IMG_EXTENSIONS):
            path = f"{split}/{relative}"
            members.append((posixpath.dirname(path), path, int(info.size or 0)))
    if not files:
        raise MissingInput(f"image folder {root}/{split} has no class folders; {LAYOUT}")
    empty = sorted(name for name, members in files.items() if not members)
    if empty:
        raise MissingInput(
            f"image folder {root}/{split} has class folders without image files ({empty[:5]} ...); "
            f"add images ({', '.join(IMG_EXTENSIONS)}) or remove the folders"
        )
    return {name: [(p, s) for _, p, s in sorted(members)] for name, members in files.items()}


def _check_bucket(fs: pyarrow.fs.FileSystem, root: str, base: str) -> None:
    """An object store's bucket must exist (a listing under a missing bucket may just come back empty)."""
    import pyarrow.fs as pafs

    if fs.type_name in ("s3", "gcs"):
        bucket = base.split("/", 1)[0]
        info = _get_file_info(fs, root, bucket)
        if info.type == pafs.FileType.NotFound:
            raise MissingInput(f"data.root {root!r} cannot be listed: bucket {bucket!r} does not exist; fix the URI")


def _get_file_info(fs: pyarrow.fs.FileSystem, root: str, selector: Any) -> list:
    """``fs.get_file_info(selector)`` (a ``FileSelector`` or a path), every failure one ``InputError`` line naming
    ``data.root``."""
    from flora_ray.storage.filesystems import explain_failure

    try:
        return fs.get_file_info(selector)
    except OSError as exc:
        cause, advice = explain_failure(exc, fs, getattr(selector, "base_dir", selector))
        raise InputError(f"data.root {root!r} cannot be listed: {cause}; {advice}") from None


class FolderImages(Dataset):
    """The images of one split of a listing as a torch Dataset of ``(transform(PIL RGB image), label)``, each file
    read through the filesystem of ``root`` (resolved again in every process that reads: DataLoader workers, Ray
    workers). ``targets``, ``classes`` and ``samples`` as torchvision's ``ImageFolder``."""

    def __init__(
        self, root: str, paths: Sequence[str], labels: np.ndarray, classes: Sequence[str], transform: Any = None
    ) -> None:
        self.root, self.paths, self.classes, self.transform = root, tuple(paths), list(classes), transform
        self.targets = [int(v) for v in labels]
        self._fs: tuple[int, Any, str] | None = None

    @property
    def samples(self) -> list[tuple[str, int]]:
        return [(f"{self.root.rstrip('/')}/{p}", t) for p, t in zip(self.paths, self.targets, strict=True)]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        from PIL import Image

        fs, base = self._filesystem()
        with fs.open_input_file(f"{base}/{self.paths[index]}") as stream:
            data = stream.read()
        with Image.open(io.BytesIO(data)) as img:
            image = img.convert("RGB")
        return (self.transform(image) if self.transform is not None else image), self.targets[index]

    def _filesystem(self) -> tuple[Any, str]:
        if self._fs is None or self._fs[0] != os.getpid():  # never a filesystem inherited through fork
            self._fs = (os.getpid(), *data_filesystem(self.root))
        return self._fs[1], self._fs[2]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fs": None}

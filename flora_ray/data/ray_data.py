"""Decode and augment on any CPU of the cluster with Ray Data (``data.pipeline: ray_data``).

A GPU node reserves a fixed number of CPUs per training worker; when JPEG decoding and RandAugment need more than
that (a fast GPU, a cheap subnet), the loader-worker pipeline starves the GPU. This pipeline moves the CPU part of
the image-folder transform (``data.transforms``, the recipe's exact timm transform, stopping at uint8) into Ray
Data tasks that run wherever CPUs are free (CPU-only worker nodes the autoscaler adds), streams the uint8 batches
to the training workers (``streaming_split``, equal shares) and leaves normalisation and random erasing to the
device (``Preprocess``), as the loader path does.

Ray Data's image reader (``read_images``' datasource) decodes the training files straight from ``data.root``'s
filesystem, a local (shared) folder or a bucket (``data.listing``: the files come from the driver's listing; nothing
is copied to the nodes). The file list is shuffled per epoch by Ray Data with a seed from the run
(``FileShuffleConfig``: reproducible, a new order every epoch); the augmentation's random draws happen in whichever task decodes an image, so a run is
statistically, not bitwise, reproducible (the loader path is bitwise reproducible).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from flora_ray.config import Config, DataConfig
from flora_ray.data.listing import FolderListing


def train_files(cfg: Config) -> tuple[Any, str, list[str], np.ndarray, FolderListing]:
    """The training split's files: the filesystem and base path of ``data.root``, the files' paths on it and their
    sizes, and the folder's listing: the run's (a URI, listed once by the driver's preflight) or one listing of a local folder,
    in ``ImageFolder``'s order, so the split is the loader path's."""
    from flora_ray.data.datasets import train_search_indices
    from flora_ray.data.listing import data_filesystem, list_image_folder, run_listing

    listing = run_listing(cfg) or list_image_folder(cfg.data.root)
    fs, base = data_filesystem(cfg.data.root)
    train_idx, _ = train_search_indices(listing.labels["train"], cfg.data)
    paths = [f"{base}/{listing.paths['train'][i]}" for i in train_idx]
    return fs, base, paths, listing.sizes["train"][train_idx], listing


def train_dataset(cfg: Config) -> tuple[Any, int]:
    """The Ray Dataset of decoded, augmented uint8 training images of ``cfg``, and its number of rows.

    Ray Data's image reader decodes the files where its tasks run, straight from ``data.root``'s filesystem (a
    bucket: nothing is copied to the nodes); the file order is shuffled per epoch with a seed from the run. The
    file sizes come from the listing, so Ray asks the store nothing per file before reading.
    """
    import ray.data
    from ray.data import FileShuffleConfig
    from ray.data._internal.datasource.image_datasource import ImageDatasource

    fs, base, paths, sizes, listing = train_files(cfg)
    source = ImageDatasource(
        paths,
        mode="RGB",
        include_paths=True,
        filesystem=fs,
        meta_provider=_listed_sizes(dict(zip(paths, sizes.tolist(), strict=True))),
        shuffle=FileShuffleConfig(seed=cfg.run.seed, reseed_after_execution=True),
        file_extensions=None,  # the listing already holds only image files
    )
    blocks = max(1, min(len(paths) // 256, 4096))  # parallelism of the read tasks: about 256 images per block
    ds = ray.data.read_datasource(source, override_num_blocks=blocks, num_cpus=1, concurrency=cfg.data.decoders)
    ds = ds.map_batches(
        decode_batch,
        fn_kwargs={"data": cfg.data, "train_dir": f"{base}/train/", "classes": listing.classes},
        batch_format="numpy",
        batch_size=64,
        num_cpus=1,
        concurrency=cfg.data.decoders,
    )
    return ds, len(paths)


def _listed_sizes(sizes: dict[str, int]) -> Any:
    """Ray Data's image metadata provider, answering every file's size from the listing (no request per file; Ray's
    own asks the store for each file of a list that does not share one folder: a million requests for ImageNet)."""
    from ray.data._internal.datasource.image_datasource import ImageFileMetadataProvider

    class ListedSizes(ImageFileMetadataProvider):
        def expand_paths(self, paths, filesystem, partitioning=None, ignore_missing_paths=False):
            for path in paths:
                yield path, sizes[path]
            sizes.clear()  # only needed once, on the driver: not shipped with the read tasks

    return ListedSizes()


@functools.lru_cache(maxsize=4)
def _train_transform(data: DataConfig):
    from flora_ray.data.datasets import norm_stats
    from flora_ray.data.transforms import folder_transforms

    mean, std = norm_stats(data)
    return folder_transforms(data.img_size, mean, std, data.augment, pixels=True)[0]


def decode_batch(
    batch: dict[str, np.ndarray], data: DataConfig, train_dir: str, classes: tuple[str, ...]
) -> dict[str, np.ndarray]:
    """Augment one batch of Ray Data's decoded ``{"image": RGB (H, W, 3), "path"}`` rows into uint8
    ``(B, 3, H, W)`` images and their labels (the class folder below ``train_dir`` in the path)."""
    from PIL import Image

    transform = _train_transform(data)
    index = {name: i for i, name in enumerate(classes)}
    images = [transform(Image.fromarray(np.asarray(image, dtype=np.uint8))).numpy() for image in batch["image"]]
    labels = [index[str(path)[len(train_dir) :].split("/", 1)[0]] for path in batch["path"]]
    return {"image": np.stack(images), "label": np.asarray(labels, dtype=np.int64)}


class ShardBatches:
    """A training worker's share of the Ray Dataset as ``(uint8 images, labels)`` batches: ``len`` is known in
    advance (``rows`` of this worker, full batches only), each iteration is one epoch."""

    def __init__(self, shard: Any, batch_size: int, rows: int) -> None:
        self.shard, self.batch_size, self.rows = shard, batch_size, rows

    def __len__(self) -> int:
        return self.rows // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = self.shard.iter_torch_batches(batch_size=self.batch_size, drop_last=True, device="auto")
        for index, batch in enumerate(batches):  # consumed to the end: every split finishes the epoch together
            if index < len(self):
                yield batch["image"], batch["label"]

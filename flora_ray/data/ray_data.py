"""Decode and augment on any CPU of the cluster with Ray Data (``data.pipeline: ray_data``).

A GPU node reserves a fixed number of CPUs per training worker; when JPEG decoding and RandAugment need more than
that (a fast GPU, a cheap subnet), the loader-worker pipeline starves the GPU. This pipeline moves the CPU part of
the image-folder transform (``data.transforms``, the recipe's exact timm transform, stopping at uint8) into Ray
Data tasks that run wherever CPUs are free (CPU-only worker nodes the autoscaler adds), streams the uint8 batches
to the training workers (``streaming_split``, equal shares) and leaves normalisation and random erasing to the
device (``Preprocess``), as the loader path does.

The file list is shuffled per epoch by Ray Data with a seed from the run (``RandomSeedConfig``: reproducible, a new
order every epoch); the augmentation's random draws happen in whichever task decodes an image, so a run is
statistically, not bitwise, reproducible (the loader path is bitwise reproducible).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from flora_ray.config import Config, DataConfig


def train_rows(cfg: Config) -> tuple[list[str], np.ndarray]:
    """The training split's image paths and labels (one scan of the image folder, in the driver)."""
    from flora_ray.data.datasets import build_datasets, labels_of

    train = build_datasets(cfg.data).train  # LabelledSubset of an ImageFolder
    folder = train.dataset
    paths = [folder.samples[i][0] for i in train.indices]
    return paths, labels_of(train)


def train_dataset(cfg: Config) -> tuple[Any, int]:
    """The Ray Dataset of decoded, augmented uint8 training images of ``cfg``, and its number of rows."""
    import pandas as pd
    import ray.data
    from ray.data import RandomSeedConfig

    paths, labels = train_rows(cfg)
    rows = pd.DataFrame({"path": paths, "label": labels.astype(np.int64)})
    blocks = max(1, min(len(rows) // 256, 4096))  # parallelism of the decode tasks: about 256 images per block
    ds = ray.data.from_pandas(rows).repartition(blocks)
    ds = ds.random_shuffle(seed=RandomSeedConfig(seed=cfg.run.seed, reseed_after_execution=True))
    ds = ds.map_batches(
        decode_batch,
        fn_kwargs={"data": cfg.data},
        batch_format="numpy",
        batch_size=64,
        num_cpus=1,
        concurrency=cfg.data.decoders,
    )
    return ds, len(rows)


@functools.lru_cache(maxsize=4)
def _train_transform(data: DataConfig):
    from flora_ray.data.datasets import norm_stats
    from flora_ray.data.transforms import folder_transforms

    mean, std = norm_stats(data)
    return folder_transforms(data.img_size, mean, std, data.augment, pixels=True)[0]


def decode_batch(batch: dict[str, np.ndarray], data: DataConfig) -> dict[str, np.ndarray]:
    """Decode and augment one batch of ``{"path", "label"}`` rows into uint8 ``(B, 3, H, W)`` images."""
    from PIL import Image

    transform = _train_transform(data)
    images = []
    for path in batch["path"]:
        with Image.open(path) as img:
            images.append(transform(img.convert("RGB")).numpy())
    return {"image": np.stack(images), "label": np.asarray(batch["label"], dtype=np.int64)}


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

"""The data layer: Fashion-MNIST, scikit-learn digits and ImageNet-style folders behind one interface.

``build_datasets(DataConfig(...))`` returns three torch Datasets: ``train`` (supernet training), ``search`` (a
seeded, class-balanced split carved out of the official training data; filtering and the search score on it) and
``test`` (the official test/val split, touched only for final reporting). ``train`` and ``search`` are disjoint and
together are the official training set (before the optional ``train_subset``).

Fashion-MNIST and digits live in memory as uint8 images and are resized, augmented (random crop with padding and
horizontal flip, train split only) and normalised per item. Image folders use timm's transforms
(``data.transforms``): the FLORA reference recipe (RandAugment m9, random erasing 0.25, no mixup/cutmix) for training
and timm's eval transform otherwise. An image folder at a URI (``s3://``, ``gs://``) is read file by file from
its listing (``data.listing``: the same classes, split and images as the same folder on disk).

``pixels`` names the splits whose items stay uint8 ``(C, H, W)`` (the lean path of training loaders and evaluators);
``DataSplits.preprocess`` turns a batch of them into what the model sees, on the batch's device.
``stratified_indices`` picks evaluation subsets with every class in proportion.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from flora_ray.config import DataConfig
from flora_ray.data.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist
from flora_ray.data.listing import FolderImages, FolderListing, is_remote, list_classes, list_image_folder
from flora_ray.data.transforms import RE_PROB, Preprocess, folder_transforms
from flora_ray.errors import InputError, MissingInput

logger = logging.getLogger(__name__)

DIGITS_TEST_FRACTION = 0.2
DIGITS_TEST_SEED = 0  # the digits test split is fixed, whatever DataConfig.seed is
# Per-dataset (mean, std) of the grey values in [0, 1]; image folders use timm's ImageNet defaults.
GREY_STATS = {"fashion_mnist": (0.2860, 0.3530), "digits": (0.3053, 0.3760)}


@dataclass(frozen=True)
class DataSplits:
    """The three splits of one dataset; every item is ``(image tensor (C, H, W), int label)``."""

    train: Dataset
    search: Dataset
    test: Dataset
    num_classes: int
    class_names: tuple[str, ...]
    preprocess: Preprocess


SPLIT_NAMES = ("train", "search", "test")


def build_datasets(cfg: DataConfig, pixels: tuple[str, ...] = (), listing: FolderListing | None = None) -> DataSplits:
    """Load the data ``cfg`` names and split it into train / search / test.

    ``pixels``: the splits whose items are uint8 ``(C, H, W)`` tensors (``preprocess`` makes them model inputs);
    the other splits yield normalised float tensors. ``listing``: the file listing of an image folder at a URI
    (``data.listing``; the run's, from ``run_listing``); without it a URI is listed here.
    """
    unknown = set(pixels) - set(SPLIT_NAMES)
    if unknown:
        raise ValueError(f"pixels={pixels!r} names unknown splits {sorted(unknown)}; use {SPLIT_NAMES}")
    if cfg.name == "imagefolder":
        return _build_imagefolder(cfg, pixels, listing)
    if cfg.name == "fashion_mnist":
        train_x, train_y, test_x, test_y = load_fashion_mnist(cfg.root)
        class_names = FASHION_MNIST_CLASSES
    else:
        train_x, train_y, test_x, test_y = load_digits()
        class_names = tuple(str(d) for d in range(10))
    train_idx, search_idx = train_search_indices(train_y, cfg)
    mean, std = norm_stats(cfg)

    def make(images: np.ndarray, labels: np.ndarray, augment: bool, split: str) -> InMemoryImageDataset:
        return InMemoryImageDataset(
            images, labels, cfg.img_size, cfg.in_chans, mean, std, augment, pixels=split in pixels
        )

    return DataSplits(
        train=make(train_x[train_idx], train_y[train_idx], cfg.augment, "train"),
        search=make(train_x[search_idx], train_y[search_idx], False, "search"),
        test=make(test_x, test_y, False, "test"),
        num_classes=len(class_names),
        class_names=class_names,
        preprocess=preprocess_for(cfg),
    )


def norm_stats(cfg: DataConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` per channel of ``cfg``'s data: the configured ones or the dataset's defaults."""
    if cfg.name == "imagefolder":
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        return _norm_stats(cfg, (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
    return _norm_stats(cfg, GREY_STATS[cfg.name])


def preprocess_for(cfg: DataConfig) -> Preprocess:
    """The device-side preprocessing of ``cfg``'s pixel items, without loading any data."""
    erase = RE_PROB if cfg.name == "imagefolder" and cfg.augment else 0.0
    return Preprocess(*norm_stats(cfg), erase)


def stratified_indices(labels: Sequence[int] | np.ndarray, n_images: int, seed: int) -> np.ndarray:
    """``min(n_images, len(labels))`` sample indices with every class in proportion to its share of ``labels``.

    Each class gets ``floor(n * share)`` images, the remaining ones go to the largest remainders (ties broken by
    the seed); the members are a seeded random choice within each class. Sorted int64 indices.
    """
    labels = np.asarray(labels)
    n = min(int(n_images), len(labels))
    if n >= len(labels):
        return np.arange(len(labels), dtype=np.int64)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = n * counts / len(labels)
    take = np.floor(quota).astype(np.int64)
    short = n - int(take.sum())
    if short:
        order = np.lexsort((rng.random(len(classes)), -(quota - take)))  # largest remainder first, seeded ties
        take[order[:short]] += 1
    chosen = [
        rng.choice(np.flatnonzero(labels == c), size=k, replace=False) for c, k in zip(classes, take, strict=True)
    ]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def labels_of(dataset: Dataset) -> np.ndarray:
    """The class label of every item of one of our datasets (``targets``), without loading an image."""
    targets = getattr(dataset, "targets", None)
    if targets is None and isinstance(dataset, Subset):
        return labels_of(dataset.dataset)[np.asarray(dataset.indices)]
    if targets is None:
        raise TypeError(f"{type(dataset).__name__} has no targets; evaluation subsets need the labels")
    return np.asarray(targets, dtype=np.int64)


def eval_subset(dataset: Dataset, max_images: int | None, seed: int) -> Dataset:
    """``dataset`` itself when ``max_images`` covers it, else a stratified, seeded ``LabelledSubset`` of it."""
    if max_images is None or max_images >= len(dataset):
        return dataset
    return LabelledSubset(dataset, stratified_indices(labels_of(dataset), max_images, seed).tolist())


def calibration_images(
    cfg: DataConfig, n_images: int, workers: int = 0, listing: FolderListing | None = None
) -> tuple[torch.Tensor, Preprocess]:
    """``n_images`` of the train split for BatchNorm recalibration (``core.batchnorm``), and what makes them model
    inputs: un-augmented, class-stratified and seeded by ``data.seed`` (the same images for every subnet and every
    process), as uint8 pixels ``(N, C, H, W)`` decoded by ``workers`` loader processes. Never search or test
    images: those score the subnets."""
    clean = dataclasses.replace(cfg, augment=False)
    subset = eval_subset(build_datasets(clean, pixels=("train",), listing=listing).train, n_images, cfg.seed)
    batches = [x for x, _ in DataLoader(subset, batch_size=256, num_workers=workers)]
    return torch.cat(batches), preprocess_for(clean)


def class_balanced_split(
    labels: np.ndarray, fraction: float | None = None, per_class: int | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split sample indices into ``(rest, carved)``, carving the same share of every class.

    Args:
        labels: Integer class label per sample.
        fraction: Share of each class to carve, in (0, 1]: ``round(fraction * n_class)``, at least 1.
        per_class: Samples per class to carve instead of a fraction; every class needs at least that many.
        seed: The split is a function of ``labels`` and ``seed`` only.

    Returns:
        Two sorted, disjoint int64 index arrays that together cover ``range(len(labels))``.
    """
    if (fraction is None) == (per_class is None):
        raise ValueError(f"give exactly one of fraction={fraction!r} and per_class={per_class!r}")
    if fraction is not None and not (_is_real(fraction) and 0 < fraction <= 1):
        raise ValueError(f"fraction={fraction!r} is out of range: it must be in (0, 1]")
    if per_class is not None and not (_is_int(per_class) and per_class >= 1):
        raise ValueError(f"per_class={per_class!r} is invalid: it must be a positive integer")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    carved = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        if per_class is not None:
            if per_class > len(members):
                raise ValueError(f"per_class={per_class} but class {cls} has only {len(members)} samples; lower it")
            k = per_class
        else:
            k = min(len(members), max(1, int(np.floor(fraction * len(members) + 0.5))))
        carved.append(rng.permutation(members)[:k])
    carved_idx = np.sort(np.concatenate(carved)) if carved else np.zeros(0, dtype=np.int64)
    mask = np.ones(len(labels), dtype=bool)
    mask[carved_idx] = False
    return np.flatnonzero(mask).astype(np.int64), carved_idx.astype(np.int64)


def make_loader(
    dataset: Dataset, batch_size: int, shuffle: bool, seed: int, num_workers: int = 0, drop_last: bool = False
) -> DataLoader:
    """A plain DataLoader whose shuffling and worker seeds come from ``seed``."""
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is invalid: it must be a positive integer")
    if not _is_int(num_workers) or num_workers < 0:
        raise ValueError(f"num_workers={num_workers!r} is invalid: it must be a non-negative integer")
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, drop_last=drop_last,
        generator=generator,
    )  # fmt: skip


class InMemoryImageDataset(Dataset):
    """Grey uint8 images ``(N, H, W)`` in memory, resized, augmented and normalised per item.

    ``pixels=True``: items stay uint8 (resized images rounded back to uint8), to be normalised by ``Preprocess``.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        img_size: int,
        in_chans: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        augment: bool = False,
        pixels: bool = False,
    ) -> None:
        if images.ndim != 3 or images.dtype != np.uint8 or len(images) != len(labels):
            raise ValueError(f"expected uint8 images (N, H, W) and N labels, got {images.shape} {images.dtype}")
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.targets = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.img_size, self.in_chans, self.augment, self.pixels = img_size, in_chans, augment, pixels
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.images[index][None, None]
        if x.shape[-1] != self.img_size or x.shape[-2] != self.img_size:
            x = F.interpolate(
                x.float().div_(255.0), size=(self.img_size, self.img_size), mode="bilinear", antialias=True
            )
            if self.pixels:
                x = x.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)
        x = x[0]
        if self.augment:
            x = _random_crop_flip(x, pad=max(1, self.img_size // 8))
        x = x.expand(self.in_chans, -1, -1)
        if self.pixels:
            return x.contiguous(), int(self.targets[index])
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        return (x - self.mean) / self.std, int(self.targets[index])


class LabelledSubset(Subset):
    """A ``Subset`` that keeps its samples' ``targets``."""

    @property
    def targets(self) -> list[int]:
        base = self.dataset.targets
        return [int(base[i]) for i in self.indices]


def load_digits() -> tuple[np.ndarray, ...]:
    """scikit-learn's 8x8 digits as ``(train_images, train_labels, test_images, test_labels)``, uint8 in 0..255.

    Digits has no official test split; a fixed class-balanced ``DIGITS_TEST_FRACTION`` of it is the test split.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = class_balanced_split(labels, fraction=DIGITS_TEST_FRACTION, seed=DIGITS_TEST_SEED)
    return images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]


def _build_imagefolder(cfg: DataConfig, pixels: tuple[str, ...], listing: FolderListing | None) -> DataSplits:
    from torchvision.datasets import ImageFolder

    mean, std = norm_stats(cfg)
    transforms = {
        lean: folder_transforms(cfg.img_size, mean, std, cfg.augment, pixels=lean)
        for lean in {s in pixels for s in SPLIT_NAMES}
    }
    if listing is not None or is_remote(cfg.root):  # read file by file through the URI's filesystem
        listing = listing if listing is not None else list_image_folder(cfg.root)
        if listing.root != cfg.root:
            raise ValueError(f"the listing is of {listing.root!r}, not of data.root {cfg.root!r}")
        train_all, test = (
            FolderImages(cfg.root, listing.paths[split], listing.labels[split], listing.classes, transform)
            for split, transform in (
                ("train", transforms["train" in pixels][0]),
                ("val", transforms["test" in pixels][1]),
            )
        )
    else:
        root = Path(cfg.root)
        image_folder_classes(root)
        train_all = ImageFolder(str(root / "train"), transform=transforms["train" in pixels][0])
        test = ImageFolder(str(root / "val"), transform=transforms["test" in pixels][1])
    search_all = copy.copy(train_all)  # same scanned samples, eval transform
    search_all.transform = transforms["search" in pixels][1]
    train_idx, search_idx = train_search_indices(np.asarray(train_all.targets), cfg)
    return DataSplits(
        train=LabelledSubset(train_all, train_idx.tolist()),
        search=LabelledSubset(search_all, search_idx.tolist()),
        test=test,
        num_classes=len(train_all.classes),
        class_names=tuple(train_all.classes),
        preprocess=preprocess_for(cfg),
    )


def num_classes(cfg: DataConfig) -> int:
    """The data set's class count, without loading it (image folders: the class folders of ``train/``)."""
    if cfg.name == "imagefolder" and is_remote(cfg.root):
        return len(list_classes(cfg.root))
    if cfg.name == "imagefolder":
        if cfg.root is None or not Path(cfg.root).is_dir():
            raise MissingInput(f"data.root {cfg.root!r} is not a directory with train/ and val/ class folders")
        return len(image_folder_classes(Path(cfg.root)))
    return 10  # Fashion-MNIST and digits


def image_folder_classes(root: Path) -> list[str]:
    """The sorted class folder names of an image folder; ``train/`` and ``val/`` must hold the same ones."""
    classes = {split: _class_dirs(root, split) for split in ("train", "val")}
    if classes["train"] != classes["val"]:
        raise InputError(
            f"image folder {str(root)!r}: train/ and val/ have different class folders "
            f"({sorted(set(classes['train']) ^ set(classes['val']))[:5]} ...); give both the same classes"
        )
    return classes["train"]


def _class_dirs(root: Path, split: str) -> list[str]:
    layout = "expected an ImageNet-style layout root/train/<class>/*.jpg and root/val/<class>/*.jpg"
    if not (root / split).is_dir():
        raise MissingInput(f"image folder {str(root)!r} has no {split}/ directory; {layout}")
    names = sorted(d.name for d in (root / split).iterdir() if d.is_dir())
    if not names:
        raise MissingInput(f"image folder {str(root / split)!r} has no class folders; {layout}")
    return names


def train_search_indices(labels: np.ndarray, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """Carve the search split out of the training labels, then keep ``train_subset`` of the rest."""
    if cfg.search_per_class is not None:
        train_idx, search_idx = class_balanced_split(labels, per_class=cfg.search_per_class, seed=cfg.seed)
    else:
        train_idx, search_idx = class_balanced_split(labels, fraction=cfg.search_fraction, seed=cfg.seed)
    if cfg.train_subset is not None and cfg.train_subset < 1:
        _, kept = class_balanced_split(labels[train_idx], fraction=cfg.train_subset, seed=cfg.seed + 1)
        train_idx = train_idx[kept]
    logger.info("%s: %d train, %d search samples", cfg.name, len(train_idx), len(search_idx))
    return train_idx, search_idx


def _random_crop_flip(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Zero-pad ``x`` (C, H, W) by ``pad``, crop a random H x W window and flip it horizontally half the time."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (pad, pad, pad, pad))
    top, left = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,)))
    x = padded[:, top : top + h, left : left + w]
    return x.flip(-1) if torch.rand(()) < 0.5 else x


def _norm_stats(cfg: DataConfig, default: tuple) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` with one value per channel, from ``cfg`` or ``default``."""

    def per_channel(values) -> tuple[float, ...]:
        values = tuple(float(v) for v in np.atleast_1d(values))
        return values * cfg.in_chans if len(values) == 1 else values[: cfg.in_chans]

    return per_channel(cfg.mean or default[0]), per_channel(cfg.std or default[1])


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)

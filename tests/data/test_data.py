"""Tests of the data layer: config validation, class-balanced splits, the three sources and the loader."""

import dataclasses
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flora_ray.data.datasets import (
    DataConfig,
    InMemoryImageDataset,
    build_datasets,
    class_balanced_split,
    load_digits,
    make_loader,
)
from flora_ray.data.fashion_mnist import FASHION_MNIST_DIRS, find_fashion_mnist, load_fashion_mnist
from flora_ray.testing import skip_unless_ci

# --- DataConfig -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, extra",
    [
        ("name", "mnist", {}),
        ("search_fraction", -0.1, {}),
        ("search_fraction", 0.0, {}),
        ("search_fraction", 1.0, {}),
        ("search_per_class", 0, {}),
        ("in_chans", 2, {}),
        ("in_chans", 1, {"name": "imagefolder", "root": "/x"}),
        ("img_size", 0, {}),
        ("img_size", 32.0, {}),
        ("seed", -1, {}),
        ("train_subset", 0.0, {}),
        ("train_subset", 1.5, {}),
        ("augment", "yes", {}),
        ("mean", (0.5, 0.5), {"in_chans": 3}),
        ("std", (0.0,), {}),
        ("std", (1.0, -1.0, 1.0), {}),
        ("mean", ("a",), {}),
        ("mean", 0.5, {}),
        ("root", None, {"name": "imagefolder"}),
    ],
)
def test_bad_config_names_the_field_and_value(field, value, extra):
    with pytest.raises(ValueError) as info:
        DataConfig(**{**extra, field: value})
    message = str(info.value)
    assert f"data.{field}={value!r}" in message and "must be" in message


def test_config_is_frozen_and_normalises_sequences():
    cfg = DataConfig(name="digits", in_chans=3, mean=[0.1, 0.2, 0.3], std=[1])
    assert cfg.mean == (0.1, 0.2, 0.3) and cfg.std == (1.0,)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1
    assert DataConfig(root=Path("/some/where")).root == "/some/where"


# --- class_balanced_split ---------------------------------------------------------------------------------------

LABELS = np.repeat(np.arange(5), [10, 37, 101, 3, 50])


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5, 1.0])
def test_fraction_split_is_a_balanced_partition(fraction):
    rest, carved = class_balanced_split(LABELS, fraction=fraction, seed=3)
    assert np.intersect1d(rest, carved).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([rest, carved])), np.arange(len(LABELS)))
    assert rest.dtype == carved.dtype == np.int64 and np.all(np.diff(carved) > 0)
    counts, sizes = np.bincount(LABELS[carved], minlength=5), np.bincount(LABELS)
    assert np.all(np.abs(counts - fraction * sizes) <= 1) and np.all(counts >= 1)


def test_per_class_split_takes_exactly_that_many():
    rest, carved = class_balanced_split(LABELS, per_class=3, seed=0)
    assert np.bincount(LABELS[carved]).tolist() == [3] * 5 and len(rest) == len(LABELS) - 15
    with pytest.raises(ValueError, match="class 3 has only 3 samples"):
        class_balanced_split(LABELS, per_class=4, seed=0)


def test_split_depends_only_on_the_seed():
    a = class_balanced_split(LABELS, fraction=0.2, seed=7)
    b = class_balanced_split(LABELS.copy(), fraction=0.2, seed=7)
    c = class_balanced_split(LABELS, fraction=0.2, seed=8)
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


@pytest.mark.parametrize("kwargs", [{}, {"fraction": 0.1, "per_class": 2}, {"fraction": 0.0}, {"per_class": 0}])
def test_split_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match=r"fraction|per_class"):
        class_balanced_split(LABELS, seed=0, **kwargs)


# --- digits -----------------------------------------------------------------------------------------------------


def test_digits_sizes_balance_and_fixed_test_split():
    train_x, train_y, _, test_y = load_digits()
    assert len(train_y) + len(test_y) == 1797 and len(test_y) == 359 and train_x.dtype == np.uint8
    assert train_x.shape[1:] == (8, 8) and train_x.max() == 255  # 16 grey levels scaled to 0..255
    assert np.all(np.abs(np.bincount(test_y) - 0.2 * np.bincount(np.concatenate([train_y, test_y]))) <= 1)
    a = build_datasets(DataConfig(name="digits", img_size=8, in_chans=1, seed=0))
    b = build_datasets(DataConfig(name="digits", img_size=8, in_chans=1, seed=1))
    assert torch.equal(a.test.images, b.test.images)  # the test split ignores the seed
    assert not torch.equal(a.search.images, b.search.images)
    assert (len(a.train), len(a.search), len(a.test)) == (1293, 145, 359) and a.num_classes == 10
    search_counts = np.bincount(a.search.targets.numpy())
    assert search_counts.max() - search_counts.min() <= 1


def test_digits_same_seed_same_split():
    a = build_datasets(DataConfig(name="digits", img_size=8, in_chans=1, seed=5))
    b = build_datasets(DataConfig(name="digits", img_size=8, in_chans=1, seed=5))
    assert torch.equal(a.search.images, b.search.images) and torch.equal(a.train.targets, b.train.targets)


def test_digits_train_subset_and_search_per_class():
    cfg = DataConfig(name="digits", img_size=8, in_chans=1, search_per_class=5, train_subset=0.5)
    splits = build_datasets(cfg)
    assert np.bincount(splits.search.targets.numpy()).tolist() == [5] * 10
    counts = np.bincount(splits.train.targets.numpy())
    assert len(splits.train) == pytest.approx((1438 - 50) / 2, abs=10) and counts.max() - counts.min() <= 4


def test_in_memory_items_are_normalised_exactly():
    images = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4) * 7
    ds = InMemoryImageDataset(images, np.array([0, 1]), img_size=4, in_chans=3, mean=(0.5,) * 3, std=(0.25,) * 3)
    x, y = ds[1]
    assert x.shape == (3, 4, 4) and x.dtype == torch.float32 and y == 1
    expected = (torch.from_numpy(images[1]).float() / 255 - 0.5) / 0.25
    for channel in x:
        torch.testing.assert_close(channel, expected)


def test_augmentation_only_on_train():
    splits = build_datasets(DataConfig(name="digits", img_size=16, in_chans=1, augment=True))
    train_views = {splits.train[0][0].numpy().tobytes() for _ in range(12)}
    assert len(train_views) > 1
    assert len({splits.search[0][0].numpy().tobytes() for _ in range(4)}) == 1
    assert len({splits.test[0][0].numpy().tobytes() for _ in range(4)}) == 1
    plain = build_datasets(DataConfig(name="digits", img_size=16, in_chans=1, augment=False))
    assert len({plain.train[0][0].numpy().tobytes() for _ in range(4)}) == 1


# --- make_loader ------------------------------------------------------------------------------------------------


def test_loader_is_seeded_and_batches_images():
    ds = build_datasets(DataConfig(name="digits", img_size=16, in_chans=3, augment=False)).search

    def labels(seed: int) -> list[int]:
        return torch.cat([y for _, y in make_loader(ds, 32, shuffle=True, seed=seed)]).tolist()

    assert labels(0) == labels(0) and labels(0) != labels(1)
    assert labels(0) != ds.targets.tolist() and sorted(labels(0)) == sorted(ds.targets.tolist())
    x, y = next(iter(make_loader(ds, 32, shuffle=False, seed=0)))
    assert x.shape == (32, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert len(make_loader(ds, 32, shuffle=False, seed=0, drop_last=True)) == len(ds) // 32
    with pytest.raises(ValueError, match="batch_size=0"):
        make_loader(ds, 0, shuffle=False, seed=0)


# --- Fashion-MNIST (real data) ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fashion():
    """The real Fashion-MNIST arrays from the default directories (the Debian package's first)."""
    try:
        find_fashion_mnist()
    except FileNotFoundError:
        skip_unless_ci(
            f"Fashion-MNIST is not in any of {[str(d) for d in FASHION_MNIST_DIRS]} (`make data`)",
            "Fashion-MNIST's tests",
        )
    return load_fashion_mnist()


def fashion_splits(seed=0, **kwargs):
    return build_datasets(DataConfig(seed=seed, **{"img_size": 32, **kwargs}))


def test_fashion_train_and_search_partition_the_training_set(fashion):
    train_x, train_y, _, _ = fashion
    splits = fashion_splits(augment=False)
    assert (len(splits.train), len(splits.search), len(splits.test)) == (54000, 6000, 10000)
    assert splits.num_classes == 10 and len(splits.class_names) == 10

    def samples(images, labels):
        return Counter(zip((im.tobytes() for im in np.asarray(images)), np.asarray(labels).tolist(), strict=True))

    assert samples(splits.train.images, splits.train.targets) + samples(
        splits.search.images, splits.search.targets
    ) == samples(train_x, train_y)
    assert np.bincount(splits.search.targets.numpy()).tolist() == [600] * 10


def test_fashion_split_is_seeded(fashion):
    a, b, c = fashion_splits(seed=0), fashion_splits(seed=0), fashion_splits(seed=1)
    assert torch.equal(a.search.images, b.search.images) and torch.equal(a.train.targets, b.train.targets)
    assert not torch.equal(a.search.images, c.search.images)
    assert torch.equal(a.test.images, c.test.images)


@pytest.mark.parametrize("in_chans", [1, 3])
def test_fashion_items(fashion, in_chans):
    splits = fashion_splits(in_chans=in_chans, search_per_class=10)
    assert len(splits.search) == 100
    for ds in (splits.train, splits.search, splits.test):
        x, y = ds[3]
        assert x.shape == (in_chans, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    x, _ = splits.test[0]
    assert torch.equal(x[0], x[-1]) and x.std() > 0.5


def test_fashion_native_size_matches_the_file(fashion):
    _, _, test_x, test_y = fashion
    splits = fashion_splits(img_size=28, in_chans=1, mean=(0.0,), std=(1.0,))
    x, y = splits.test[7]
    torch.testing.assert_close(x[0], torch.from_numpy(test_x[7]).float() / 255)
    assert y == test_y[7]


# --- imagefolder ------------------------------------------------------------------------------------------------


def make_tree(root, splits=("train", "val"), classes=("cat", "dog"), per_class=3):
    rng = np.random.default_rng(0)
    for split in splits:
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")
    return root


def transform_names(ds):
    transform = ds.dataset.transform if hasattr(ds, "dataset") else ds.transform
    return [type(t).__name__ for t in transform.transforms]


def test_imagefolder_splits_and_transforms(tmp_path):
    root = make_tree(tmp_path)
    splits = build_datasets(DataConfig(name="imagefolder", root=str(root), img_size=32, search_per_class=1))
    assert (len(splits.train), len(splits.search), len(splits.test)) == (4, 2, 6)
    assert splits.class_names == ("cat", "dog") and splits.num_classes == 2
    assert sorted(splits.search.targets) == [0, 1] and sorted(splits.train.targets) == [0, 0, 1, 1]
    assert set(splits.train.indices).isdisjoint(splits.search.indices)
    train_tf = transform_names(splits.train)
    assert "RandAugment" in train_tf and "RandomErasing" in train_tf
    for ds in (splits.search, splits.test):
        assert not {"RandAugment", "RandomErasing"} & set(transform_names(ds))
    for ds in (splits.train, splits.search, splits.test):
        x, y = ds[0]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y in (0, 1)
    plain = build_datasets(DataConfig(name="imagefolder", root=str(root), img_size=32, augment=False))
    assert "RandAugment" not in transform_names(plain.train)


@pytest.mark.parametrize(
    "splits, message",
    [(("train",), "no val/ directory"), (("val",), "no train/ directory"), ((), "no train/ directory")],
)
def test_imagefolder_missing_split_directory(tmp_path, splits, message):
    root = make_tree(tmp_path / "tree", splits=splits) if splits else tmp_path / "missing"
    with pytest.raises(FileNotFoundError, match=message) as info:
        build_datasets(DataConfig(name="imagefolder", root=str(root), img_size=32))
    assert str(root) in str(info.value) and "root/train/<class>" in str(info.value)


def test_imagefolder_without_class_folders_or_with_different_classes(tmp_path):
    (tmp_path / "a" / "train").mkdir(parents=True)
    (tmp_path / "a" / "val").mkdir()
    with pytest.raises(FileNotFoundError, match="has no class folders"):
        build_datasets(DataConfig(name="imagefolder", root=str(tmp_path / "a"), img_size=32))
    make_tree(tmp_path / "b", splits=("train",))
    make_tree(tmp_path / "b", splits=("val",), classes=("cat", "cow"))
    with pytest.raises(ValueError, match="different class folders"):
        build_datasets(DataConfig(name="imagefolder", root=str(tmp_path / "b"), img_size=32))

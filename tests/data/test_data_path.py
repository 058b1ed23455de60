"""The ImageNet-scale data path: the recipe's augmentation never raises, the uint8 pixel path equals the float path
after device-side preprocessing, and evaluation subsets keep every class in proportion on a class-sorted folder."""

import random
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, auto_augment

from flora_ray.config import Config, DataConfig, FilterConfig, SearchConfig, config_to_dict
from flora_ray.data.datasets import build_datasets, eval_subset, labels_of, stratified_indices
from flora_ray.data.transforms import folder_transforms, safe_posterize
from flora_ray.search.evaluator import search_images
from flora_ray.testing.imagefolder import write_image_folder

CLASSES = 10


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A class-sorted image folder: 10 classes of 12 / 3 real JPEG files at 48 px."""
    return write_image_folder(tmp_path_factory.mktemp("folder"), CLASSES, train_per_class=12, val_per_class=3, size=48)


def _recipe_train_transform(img_size: int):
    train_tf, _ = folder_transforms(img_size, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, augment=True, pixels=False)
    return train_tf


def test_safe_posterize_keeps_no_bit_at_zero_and_matches_pillow_elsewhere():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    assert np.asarray(safe_posterize(img, 0)).max() == 0
    assert np.asarray(safe_posterize(img, -1)).max() == 0
    assert safe_posterize(img, 8) is img
    for bits in (1, 2, 4):
        np.testing.assert_array_equal(
            np.asarray(safe_posterize(img, bits)), np.asarray(auto_augment.posterize(img, bits))
        )


def test_the_recipe_augmentation_runs_thousands_of_transforms_without_raising(folder, monkeypatch):
    """3,000 draws of RandAugment rand-m9-mstd0.5-inc1 + erasing with a fixed seed; the 0-bit posterize that crashes
    timm's op with Pillow >= 11 occurs among them (counted), and never raises."""
    images = [Image.open(p).convert("RGB") for p in sorted((folder / "train").rglob("*.jpg"))[:40]]
    zero_bits = []

    def counting(img, bits, **kwargs):
        if bits <= 0:
            zero_bits.append(bits)
        return safe_posterize(img, bits, **kwargs)

    monkeypatch.setattr("flora_ray.data.transforms.safe_posterize", counting)
    transform = _recipe_train_transform(64)  # its posterize ops count the 0-bit draws
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    for i in range(3000):
        out = transform(images[i % len(images)])
        assert out.shape == (3, 64, 64) and torch.isfinite(out).all()
    assert zero_bits, "no 0-bit posterize was drawn: the test no longer covers the crash it guards against"


def test_timm_unpatched_posterize_raises_on_zero_bits_with_this_pillow():
    """Why the patch exists: timm's own op with 0 bits raises here (if a future Pillow accepts it, the patch is
    harmless but this test says so)."""
    img = Image.new("RGB", (8, 8), (200, 100, 50))
    with pytest.raises(ValueError, match="bits"):
        auto_augment.posterize(img, 0)


@pytest.mark.parametrize("name", ["folder", "digits"])
def test_uint8_pixels_after_device_preprocessing_equal_the_float_items(name, folder):
    cfg = (
        DataConfig(name="imagefolder", root=str(folder), img_size=32, augment=False)
        if name == "folder"
        else DataConfig(name="digits", img_size=8, in_chans=3, augment=False)
    )
    float_splits = build_datasets(cfg)
    pixel_splits = build_datasets(cfg, pixels=("search", "test", "train"))
    for split in ("search", "test"):
        a, b = getattr(float_splits, split), getattr(pixel_splits, split)
        x = torch.stack([b[i][0] for i in range(8)])
        assert x.dtype == torch.uint8
        reference = torch.stack([a[i][0] for i in range(8)])
        torch.testing.assert_close(pixel_splits.preprocess(x), reference, rtol=0, atol=1e-6)


def test_pixel_training_batches_get_erasing_on_the_device_side_only_when_training(folder):
    cfg = DataConfig(name="imagefolder", root=str(folder), img_size=32, augment=True)
    splits = build_datasets(cfg, pixels=("train",))
    x = torch.stack([splits.train[i][0] for i in range(64)])
    assert x.dtype == torch.uint8
    torch.manual_seed(0)
    random.seed(0)
    plain, erased = splits.preprocess(x), splits.preprocess(x, train=True)
    changed = (plain != erased).flatten(1).any(1)
    assert 0 < changed.sum() < 64  # erasing p=0.25 hits some images, not all


def test_stratified_indices_keep_every_class_in_proportion():
    labels = np.repeat(np.arange(4), [100, 50, 30, 20])  # sorted by class, as an image folder
    idx = stratified_indices(labels, 40, seed=1)
    assert Counter(labels[idx].tolist()) == {0: 20, 1: 10, 2: 6, 3: 4}
    assert np.array_equal(idx, stratified_indices(labels, 40, seed=1)) and len(np.unique(idx)) == 40
    assert not np.array_equal(idx, stratified_indices(labels, 40, seed=2))
    odd = stratified_indices(labels, 7, seed=0)  # remainders: 7 images over 4 classes, largest shares first
    assert len(odd) == 7 and set(labels[odd]) == {0, 1, 2, 3}
    assert np.array_equal(stratified_indices(labels, 500, seed=0), np.arange(200))


def test_filter_and_search_images_are_stratified_on_a_class_sorted_folder(folder):
    """The first N images of this folder's search split would be classes 0-3 only; both consumers see all 10."""
    data = DataConfig(name="imagefolder", root=str(folder), img_size=32, search_per_class=4, augment=False)
    search = build_datasets(data).search
    assert Counter(labels_of(search)[:20].tolist()).keys() == {0, 1, 2, 3, 4}  # sorted by class
    filter_subset = eval_subset(search, 20, data.seed)  # what filter_task scores on (filter.eval_images=20)
    assert Counter(labels_of(filter_subset).tolist()) == dict.fromkeys(range(CLASSES), 2)
    cfg = Config(data=data, filter=FilterConfig(eval_images=20), search=SearchConfig(eval_images=20))
    images, labels = search_images(config_to_dict(cfg))
    assert images.dtype == np.uint8 and images.shape == (20, 3, 32, 32)
    assert Counter(labels.tolist()) == dict.fromkeys(range(CLASSES), 2)
    assert sorted(labels_of(filter_subset).tolist()) == sorted(labels.tolist())
    other = search_images(config_to_dict(replace(cfg, data=replace(data, seed=1))))[1]
    assert Counter(other.tolist()) == dict.fromkeys(range(CLASSES), 2)

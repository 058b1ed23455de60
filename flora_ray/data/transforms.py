"""Image transforms: timm's FLORA recipe for image folders, split into a CPU part and a device part.

The CPU part (PIL decode, RandomResizedCrop / resize + centre crop, RandAugment ``rand-m9-mstd0.5-inc1``) runs in
DataLoader worker processes. With ``pixels=True`` it stops at a uint8 tensor, as timm's own prefetcher path does:
four times fewer bytes through shared memory, pinned memory and the host-to-device copy, and the per-image float
work (scaling, normalisation, random erasing) moves to the accelerator as one batched ``Preprocess`` call. With
``pixels=False`` it is timm's complete transform (normalised float, erasing on CPU).

timm's ``PosterizeIncreasing`` keeps ``4 - int(m / 10 * 4)`` bits, i.e. 0 bits when the sampled magnitude reaches
10 (``mstd0.5`` makes that about 2% of draws); Pillow >= 11 rejects 0 bits with ``ValueError``, about once per
thousand images. ``make_posterize_safe`` gives those ops the old behaviour (0 bits kept: a black image, as the TF
reference and older Pillow did) without touching timm's module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image, ImageOps

AUTO_AUGMENT = "rand-m9-mstd0.5-inc1"
RE_PROB = 0.25


def safe_posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize for any number of bits: >= 8 keeps the image, <= 0 keeps no bit (black)."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point([0] * 256 * len(img.getbands()))
    return ImageOps.posterize(img, bits_to_keep)


def make_posterize_safe(transform: Any) -> Any:
    """Give every posterize op of the RandAugment / AutoAugment inside ``transform`` the safe function; returns
    ``transform`` (changed in place)."""
    from timm.data import auto_augment

    for op in _augment_ops(transform):
        if getattr(op, "aug_fn", None) is auto_augment.posterize:
            op.aug_fn = safe_posterize
    return transform


def _augment_ops(transform: Any) -> list[Any]:
    """The ``AugmentOp`` s of the (nested) RandAugment / AutoAugment policies of a torchvision ``Compose``."""
    found: list[Any] = []
    if hasattr(transform, "transforms"):  # Compose
        for inner in transform.transforms:
            found += _augment_ops(inner)
    if hasattr(transform, "ops"):  # RandAugment
        found += list(transform.ops)
    for sub_policy in getattr(transform, "policy", []):  # AutoAugment
        found += list(sub_policy)
    return found


def folder_transforms(
    img_size: int, mean: Sequence[float], std: Sequence[float], augment: bool, pixels: bool
) -> tuple[Any, Any]:
    """``(train, eval)`` transforms of an image folder: timm's, with the FLORA recipe's augmentation.

    ``pixels``: stop at uint8 ``(3, H, W)`` tensors (normalisation and erasing then run on the device through
    ``Preprocess``); otherwise the complete transform. ``augment=False``: the train split gets the eval transform.
    """
    from timm.data import create_transform

    common = {"input_size": img_size, "interpolation": "bicubic", "mean": mean, "std": std, "use_prefetcher": pixels}
    eval_tf = create_transform(**common, is_training=False)
    if not augment:
        return eval_tf, eval_tf
    train_tf = create_transform(
        **common, is_training=True, auto_augment=AUTO_AUGMENT, re_prob=0.0 if pixels else RE_PROB
    )
    return make_posterize_safe(train_tf), eval_tf


class Preprocess:
    """The device part of the pixel path: uint8 batches ``(B, C, H, W)`` to the normalised float the model sees,
    with timm's per-image random erasing on training batches (``erase_prob``), on the batch's device.

    ``preprocess(x_uint8) == stack(float items)`` for the eval transform (both compute ``(x / 255 - mean) / std``).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], erase_prob: float = 0.0) -> None:
        self.mean = torch.tensor(list(mean)).view(1, -1, 1, 1)
        self.std = torch.tensor(list(std)).view(1, -1, 1, 1)
        self.erase_prob = erase_prob
        self._erasers: dict[str, Any] = {}

    def __call__(self, x: torch.Tensor, train: bool = False) -> torch.Tensor:
        if x.dtype != torch.uint8:
            return x  # already the float the model sees
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        out = x.float().div_(255.0).sub_(mean).div_(std)  # in place: one float batch alive, not two
        if train and self.erase_prob > 0:
            out = self._eraser(x.device)(out)
        return out

    def _eraser(self, device: torch.device) -> Any:
        from timm.data.random_erasing import RandomErasing

        key = str(device)
        if key not in self._erasers:
            self._erasers[key] = RandomErasing(self.erase_prob, mode="pixel", device=key)
        return self._erasers[key]

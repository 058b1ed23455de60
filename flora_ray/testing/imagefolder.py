"""A small synthetic ImageNet-style image folder of real JPEG files, which a tiny ViT learns in a few epochs.

``write_image_folder(root, classes, train_per_class=..., val_per_class=...)`` writes
``root/train/<class>/<class>_<i>.jpg`` and ``root/val/<class>/<class>_<i>.jpg`` with class folders named like
ImageNet synsets (``n00000000``, ``n00000001``, ...; sorted order = class index). Each class has its own pattern:
stripes of a class hue over a darker background of the opposite hue, at a class angle and a class stripe frequency;
each image draws a random phase, a small angle and brightness jitter and pixel noise. The hue alone separates the
classes and survives crops and flips, so a tiny ViT beats chance within an epoch or two. The files depend only on
``seed`` (each image has its own random stream), not on the order of writing.

``python -m flora_ray.testing.imagefolder ROOT --classes 12 --train-per-class 40 --val-per-class 10`` does the same
from a shell.
"""

from __future__ import annotations

import argparse
import colorsys
import math
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

SPLITS = ("train", "val")
JPEG_QUALITY = 90


def class_names(classes: int) -> list[str]:
    """ImageNet-synset-like folder names, sorted in class order: ``n00000000``, ``n00000001``, ..."""
    return [f"n{index:08d}" for index in range(classes)]


def _image(class_index: int, classes: int, size: int, rng: np.random.Generator) -> np.ndarray:
    hue = class_index / classes
    foreground = np.array(colorsys.hsv_to_rgb(hue, 0.85, 0.95)) * 255.0
    background = np.array(colorsys.hsv_to_rgb((hue + 0.5) % 1.0, 0.6, 0.35)) * 255.0
    angle = math.pi * class_index / classes + rng.normal(0.0, math.radians(4.0))
    cycles = 2.0 + (class_index % 3) * 1.5  # stripes across the image: 2, 3.5 or 5
    yy, xx = np.mgrid[0:size, 0:size] / size
    wave = np.sin(2 * math.pi * cycles * (xx * math.cos(angle) + yy * math.sin(angle)) + rng.uniform(0, 2 * math.pi))
    mix = (0.5 + 0.5 * wave)[..., None]
    pixels = mix * foreground + (1.0 - mix) * background
    pixels = pixels * rng.uniform(0.85, 1.15) + rng.normal(0.0, 12.0, pixels.shape)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def write_image_folder(
    root: str | Path,
    classes: int = 12,
    *,
    train_per_class: int,
    val_per_class: int,
    size: int = 40,
    seed: int = 0,
    class_indices: Iterable[int] | None = None,
) -> Path:
    """Write the image folder under ``root`` (created; existing files of the same names are overwritten).

    Args:
        root: Directory to hold ``train/`` and ``val/``.
        classes: Number of classes (class folders), at least 2.
        train_per_class: JPEG files per class in ``train/``, at least 1.
        val_per_class: JPEG files per class in ``val/``, at least 1.
        size: Width and height of the images in pixels, at least 8.
        seed: Seed of every image's random stream; the same arguments give the same files.
        class_indices: Write only these classes (default: all): processes that write disjoint parts of one folder
            write the same files one process would.

    Returns:
        ``root`` as a ``Path``.
    """
    from PIL import Image

    if classes < 2:
        raise ValueError(f"classes={classes!r} is invalid: must be at least 2")
    if train_per_class < 1 or val_per_class < 1:
        raise ValueError(
            f"train_per_class={train_per_class!r}, val_per_class={val_per_class!r} are invalid: must be at least 1"
        )
    if size < 8:
        raise ValueError(f"size={size!r} is invalid: must be at least 8")
    root = Path(root)
    counts = {"train": train_per_class, "val": val_per_class}
    names = class_names(classes)
    chosen = range(classes) if class_indices is None else sorted(set(class_indices))
    if any(not 0 <= index < classes for index in chosen):
        raise ValueError(f"class_indices={list(chosen)!r} is invalid: each must be in [0, {classes})")
    for split_index, split in enumerate(SPLITS):
        for class_index in chosen:
            name = names[class_index]
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for image_index in range(counts[split]):
                rng = np.random.default_rng([seed, split_index, class_index, image_index])
                pixels = _image(class_index, classes, size, rng)
                Image.fromarray(pixels, mode="RGB").save(
                    folder / f"{name}_{image_index:05d}.jpg", format="JPEG", quality=JPEG_QUALITY
                )
    return root


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flora_ray.testing.imagefolder", description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--classes", type=int, default=12)
    parser.add_argument("--train-per-class", type=int, required=True)
    parser.add_argument("--val-per-class", type=int, required=True)
    parser.add_argument("--size", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_image_folder(
        args.root,
        args.classes,
        train_per_class=args.train_per_class,
        val_per_class=args.val_per_class,
        size=args.size,
        seed=args.seed,
    )
    print(args.root)
    return 0


if __name__ == "__main__":
    sys.exit(main())

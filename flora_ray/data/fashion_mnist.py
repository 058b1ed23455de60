"""Fashion-MNIST from its idx files: find the directory, parse and validate the files with numpy.

The idx format is a 4-byte magic number (two zero bytes, a dtype code, the number of dimensions), one big-endian
uint32 per dimension, then the payload. ``make data`` (``experiments/get_fashion_mnist.sh``) puts the files in
place: the Debian package ``dataset-fashion-mnist`` (installed, or unpacked into ``./data/fashion-mnist`` without
root), or where there is no apt, torchvision's download into ``./data/FashionMNIST/raw`` (``download_fashion_mnist``).
The files may be gzip'd or not; ``data.root`` names any other directory.
"""

from __future__ import annotations

import gzip
import logging
import os
import zlib
from pathlib import Path

import numpy as np

from flora_ray.errors import InputError, MissingInput

logger = logging.getLogger(__name__)

REPOSITORY_DATA = Path(__file__).resolve().parents[2] / "data"  # ./data of a source checkout (make data)
FASHION_MNIST_DIRS = (
    # Debian package dataset-fashion-mnist; FASHION_MNIST_SYSTEM_DIR moves it (the script reads the same variable)
    Path(os.environ.get("FASHION_MNIST_SYSTEM_DIR", "/usr/share/datasets/fashion-mnist")),
    REPOSITORY_DATA / "fashion-mnist",  # experiments/get_fashion_mnist.sh without root: the package unpacked
    REPOSITORY_DATA,  # experiments/get_fashion_mnist.sh without apt: torchvision's download (FashionMNIST/raw)
)
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
HOW_TO_GET = (
    "run `make data` (the Debian package dataset-fashion-mnist, or torchvision's download where there is no apt) or "
    "set data.root to a directory with the idx files"
)
# torchvision's source of the files (``FashionMNIST.mirrors``): Zalando Research's bucket, 4 files, 30 MB gzip'd.
DOWNLOAD_MB = 30
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (gzip'd when its name ends in ``.gz``) into a native-endian numpy array."""
    p = Path(path)
    raw = p.read_bytes()
    if p.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise InputError(f"idx file {str(p)!r} is not valid gzip ({exc}); download it again") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise InputError(f"idx file {str(p)!r} has a bad magic number {raw[:4].hex()!r}; it is not an idx file")
    ndim, dtype = raw[3], np.dtype(_IDX_DTYPES[raw[2]])
    if len(raw) < 4 + 4 * ndim:
        raise InputError(f"idx file {str(p)!r} is truncated in its header; download it again")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - 4 - 4 * ndim != expected:
        raise InputError(
            f"idx file {str(p)!r} has {len(raw) - 4 - 4 * ndim} payload bytes but its header {list(dims)} "
            f"needs {expected}; it is truncated or corrupt, download it again"
        )
    return np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim).reshape(dims).astype(dtype.newbyteorder("="))


def find_fashion_mnist(root: str | os.PathLike | None = None) -> Path:
    """The directory holding the four Fashion-MNIST idx files.

    Args:
        root: A directory with the files, or a torchvision download directory (files in ``FashionMNIST/raw``);
            ``None`` searches ``FASHION_MNIST_DIRS`` in order.
    """
    bases = [Path(root)] if root is not None else list(FASHION_MNIST_DIRS)
    tried = [d for b in bases for d in (b, b / "FashionMNIST" / "raw")]
    for directory in tried:
        if all(_idx_file(directory, name) for names in FASHION_MNIST_FILES.values() for name in names):
            return directory
    shown = ", ".join(repr(str(d)) for d in tried)
    raise MissingInput(f"Fashion-MNIST idx files not found (tried {shown}): {HOW_TO_GET}")


def load_fashion_mnist(root: str | os.PathLike | None = None) -> tuple[np.ndarray, ...]:
    """``(train_images, train_labels, test_images, test_labels)``: uint8 ``(N, 28, 28)`` and int64 ``(N,)``."""
    directory = find_fashion_mnist(root)
    out = []
    for split, (images_name, labels_name) in FASHION_MNIST_FILES.items():
        images_path, labels_path = _idx_file(directory, images_name), _idx_file(directory, labels_name)
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or images.dtype != np.uint8 or labels.ndim != 1 or len(images) != len(labels):
            raise InputError(
                f"Fashion-MNIST {split} files {str(images_path)!r} {images.shape} and {str(labels_path)!r} "
                f"{labels.shape} do not match (expected uint8 (N, H, W) images and N labels); {HOW_TO_GET}"
            )
        if labels.size and not 0 <= labels.min() <= labels.max() < len(FASHION_MNIST_CLASSES):
            raise InputError(f"Fashion-MNIST labels {str(labels_path)!r} are outside 0..9; the file is corrupt")
        out += [images, labels.astype(np.int64)]
    logger.info("Fashion-MNIST from %s: %d train, %d test images", directory, len(out[1]), len(out[3]))
    return tuple(out)


def _idx_file(directory: Path, name: str) -> Path | None:
    for candidate in (directory / f"{name}.gz", directory / name):
        if candidate.is_file():
            return candidate
    return None


def download_fashion_mnist(root: str | os.PathLike, mirror: str | None = None) -> Path:
    """Download the four idx files with torchvision (its mirror, or ``mirror``: a URL prefix serving the same file
    names) into ``root/FashionMNIST/raw``; torchvision checks each file's MD5. Returns the directory; raises
    ``RuntimeError`` with one line when the download fails."""
    from torchvision.datasets import FashionMNIST

    class Mirrored(FashionMNIST):
        mirrors = [mirror] if mirror else list(FashionMNIST.mirrors)

    try:
        for train in (True, False):
            Mirrored(str(root), train=train, download=True)
    except Exception as exc:  # urllib, socket and torchvision's own errors alike: one line, what to do
        cause = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise RuntimeError(
            f"could not download Fashion-MNIST ({DOWNLOAD_MB} MB) from {Mirrored.mirrors[0]} into {str(root)!r}: "
            f"{cause}; check the network or set data.root to a directory with the idx files"
        ) from None
    return find_fashion_mnist(root)

"""Tests of the Fashion-MNIST idx reader: exact round trips, malformed files, directory discovery and the real data."""

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from flora_ray.data.datasets import DataConfig, build_datasets
from flora_ray.data.fashion_mnist import FASHION_MNIST_DIRS, find_fashion_mnist, load_fashion_mnist, read_idx
from flora_ray.testing import skip_unless_ci

DTYPE_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D}


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, DTYPE_CODES[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def write_fashion(directory: Path, n_train: int = 30, n_test: int = 20, gz: bool = True, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", (np.arange(n) % 10).astype(np.uint8))


@pytest.mark.parametrize("name", ["a.gz", "a"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32])
def test_read_idx_round_trips_exactly(tmp_path, name, dtype):
    values = np.arange(30).reshape(2, 3, 5)
    array = (values * 8).astype(np.uint8) if dtype is np.uint8 else (values * 7 - 40).astype(dtype)
    out = read_idx(write_idx(tmp_path / name, array))
    assert out.shape == (2, 3, 5) and out.dtype == np.dtype(dtype) and out.dtype.isnative
    np.testing.assert_array_equal(out, array)
    out[0, 0, 0] = 1  # writable, not a view of the file's bytes


def test_read_idx_labels_file(tmp_path):
    labels = np.array([3, 1, 4, 1, 5, 9, 2, 6], dtype=np.uint8)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "l-idx1-ubyte.gz", labels)), labels)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b"\x00\x08" + b[2:], "bad magic number"),  # magic 0x0008....
        (lambda b: b"\x01" + b[1:], "bad magic number"),
        (lambda b: b[:2] + b"\x07" + b[3:], "bad magic number"),  # unknown dtype code
        (lambda b: b[:3] + b"\x00" + b[4:], "bad magic number"),  # zero dimensions
        (lambda b: b[:-1], "truncated"),
        (lambda b: b + b"\x00", "truncated or corrupt"),
        (lambda b: b[:9], "truncated in its header"),
        (lambda b: b"", "bad magic number"),
    ],
)
def test_read_idx_rejects_malformed_files(tmp_path, mutate, message):
    path = tmp_path / "broken-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(mutate(idx_bytes(np.zeros((4, 3, 3), dtype=np.uint8)))))
    with pytest.raises(ValueError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_rejects_corrupt_gzip(tmp_path):
    path = tmp_path / "x-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros(100, dtype=np.uint8)))[:-12])
    with pytest.raises(ValueError, match="not valid gzip") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_load_from_torchvision_layout_uncompressed(tmp_path):
    write_fashion(tmp_path / "FashionMNIST" / "raw", gz=False)
    assert find_fashion_mnist(tmp_path) == tmp_path / "FashionMNIST" / "raw"
    train_x, train_y, test_x, test_y = load_fashion_mnist(tmp_path)
    assert train_x.shape == (30, 28, 28) and train_x.dtype == np.uint8 and test_x.shape == (20, 28, 28)
    assert train_y.dtype == np.int64 and list(test_y[:12]) == [*range(10), 0, 1]


def test_build_datasets_reads_a_given_root(tmp_path):
    write_fashion(tmp_path, n_train=50)
    splits = build_datasets(DataConfig(root=str(tmp_path), img_size=28, in_chans=1, search_per_class=1))
    assert (len(splits.train), len(splits.search), len(splits.test)) == (40, 10, 20)
    assert splits.class_names[0] == "T-shirt/top" and splits.num_classes == 10


@pytest.mark.parametrize("make", ["nothing", "empty dir", "three of four files"])
def test_missing_data_is_one_clear_error(tmp_path, make):
    root = tmp_path / "fmnist"
    if make != "nothing":
        root.mkdir()
    if make == "three of four files":
        write_fashion(root)
        (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError) as info:
        build_datasets(DataConfig(root=str(root)))
    message = str(info.value)
    assert str(root) in message and "make data" in message and "data.root" in message


def test_mismatched_image_and_label_counts(tmp_path):
    write_fashion(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(29, dtype=np.uint8))
    with pytest.raises(ValueError, match="do not match"):
        load_fashion_mnist(tmp_path)


def test_labels_out_of_range(tmp_path):
    write_fashion(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.full(20, 10, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"outside 0\.\.9"):
        load_fashion_mnist(tmp_path)


def test_real_fashion_mnist_files():
    try:
        directory = find_fashion_mnist()
    except FileNotFoundError:
        skip_unless_ci(
            f"Fashion-MNIST is not in any of {[str(d) for d in FASHION_MNIST_DIRS]} (`make data`)",
            "Fashion-MNIST's tests",
        )
    assert directory == next(d for d in FASHION_MNIST_DIRS if d.is_dir())
    train_x, train_y, test_x, test_y = load_fashion_mnist()
    assert train_x.shape == (60000, 28, 28) and test_x.shape == (10000, 28, 28)
    assert train_x.dtype == np.uint8 and train_x.max() == 255
    assert np.bincount(train_y).tolist() == [6000] * 10 and np.bincount(test_y).tolist() == [1000] * 10

"""``data.root`` in object storage: an image folder of JPEG files in a bucket of a local S3 server (moto, on
127.0.0.1) reads as the same folder on disk does (classes, search split, decoded tensors), is listed once and
recorded in the run, and a bad URI, a missing bucket or an empty folder is refused by the preflight in one line."""

import dataclasses
import os

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch

from flora_ray.config import DataConfig, load_config
from flora_ray.data.datasets import build_datasets, num_classes
from flora_ray.data.listing import FolderImages, is_remote, list_image_folder, run_classes, run_listing
from flora_ray.errors import InputError
from flora_ray.stages.preflight import preflight
from flora_ray.storage.filesystems import s3_filesystem
from flora_ray.storage.run_store import ARTEFACTS, RunStore
from flora_ray.testing.imagefolder import write_image_folder

pytestmark = pytest.mark.timeout(180)

CLASSES = 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A JPEG image folder with what ImageFolder skips (a text file) and a nested folder it walks into."""
    from PIL import Image

    root = write_image_folder(
        tmp_path_factory.mktemp("imagefolder") / "data", classes=CLASSES, train_per_class=10, val_per_class=3, size=24
    )
    (root / "train" / "n00000000" / "notes.txt").write_text("not an image")
    nested = root / "train" / "n00000002" / "more"
    nested.mkdir()
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(nested / "a.jpg", format="JPEG")
    return root


@pytest.fixture
def bucket(s3, folder, monkeypatch):
    """``s3://images/sets/demo``: ``folder`` uploaded to the S3 server; this process's S3 clients point there."""
    s3.patch_env(monkeypatch)
    s3.make_bucket("images")
    pafs.copy_files(str(folder), "images/sets/demo", source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=s3.filesystem())  # fmt: skip
    return "s3://images/sets/demo"


def test_a_bucket_reads_as_the_same_folder_on_disk(folder, bucket):
    assert is_remote(bucket) and not is_remote(str(folder)) and not is_remote(f"file://{folder}")
    local_cfg = DataConfig(name="imagefolder", root=str(folder), img_size=16, search_per_class=2)
    remote_cfg = dataclasses.replace(local_cfg, root=bucket)
    assert num_classes(remote_cfg) == num_classes(local_cfg) == CLASSES
    listing = list_image_folder(bucket)
    assert len(listing.paths["train"]) == CLASSES * 10 + 1 and len(listing.paths["val"]) == CLASSES * 3
    for pixels in ((), ("train", "search", "test")):
        local = build_datasets(dataclasses.replace(local_cfg, augment=False), pixels)
        remote = build_datasets(dataclasses.replace(remote_cfg, augment=False), pixels, listing=listing)
        assert isinstance(remote.train.dataset, FolderImages)
        assert remote.class_names == local.class_names and remote.num_classes == CLASSES
        for split in ("train", "search"):  # the same stratified split, by index and by file
            mine, theirs = getattr(remote, split), getattr(local, split)
            assert mine.indices == theirs.indices and mine.targets == theirs.targets
        assert [p.split("/", 1)[1] for p in listing.paths["train"]] == [
            os.path.relpath(path, folder / "train") for path, _ in local.train.dataset.samples
        ]
        assert remote.test.targets == local.test.targets
        for split, index in (("train", 0), ("train", 17), ("search", 3), ("test", 5)):  # the same decoded tensors
            (x_remote, y_remote), (x_local, y_local) = getattr(remote, split)[index], getattr(local, split)[index]
            assert y_remote == y_local and torch.equal(x_remote, x_local)
    # Decoded in DataLoader worker processes, each opening the bucket itself.
    loader = torch.utils.data.DataLoader(remote.search, batch_size=4, num_workers=2)
    assert sum(len(y) for _, y in loader) == len(remote.search)


def test_ray_data_reads_the_loader_paths_training_files_from_the_bucket(folder, bucket, tmp_path):
    from flora_ray.data.ray_data import train_files

    def files(root):
        cfg = load_config(None, ["data.name=imagefolder", f"data.root={root}", "data.search_per_class=2",
                                 f"run.output_dir={tmp_path}"])  # fmt: skip
        fs, base, paths, sizes, _ = train_files(cfg)
        assert all(fs.get_file_info(p).size == s for p, s in zip(paths[:5], sizes[:5], strict=False))
        return [p[len(base) + 1 :] for p in paths], build_datasets(cfg.data).train

    in_bucket, _ = files(bucket)
    on_disk, loader = files(str(folder))  # the loader path on disk: torchvision's ImageFolder
    assert in_bucket == on_disk == [os.path.relpath(loader.dataset.samples[i][0], folder) for i in loader.indices]


def test_the_driver_lists_once_and_records_the_listing_in_the_run(bucket, tmp_path, monkeypatch):
    cfg = load_config(None, ["model.name=test_vit", "model.kwargs={patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}",
                             "data.name=imagefolder", f"data.root={bucket}", "data.img_size=16",
                             "data.search_per_class=2", f"run.output_dir={tmp_path}"])  # fmt: skip
    store = RunStore.for_config(cfg)
    preflight(cfg, "pretrain")
    assert store.is_file(ARTEFACTS.data_listing)
    recorded = run_listing(cfg)
    assert recorded.paths == list_image_folder(bucket).paths and run_classes(cfg) == recorded.classes
    # Every later reader takes the recorded listing, not the bucket's current content.
    s3_filesystem().delete_file("images/sets/demo/train/n00000001/n00000001_00000.jpg")
    assert run_listing(cfg).paths == recorded.paths
    assert len(list_image_folder(bucket).paths["train"]) == len(recorded.paths["train"]) - 1


@pytest.mark.parametrize(
    "root, message",
    [
        ("s3:/images/sets/demo", "data.root 's3:/images/sets/demo' is not a usable location: 's3:' is not followed"),
        ("s3://", "data.root 's3://' is not a usable location: the bucket is missing"),
        ("s3://no-such-bucket/x", "bucket 'no-such-bucket' does not exist"),
        ("s3://images/nothing-here", "has no train/ directory"),
        ("s3://images/sets/demo/train", "has no train/ directory"),
    ],
)
def test_the_preflight_refuses_a_bad_uri_a_missing_bucket_or_an_empty_folder(bucket, tmp_path, root, message):
    cfg = load_config(None, ["model.name=test_vit", "data.name=imagefolder", f"data.root={root}", "data.img_size=16",
                             f"run.output_dir={tmp_path}"])  # fmt: skip
    with pytest.raises(InputError) as info:
        preflight(cfg, "pretrain")
    text = str(info.value)
    assert message in text and "\n" not in text
    assert not RunStore.for_config(cfg).is_file(ARTEFACTS.data_listing)


def test_the_command_refuses_a_missing_bucket_in_one_line_before_ray_starts(bucket, tmp_path, capsys):
    import yaml

    from flora_ray.cli import main
    from flora_ray.config import config_to_dict

    cfg = load_config(None, ["model.name=test_vit", "data.name=imagefolder", "data.root=s3://no-such-bucket/imagenet",
                             "data.img_size=16", f"run.output_dir={tmp_path}"])  # fmt: skip
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(config_to_dict(cfg)))
    assert main(["run", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bucket 'no-such-bucket' does not exist" in err, err
    assert "Ray" not in err


def test_plan_counts_the_classes_and_training_images_of_a_bucket(folder, bucket, tmp_path):
    """``flora-ray plan`` on data in a bucket needs no --classes or --train-images: the bucket's listing (the run's
    recorded one once the driver has listed it) gives both, as counting the same folder on disk does."""
    from flora_ray.plan import count_train_images, model_spec

    overrides = ["model.name=test_vit", "model.kwargs={patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}",
                 "data.name=imagefolder", "data.img_size=16", f"run.output_dir={tmp_path}"]  # fmt: skip
    remote = load_config(None, [*overrides, f"data.root={bucket}"])
    local = load_config(None, [*overrides, f"data.root={folder}"])
    assert model_spec(remote, None).kwargs["num_classes"] == model_spec(local, None).kwargs["num_classes"] == CLASSES
    on_disk = sum(1 for p in (folder / "train").rglob("*") if p.is_file() and p.suffix == ".jpg")
    assert count_train_images(remote, None) == count_train_images(local, None) == on_disk == CLASSES * 10 + 1
    assert count_train_images(remote, 500) == 500 and model_spec(remote, 7).kwargs["num_classes"] == 7

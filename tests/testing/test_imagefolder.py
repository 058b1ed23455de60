"""``write_image_folder``: writers of disjoint class subsets together write the files one writer would."""

import pytest

from flora_ray.testing.imagefolder import write_image_folder


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*.jpg"))}


def test_class_subsets_write_the_same_files_as_one_writer(tmp_path):
    whole = write_image_folder(tmp_path / "whole", 5, train_per_class=3, val_per_class=2, size=16)
    for part in ([0, 3], [1, 4], [2]):
        split = write_image_folder(
            tmp_path / "split", 5, train_per_class=3, val_per_class=2, size=16, class_indices=part
        )
    assert _files(whole) == _files(split) and len(_files(whole)) == 25
    with pytest.raises(ValueError, match="class_indices"):
        write_image_folder(tmp_path / "bad", 5, train_per_class=1, val_per_class=1, class_indices=[5])

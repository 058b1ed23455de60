"""``flora_ray.throughput``: GPU names as drivers and clouds spell them, the published rows, measured files."""

import json

import pytest

from flora_ray.errors import InputError
from flora_ray.throughput import PUBLISHED, find_rate, known_rates, normalise_gpu, read_measured


@pytest.mark.parametrize(
    ("name", "gpu"),
    [
        ("NVIDIA A10G", "A10G"),
        ("NVIDIA A10", "A10"),
        ("NVIDIA A100-SXM4-40GB", "A100"),
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("Tesla T4", "T4"),
        ("NVIDIA L4", "L4"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA GeForce RTX 3090", "RTX 3090"),
        ("RTX3090", "RTX 3090"),
        ("Tesla V100-SXM2-16GB", "V100"),
        ("NVIDIA B200", None),
    ],
)
def test_gpu_names(name, gpu):
    assert normalise_gpu(name) == gpu


def test_published_rows_and_lookup():
    rate = find_rate(known_rates(), "deit_small_patch16_224.fb_in1k", "RTX 3090")  # a pretrained tag is ignored
    assert rate.images_per_s == 1053.64 and "batch 384" in rate.source and "rtx3090.csv" in rate.source
    assert rate.macs_per_s(4.6e9) == pytest.approx(1053.64 * 3 * 4.6e9)  # a dense step: 3 forward passes
    assert find_rate(known_rates(), "deit_small_patch16_224", "A10G") is None  # nothing published: the fallback
    assert len({(r.model, r.gpu) for r in PUBLISHED}) == len(PUBLISHED)


def test_measured_files(tmp_path):
    path = tmp_path / "gpu_check.json"
    data = {"smoke": False, "provenance": {"date": "2026-12-07"},
            "throughput": {"model": "deit_small_patch16_224", "gpu": "NVIDIA H100 80GB HBM3", "gpus": 1,
                           "images_per_s_per_gpu": 2000.0, "train_macs_per_image": 1e10, "what": "test input"}}  # fmt: skip
    path.write_text(json.dumps(data))
    rate = read_measured(path)
    assert (rate.gpu, rate.images_per_s, rate.macs_per_s(4.6e9)) == ("H100", 2000.0, 2e13)
    assert find_rate(known_rates([str(path)]), "deit_small_patch16_224", "H100") == rate
    path.write_text("{}")
    with pytest.raises(InputError, match="not a gpu_check result file"):
        read_measured(path)

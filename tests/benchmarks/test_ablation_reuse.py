"""The benchmarks' prepared ablation supernets are reused when only a path differs, and redone when results would."""

from harness_runs import same_source

from flora_ray.config import config_to_dict, load_config


def _source(*overrides):
    config = config_to_dict(load_config(None, list(overrides)))
    return {"teacher_sha256": "ab" * 32, "space": {"blocks": [[1, 2]]}, "config": config}


def test_a_variant_reached_through_another_path_is_reused():
    recorded = _source("run.output_dir=/work/main/runs")
    assert same_source(recorded, _source("run.output_dir=/elsewhere/runs"))  # a symlink or another checkout
    assert same_source(recorded, _source("run.output_dir=/work/main/runs", "search.concurrency=1"))
    assert not same_source(recorded, _source("run.output_dir=/work/main/runs", "train.sampler=sandwich"))
    assert not same_source(recorded, {**_source("run.output_dir=/work/main/runs"), "teacher_sha256": "cd" * 32})
    assert not same_source(recorded, {**_source("run.output_dir=/work/main/runs"), "space": None})

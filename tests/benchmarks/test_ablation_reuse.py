"""The benchmarks' prepared ablation supernets are reused when only a path differs, and redone when results would."""

import importlib.util
from pathlib import Path

from flora_ray.config import config_to_dict, load_config

BENCHMARKS = Path(__file__).resolve().parents[2] / "experiments" / "benchmarks"


def _same_source():
    import sys

    sys.path.insert(0, str(BENCHMARKS))  # the benchmarks import each other by module name
    try:
        spec = importlib.util.spec_from_file_location("flora_vs_uniform", BENCHMARKS / "flora_vs_uniform.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module.same_source


def _source(*overrides):
    config = config_to_dict(load_config(None, list(overrides)))
    return {"teacher_sha256": "ab" * 32, "space": {"blocks": [[1, 2]]}, "config": config}


def test_a_variant_reached_through_another_path_is_reused():
    same_source = _same_source()
    recorded = _source("run.output_dir=/work/main/runs")
    assert same_source(recorded, _source("run.output_dir=/elsewhere/runs"))  # a symlink or another checkout
    assert same_source(recorded, _source("run.output_dir=/work/main/runs", "search.concurrency=1"))
    assert not same_source(recorded, _source("run.output_dir=/work/main/runs", "train.sampler=sandwich"))
    assert not same_source(recorded, {**_source("run.output_dir=/work/main/runs"), "teacher_sha256": "cd" * 32})
    assert not same_source(recorded, {**_source("run.output_dir=/work/main/runs"), "space": None})

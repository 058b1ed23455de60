"""Reproducible runs: the same configuration and seed on the same machine give the same trials and front.

Two digits runs of the whole pipeline in this process (the local backend) into two directories are compared
column by column; only what is measured in time differs (``eval_seconds``; ``latency_ms`` is predicted from a
latency table that is itself timed). What another machine or backend may change is in the README.
"""

import pandas as pd
import pytest
import torch
from conftest import DIGITS_OVERRIDES

import flora_ray as fr

pytestmark = pytest.mark.slow

TIMED = ["eval_seconds", "latency_ms"]
OVERRIDES = [*DIGITS_OVERRIDES, "run.name=twice", "pretrain.epochs=3", "pretrain.lr=0.003", "filter.epochs=1",
             "filter.eval_images=100", "train.epochs=2", "search.trials=16", "search.population=4",
             "search.eval_images=150", "search.concurrency=1"]  # fmt: skip


def test_the_same_config_and_seed_give_the_same_trials_and_front(tmp_path):
    sections = {"model": {"name": "test_vit"}, "data": {"name": "digits"}}
    runs = [fr.run(sections, OVERRIDES, backend="local", output=tmp_path / name) for name in ("a", "b")]
    first, second = (r.trials.drop(columns=TIMED) for r in runs)
    assert len(first) == 16
    pd.testing.assert_frame_equal(first, second)
    pd.testing.assert_frame_equal(runs[0].front.drop(columns=TIMED), runs[1].front.drop(columns=TIMED))
    pd.testing.assert_frame_equal(runs[0].uniform.drop(columns=TIMED), runs[1].uniform.drop(columns=TIMED))
    (a, _), (b, _) = (r.store.read_checkpoint("supernet.safetensors") for r in runs)  # headers name the run
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

"""Reproducible runs: the same configuration and seed on the same machine give the same trials and front.

Two digits runs of the whole pipeline in this process (the local backend) into two directories are compared
column by column; only what is measured in time differs (``eval_seconds``; ``latency_ms`` is predicted from a
latency table that is itself timed). What another machine or backend may change is in the README.
"""

import pandas as pd
import pytest
import torch
from conftest import IN_PROCESS_OVERRIDES

import flora_ray as fr

pytestmark = pytest.mark.slow

TIMED = ["eval_seconds", "latency_ms"]


def test_the_same_config_and_seed_give_the_same_trials_and_front(in_process_run, tmp_path):
    """The shared in-process run (``run_pipeline`` in tests/conftest.py) and a second one made here by ``fr.run``
    on the same overrides."""
    cfg, _, _ = in_process_run
    sections = {"model": {"name": "test_vit"}, "data": {"name": "digits"}}
    runs = [
        fr.Run.open(cfg.run.run_dir),
        fr.run(sections, IN_PROCESS_OVERRIDES, backend="local", output=tmp_path / "b"),
    ]
    first, second = (r.trials.drop(columns=TIMED) for r in runs)
    assert len(first) == 16
    pd.testing.assert_frame_equal(first, second)
    pd.testing.assert_frame_equal(runs[0].front.drop(columns=TIMED), runs[1].front.drop(columns=TIMED))
    pd.testing.assert_frame_equal(runs[0].uniform.drop(columns=TIMED), runs[1].uniform.drop(columns=TIMED))
    (a, _), (b, _) = (r.store.read_checkpoint("supernet.safetensors") for r in runs)  # headers name the run
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

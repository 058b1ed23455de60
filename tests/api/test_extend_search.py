"""Extending a finished search in place: a larger search.trials continues the run's Optuna study with exactly that
many more distinct configurations, keeps the trials it had, trains nothing, and runs export and report again; on
the in-process backend and on Ray Tune (a new Tune experiment over the same journal)."""

import logging
import shutil

import pandas as pd
import pytest
from conftest import IN_PROCESS_OVERRIDES

import flora_ray as fr
from flora_ray.errors import InputError
from flora_ray.storage.run_store import ARTEFACTS

pytestmark = pytest.mark.slow

SECTIONS = {"model": {"name": "test_vit"}, "data": {"name": "digits"}}
TIMED = ["eval_seconds", "latency_ms"]


@pytest.fixture
def copied(in_process_run, tmp_path):
    cfg, _, _ = in_process_run
    shutil.copytree(cfg.run.run_dir, tmp_path / "runs" / cfg.run.name)
    return fr.Run.open(cfg.run.run_dir), tmp_path / "runs"


def _extend(output, trials, backend):
    return fr.run(SECTIONS, [*IN_PROCESS_OVERRIDES, f"search.trials={trials}"], backend=backend, output=output)


def _check_extended(before, after, more):
    old, new = before.trials.drop(columns=TIMED), after.trials.drop(columns=TIMED)
    assert len(new) == len(old) + more and new["trial"].is_unique
    kept = new[new["trial"].isin(old["trial"])].drop(columns=["is_pareto"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(kept, old.drop(columns=["is_pareto"]).reset_index(drop=True))  # the old trials stay
    complete = new[new["state"] == "COMPLETE"]
    assert complete["ranks"].nunique() == old["ranks"].nunique() + more  # each a configuration not evaluated before
    assert after.store.read_json(ARTEFACTS.stage_marker("search"))["summary"]["finished"] == len(new)


@pytest.mark.parametrize("backend", ["local", "ray"])
def test_a_larger_budget_continues_the_study(copied, caplog, backend):
    before, output = copied
    with caplog.at_level(logging.INFO, logger="flora_ray"):
        after = _extend(output, 22, backend)
    assert "search: extending" in caplog.text and "from 16 to 22 trials" in caplog.text
    for stage in ("pretrain", "filter", "train"):
        assert f"{stage}: done earlier" in caplog.text
    for stage in ("search", "export", "report"):
        assert f"{stage}: starting" in caplog.text
    _check_extended(before, after, 6)
    assert after.config.search.trials == 22


def test_a_smaller_budget_or_another_search_setting_is_still_refused(copied):
    _, output = copied
    with pytest.raises(InputError, match=r"search.trials: 16 -> 8"):
        _extend(output, 8, "local")
    with pytest.raises(InputError, match=r"search.seed"):
        fr.run(SECTIONS, [*IN_PROCESS_OVERRIDES, "search.trials=22", "search.seed=5"], backend="local", output=output)

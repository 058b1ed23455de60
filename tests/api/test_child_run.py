"""Child runs (run.parent): a search again on a trained supernet trains nothing, takes over the parent's teacher,
space and supernet, and with the same settings gives the parent's trials; a child that changes what the supernet
was made with is refused before anything is written."""

import logging
from pathlib import Path

import pandas as pd
import pytest
from conftest import IN_PROCESS_OVERRIDES

import flora_ray as fr
from flora_ray.errors import InputError
from flora_ray.storage.run_store import ARTEFACTS

pytestmark = pytest.mark.slow

SECTIONS = {"model": {"name": "test_vit"}, "data": {"name": "digits"}}
TIMED = ["eval_seconds", "latency_ms"]


def _child(parent_dir, tmp_path, *overrides, name="child"):
    return fr.run(SECTIONS, [*IN_PROCESS_OVERRIDES, f"run.parent={parent_dir}", f"run.name={name}", *overrides],
                  backend="local", output=tmp_path / "children")  # fmt: skip


def test_a_child_with_the_same_settings_trains_nothing_and_finds_the_same_trials(in_process_run, tmp_path, caplog):
    cfg, _, _ = in_process_run
    parent = fr.Run.open(cfg.run.run_dir)
    with caplog.at_level(logging.INFO, logger="flora_ray"):
        child = _child(cfg.run.run_dir, tmp_path)
    for stage in ("pretrain", "filter", "train"):
        assert f"{stage}: done earlier" in caplog.text and f"{stage}: starting" not in caplog.text
        marker = child.store.read_json(ARTEFACTS.stage_marker(stage))
        assert marker["summary"]["from_parent"] == parent.store.uri
    assert "search: starting" in caplog.text
    assert child.store.read_bytes(ARTEFACTS.supernet) == parent.store.read_bytes(ARTEFACTS.supernet)
    for stage in ("pretrain", "filter", "train"):  # the parent's records, nothing trained here
        assert child.store.read_json(ARTEFACTS.stage_marker(stage))["seconds"] == parent.store.read_json(
            ARTEFACTS.stage_marker(stage))["seconds"]  # fmt: skip
    assert not list((Path(child.store.root) / ARTEFACTS.ray).glob("*pretrain*")) and not list(
        (Path(child.store.root) / ARTEFACTS.ray).glob("*train*")
    )  # no training checkpoints of its own
    pd.testing.assert_frame_equal(parent.trials.drop(columns=TIMED), child.trials.drop(columns=TIMED))
    assert child.config.run.parent == str(cfg.run.run_dir)


def test_a_child_searches_another_objective_on_the_parents_supernet(in_process_run, tmp_path):
    cfg, _, _ = in_process_run
    child = _child(cfg.run.run_dir, tmp_path, "search.objectives=[params]", "search.seed=3", name="params")
    summary = child.store.read_json(ARTEFACTS.search_summary)
    assert summary["cost_axis"] == "params" and summary["complete"] == 16
    front = child.front
    costs, accs = front["params"].to_numpy(), front["accuracy"].to_numpy()
    assert all(
        not ((costs <= c) & (accs >= a) & ((costs < c) | (accs > a))).any() for c, a in zip(costs, accs, strict=True)
    )


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.epochs=5", "train.epochs"),
        ("model.ratios=[0.5, 1.0]", "model.ratios"),
        ("run.seed=1", "run.seed"),
    ],
)
def test_a_child_that_changes_the_supernets_making_is_refused_before_anything_is_written(
    in_process_run, tmp_path, override, key
):
    cfg, _, _ = in_process_run
    with pytest.raises(
        InputError, match=f"was made with a different configuration for the stages a child takes over \\({key}"
    ):
        _child(cfg.run.run_dir, tmp_path, override)
    assert not (tmp_path / "children" / "child" / ARTEFACTS.run_config).exists()
    assert not (tmp_path / "children" / "child" / ARTEFACTS.supernet).exists()


def test_a_parent_that_is_not_a_trained_run_is_refused(in_process_run, tmp_path):
    cfg, _, _ = in_process_run
    with pytest.raises(InputError, match="is not a flora-ray run"):
        _child(tmp_path / "nowhere", tmp_path)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / ARTEFACTS.run_config).write_text((cfg.run.run_dir / ARTEFACTS.run_config).read_text())
    with pytest.raises(InputError, match="has not finished pretrain, filter, train"):
        _child(unfinished, tmp_path)

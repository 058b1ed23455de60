"""One finished digits run made by ``flora_ray.run`` (the local backend: every stage in this process), shared by the
tests of the run object and of the interactive front page."""

import pytest
from conftest import DIGITS_OVERRIDES

import flora_ray as fr

API_OVERRIDES = [
    *DIGITS_OVERRIDES,
    "run.name=api",
    "pretrain.epochs=4",
    "pretrain.lr=0.003",
    "filter.mode=zero_training",
    "filter.eval_images=100",
    "train.epochs=1",
    "search.trials=12",
    "search.population=4",
    "search.eval_images=150",
    "search.concurrency=1",
]


@pytest.fixture(scope="session")
def finished(tmp_path_factory):
    """``(run, base, overrides)``: ``flora_ray.run`` on a mapping of sections (the configuration a user builds in
    Python) with overrides, into ``base/runs``."""
    base = tmp_path_factory.mktemp("api")
    sections = {"model": {"name": "test_vit"}, "data": {"name": "digits"}}
    run = fr.run(sections, overrides=API_OVERRIDES, backend="local", output=base / "runs")
    return run, base, API_OVERRIDES

"""Autoscaling with Ray's real autoscaler: a local ``fake_multinode`` cluster (``flora_ray.testing.fake_cluster``).

The head has no CPUs and no accelerator; the only worker type has ``{"CPU": 1, "accel": 1}`` and starts at zero
nodes. Supernet training (two workers asking for ``scaling.accelerator=accel``) and then the search (evaluators
asking for ``search.gpus_per_trial`` of it) run as ``flora-ray`` subprocesses with ``--address``: nothing can run
until the autoscaler adds nodes for their demand, and the idle nodes must be removed afterwards. The GCS is
sampled every half second by the cluster's watcher; the checks read those samples.
"""

import json

import pandas as pd
import pytest

from flora_ray.config import dump_config
from flora_ray.storage.run_store import ARTEFACTS
from flora_ray.testing import skip_unless_ci
from flora_ray.testing.fake_cluster import HEAD_PORT, start_fake_cluster
from flora_ray.testing.processes import port_in_use

pytestmark = pytest.mark.slow

ACCEL_DEMAND = {"CPU": 1.0, "accel": 1.0}
RUN_OVERRIDES = [
    "run.name=autoscale",
    "train.epochs=1",
    "scaling.num_workers=2",
    "scaling.use_gpu=true",
    "scaling.accelerator=accel",
    "scaling.cpus_per_worker=1",
    "search.trials=4",
    "search.population=2",
    "search.eval_images=100",
    "search.concurrency=2",
    "search.cpus_per_trial=1",
    "search.gpus_per_trial=1",
]


@pytest.fixture
def cluster(tmp_path):
    if port_in_use(HEAD_PORT):
        skip_unless_ci(f"port {HEAD_PORT} is in use (another Ray head on this machine); the fake provider needs it",
                       "the autoscaling test")  # fmt: skip
    started = start_fake_cluster(tmp_path / "cluster")
    try:
        yield started
    finally:
        started.stop()
        assert not started.leftover_processes(), "processes of the fake cluster survived stop()"
        assert not started.temp_dir.exists()
        assert not port_in_use(HEAD_PORT)


def _window(samples, start, end):
    return [s for s in samples if start <= s["t"] <= end]


def _asked_for_accel(samples) -> bool:
    return any(bundle == ACCEL_DEMAND for s in samples for bundle, _count in s["demand"])


def _log(path) -> str:
    return path.read_text(errors="replace")[-4000:]


def test_training_and_search_scale_out_from_zero_and_back(cluster, digits_config, with_teacher, tmp_path):
    cfg = digits_config(*RUN_OVERRIDES)
    with_teacher(cfg)
    config_file = tmp_path / "autoscale.yaml"
    config_file.write_text(dump_config(cfg))
    assert cluster.samples()[0]["workers"] == 0, "the cluster must start without worker nodes"

    train = cluster.run_cli(["train", str(config_file)], tmp_path / "train.log", timeout_s=300)
    assert train["returncode"] == 0, _log(tmp_path / "train.log")
    assert (cfg.run.run_dir / ARTEFACTS.supernet).is_file()
    down_after_train = cluster.wait_for_workers(0, timeout_s=90)
    assert down_after_train is not None, "idle nodes were not removed after training"

    search = cluster.run_cli(["search", str(config_file)], tmp_path / "search.log", timeout_s=300)
    assert search["returncode"] == 0, _log(tmp_path / "search.log")
    trials = pd.read_parquet(cfg.run.run_dir / ARTEFACTS.trials)
    assert (trials["state"] == "COMPLETE").sum() == 4
    down_after_search = cluster.wait_for_workers(0, timeout_s=90)
    assert down_after_search is not None, "idle nodes were not removed after the search"

    samples = cluster.samples()
    (tmp_path / "timeline.json").write_text(json.dumps([(s["t"], s["workers"]) for s in samples]))
    during_train = _window(samples, train["started"], train["ended"])
    during_search = _window(samples, search["started"], search["ended"])
    # Training: two workers of {CPU: 1, accel: 1} only fit on two worker nodes (the head has neither).
    assert _asked_for_accel(during_train)
    assert max(s["workers"] for s in during_train) == 2
    assert all(s["workers"] <= 2 for s in samples), "max_workers was exceeded"
    # Search: it starts from zero nodes again, asks for the accelerator, and nodes come up for it.
    assert during_search[0]["workers"] == 0
    assert _asked_for_accel(during_search)
    assert max(s["workers"] for s in during_search) >= 1
    assert all(s["workers"] == 0 for s in samples if s["t"] >= down_after_search)

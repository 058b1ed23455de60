"""Ray Train end to end on a local 2-CPU Ray: 2 gloo workers, failure recovery.

(A driver interrupted in supernet training, resumed by re-running the command, and a teacher pretrained by two Ray
Train workers that ``flora_ray.build_supernet`` loads, are checked within the ``flora-ray run`` test in
``tests/pipeline/test_pipeline.py``, which shares that run.)
"""

import json

import pytest
import torch

from flora_ray.backends.ray import RayBackend
from flora_ray.core.supernet import load_supernet
from flora_ray.stages.training import train
from flora_ray.testing.faults import FaultyRayBackend
from flora_ray.training.trainer import STATE_FILE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    import ray

    from flora_ray.backends.ray import init_ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()


def _records(path):
    """The sampled subnet of every step and the process that logged it."""
    keys = ("epoch", "step", "global_step", "digest", "pid")
    return [{k: r[k] for k in keys} for r in map(json.loads, path.read_text().splitlines())]


def _steps(records):
    """``(epoch, step, global_step, digest)`` of each record: what both ranks must agree on."""
    return [(r["epoch"], r["step"], r["global_step"], r["digest"]) for r in records]


def _groups(records):
    """A rank's records of the first worker group and of the restarted one (a process each)."""
    pids = list(dict.fromkeys(r["pid"] for r in records))
    assert len(pids) == 2, pids  # one restart
    return [[r for r in records if r["pid"] == pid] for pid in pids]


def test_two_workers_train_the_same_subnet_every_step_and_restart_from_the_checkpoint(
    local_ray, digits_config, with_teacher, tmp_path
):
    """One Ray Train run, 2 gloo workers: rank 1 fails once at the start of the second epoch and the worker group
    restarts from the first epoch's checkpoint; both ranks sampled the same subnet at every step, before and after."""
    cfg = digits_config("train.epochs=3", "scaling.num_workers=2", "run.max_failures=1")
    with_teacher(cfg)
    marker = tmp_path / "failed-once"
    fault = {"epoch": 1, "rank": 1, "marker": str(marker)}
    outcome = train(cfg, FaultyRayBackend(fail=fault, sample_log=str(tmp_path / "samples")))
    assert marker.read_text() == "failed at epoch 1\n"
    history = json.loads((cfg.run.run_dir / "train_history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert {"search_acc_largest", "search_acc_smallest", "search_acc_middle", "loss"} <= set(history[-1])
    rank0, rank1 = _records(tmp_path / "samples" / "rank0.jsonl"), _records(tmp_path / "samples" / "rank1.jsonl")
    (first0, restarted0), (first1, restarted1) = (_groups(rank) for rank in (rank0, rank1))
    # The same subnet on both ranks at every step: in the first worker group (rank 0 may have begun one more step
    # before rank 1 failed) and in the restarted one, which began with the second epoch.
    assert _steps(first1) == _steps(first0)[: len(first1)] and len(first0) - len(first1) in (0, 1)
    assert _steps(restarted0) == _steps(restarted1) and restarted0[0]["epoch"] == 1
    for first in (first0, first1):
        epoch0 = [(d["epoch"], d["step"]) for d in first if d["epoch"] == 0]
        assert len(epoch0) == len(set(epoch0)) > 0
    for restarted in (restarted0, restarted1):
        assert all(d["epoch"] >= 1 for d in restarted)  # epoch 0 was not trained again after the restart
    assert len(rank0) > 4 and len({r["digest"] for r in rank0}) > 1  # a different subnet per step
    assert outcome["metrics"]["config_checks"] == len(restarted0)  # every step of the group verified by all-reduce
    supernet = load_supernet(outcome["output"])
    assert supernet.spec.name == "test_vit"
    checkpoints = [p for p in (cfg.run.run_dir / "ray" / f"{cfg.run.name}-train").glob("checkpoint_*") if p.is_dir()]
    kept = sorted(torch.load(p / STATE_FILE, weights_only=True)["epoch"] for p in checkpoints)
    assert kept == [2, 3]  # one per epoch, in the run's storage; Ray keeps the latest two


def test_two_workers_train_the_sandwich_inplace_recipe(local_ray, digits_config, with_teacher):
    """In-place distillation on Ray Train's path (2 gloo workers, DDP): each step's three subnets (the largest
    first, its logits the others' targets) train under ``no_sync`` but the last, and every step's draw is checked
    across workers."""
    cfg = digits_config("train.epochs=2", "scaling.num_workers=2", "train.recipe=sandwich_inplace")
    with_teacher(cfg)
    outcome = train(cfg, RayBackend())
    history = json.loads((cfg.run.run_dir / "train_history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert all({"search_acc_largest", "search_acc_smallest", "loss"} <= set(h) for h in history)
    checks = outcome["metrics"]["config_checks"]  # every step of both epochs, verified by all-reduce
    assert checks > 0 and checks % 2 == 0
    assert load_supernet(outcome["output"]).spec.name == "test_vit"

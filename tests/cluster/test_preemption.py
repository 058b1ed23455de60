"""Spot preemption on a real two-node cluster (``flora_ray.testing.multinode``): nothing lost, little repeated.

One run (a module fixture, shared by the three stage tests; a random teacher stands in for pretraining) goes
through filter, train and search on a head without CPUs and one worker node that shares only the storage directory; the worker node is killed (SIGKILL to all its processes) once
during ``filter``, once during ``train`` and once during ``search``, each time at a seeded random point after the
stage's first durable progress with work in flight, and a replacement node joins a few seconds later
(``flora_ray.testing.preemption``). The guarantees are checked from the artefacts in storage and the event logs.
A second test loses the head itself (driver, head and worker processes killed, the head's disk deleted) in the
middle of supernet training, and a new cluster resumes the run from storage.
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml

from flora_ray.config import config_to_dict, load_config
from flora_ray.core.space import RankSpace
from flora_ray.storage.run_store import ARTEFACTS, RunStore
from flora_ray.testing.faults import read_events
from flora_ray.testing.imagefolder import write_image_folder
from flora_ray.testing.preemption import CHECKPOINT_STEPS, FAST_FAILURE_DETECTION, SMALL_RUN, samples, unfinished
from flora_ray.training.sampling import build_sampler, config_digest, step_generator

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster_dirs():
    from flora_ray.testing.multinode import require_namespaces

    require_namespaces("the preemption tests")
    base = Path(tempfile.mkdtemp(prefix="frp-", dir="/tmp"))  # short: Ray's socket paths live below
    write_image_folder(base / "data", classes=12, train_per_class=24, val_per_class=6, size=32)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def _config(base: Path, name: str, *overrides: str):
    cfg = load_config(
        None,
        [*SMALL_RUN, f"run.name={name}", f"run.output_dir={base / name / 'head' / 'runs'}",
         f"run.storage={base / name / 'storage'}", f"data.root={base / 'data'}", *overrides],
    )  # fmt: skip
    (base / name / "head").mkdir(parents=True)
    config_file = base / name / "head" / "run.yaml"
    config_file.write_text(yaml.safe_dump(config_to_dict(cfg)))
    _random_teacher(cfg)
    return cfg, config_file


def _random_teacher(cfg) -> None:
    """A random dense teacher in storage, its stage recorded as done: the tests are about what comes after it."""
    from flora_ray.core.models import dense_checkpoint_metadata
    from flora_ray.stages.inputs import claim_run, resolve_model_spec

    store, spec = claim_run(cfg), resolve_model_spec(cfg)
    store.write_checkpoint(ARTEFACTS.teacher, spec.create().state_dict(), dense_checkpoint_metadata(spec))
    marker = {"stage": "pretrain", "seconds": 0.0, "finished_at": "2026-01-01T00:00:00+00:00",
              "summary": {"skipped": "a random teacher written by the test"}}  # fmt: skip
    store.write_json(ARTEFACTS.stage_marker("pretrain"), marker)


def _driver(config_file: Path, events: Path, *kill: str, until: str = "search") -> list[str]:
    return [sys.executable, "-m", "flora_ray.testing.preemption", str(config_file), "--events", str(events),
            "--seed", "0", "--gap", "2", "--work-seconds", "2", "--until", until, "--kill", *kill]  # fmt: skip


def _env() -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}, **FAST_FAILURE_DETECTION}


@pytest.fixture(scope="module")
def preempted_run(cluster_dirs):
    from flora_ray.testing.multinode import run_on_two_nodes

    cfg, config_file = _config(cluster_dirs, "spot")
    events = cluster_dirs / "spot" / "storage" / "events"  # every node sees the storage directory
    result = run_on_two_nodes(
        _driver(config_file, events, "filter", "train", "search"), hide=[cluster_dirs / "spot" / "head"], env=_env(),
        timeout_s=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-8000:]
    return cfg, RunStore.for_config(cfg), events


def _killed(events: Path, stage: str) -> tuple[float, float]:
    """When the worker node was killed during ``stage`` and when its replacement had joined."""
    log = read_events(events / "events")
    killed = [e["time"] for e in log if e["kind"] == "node_killed" and e["stage"] == stage]
    added = [e["time"] for e in log if e["kind"] == "node_added" and e["stage"] == stage]
    assert len(killed) == 1 and len(added) == 1, f"{stage}: {len(killed)} kills, {len(added)} replacements"
    return killed[0], added[0]


def _expected_digests(cfg, store: RunStore, steps: list[tuple[int, int]]) -> dict[tuple[int, int], int]:
    """What an uninterrupted run draws at each (epoch, step): the sampler is a function of (seed, epoch, step)."""
    space = RankSpace.from_dict(store.read_checkpoint_header(ARTEFACTS.supernet)["space"])
    sampler = build_sampler(cfg.train.sampler, space)
    return {(e, s): config_digest(sampler.sample(step_generator(cfg.run.seed, e, s))[-1]) for e, s in steps}


def _check_training(cfg, store: RunStore, records: list[dict], killed_at: float) -> None:
    """Right epochs, the uninterrupted draws at every step, at most one checkpoint interval of finished steps (plus
    the step in flight) repeated per rank."""
    history = store.read_json(ARTEFACTS.history("train"))
    assert [h["epoch"] for h in history] == list(range(1, cfg.train.epochs + 1))
    for rank in {r["rank"] for r in records}:
        mine = [r for r in records if r["rank"] == rank]
        counts = Counter((r["epoch"], r["step"]) for r in mine)
        steps_per_epoch = max(s for e, s in counts if e == 0) + 1
        assert set(counts) == {(e, s) for e in range(cfg.train.epochs) for s in range(steps_per_epoch)}
        repeated = sum(n - 1 for n in counts.values())  # steps logged twice: done after the checkpoint, or in flight
        timeline = [(r["epoch"], r["step"], r["global_step"], round(r["time"] - killed_at, 2)) for r in mine]
        assert 1 <= repeated <= CHECKPOINT_STEPS + 1, f"rank {rank}: {repeated} steps repeated: {timeline}"
        drawn = {(r["epoch"], r["step"]): r["digest"] for r in mine}
        assert drawn == _expected_digests(cfg, store, sorted(drawn))
        before = {r["pid"] for r in mine if r["time"] < killed_at}
        after = {r["pid"] for r in mine if r["time"] > killed_at}
        assert after and not before & after  # a new worker group on the replacement node finished the run


def test_training_survives_a_reclaimed_worker_node(preempted_run):
    cfg, store, events = preempted_run
    killed_at, _ = _killed(events, "train")
    _check_training(cfg, store, samples(events), killed_at)


def test_filter_keeps_finished_blocks_and_runs_lost_ones_again(preempted_run):
    _cfg, store, events = preempted_run
    killed_at, _ = _killed(events, "filter")
    log = [e for e in read_events(events / "events") if e["kind"] in ("task_start", "task_end")]
    blocks = range(len(RankSpace.from_dict(store.read_json(ARTEFACTS.space)).blocks))
    ends = Counter(e["item"] for e in log if e["kind"] == "task_end")
    starts = Counter(e["item"] for e in log if e["kind"] == "task_start")
    assert ends == dict.fromkeys(blocks, 1)  # every block finished exactly once
    finished_before = {e["item"] for e in log if e["kind"] == "task_end" and e["time"] < killed_at}
    lost = {e["item"] for e in unfinished(log, "filter", killed_at)}
    assert finished_before and lost
    assert all(starts[b] == 1 for b in finished_before)  # kept: never run again
    assert all(starts[b] == 2 for b in lost)  # run again after the reclaim
    scores = pd.read_parquet(store.local_path(ARTEFACTS.filter_scores))
    assert sorted(scores["block_index"].unique()) == list(blocks)


def test_search_evaluates_lost_trials_again(preempted_run):
    cfg, store, events = preempted_run
    killed_at, _ = _killed(events, "search")
    study = optuna.load_study(
        study_name=f"{cfg.run.name}-search",
        storage=optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(store.local_path(ARTEFACTS.journal)))
        ),
    )
    states = Counter(t.state.name for t in study.trials)
    assert states == {"COMPLETE": cfg.search.trials}  # the lost trials were evaluated again, not failed
    log = [e for e in read_events(events / "events") if e["kind"] in ("trial_start", "trial_end")]
    assert sum(e["kind"] == "trial_end" for e in log) == cfg.search.trials  # none evaluated twice to completion
    key = lambda e: json.dumps(e["genes"], sort_keys=True)  # noqa: E731
    lost = {key(e) for e in unfinished(log, "search", killed_at)}
    assert lost
    again = {key(e) for e in log if e["kind"] == "trial_end" and e["time"] > killed_at}
    assert lost <= again
    trials = pd.read_parquet(store.local_path(ARTEFACTS.trials))
    generations = trials.sort_values("trial")["generation"].tolist()
    # NSGA-II went on from its state: generations never go back, and the offspring of the first one were bred
    assert generations == sorted(generations) and generations[-1] >= 1, generations


def _reached(events: Path, global_step: int) -> bool:
    return (events / "samples").is_dir() and any(r["global_step"] >= global_step for r in samples(events))


def _kill_tree(marker: str) -> None:
    """SIGKILL every process whose command line contains ``marker`` (the harness, its nodes, the driver)."""
    from flora_ray.testing.multinode import live_processes

    for pid in live_processes(marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_a_lost_head_resumes_from_storage(cluster_dirs):
    """Driver, head and worker processes SIGKILLed after the first mid-epoch checkpoint of supernet training, the
    head's disk deleted; a new cluster with the same run.storage resumes the run with the same guarantees."""
    from flora_ray.testing.multinode import harness_command, run_on_two_nodes

    cfg, config_file = _config(cluster_dirs, "head", "filter.mode=zero_training")  # training is what is tested
    head, events = cluster_dirs / "head" / "head", cluster_dirs / "head" / "storage" / "events"
    temp_root = Path(tempfile.mkdtemp(prefix="frh-", dir="/tmp"))
    command = harness_command(_driver(config_file, events, until="train"), [head], timeout_s=600, temp_root=temp_root)
    first = subprocess.Popen(command, env=_env(), start_new_session=True, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)  # fmt: skip
    target = CHECKPOINT_STEPS + 1
    deadline = time.monotonic() + 600
    try:
        while not _reached(events, target):
            assert first.poll() is None, first.stdout.read()[-5000:]
            assert time.monotonic() < deadline, "supernet training never reached its first checkpoint"
            time.sleep(0.05)
        killed_at = time.time()
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        _kill_tree(str(temp_root))
        _kill_tree(str(config_file))
        first.wait(timeout=60)
    for item in head.iterdir():  # the head's disk is gone (but for the config the user submits again)
        if item.is_dir():
            shutil.rmtree(item)
        elif item != config_file:
            item.unlink()
    shutil.rmtree(temp_root, ignore_errors=True)
    second = run_on_two_nodes(_driver(config_file, events, until="train"), hide=[head], env=_env(), timeout_s=900)
    assert second.returncode == 0, second.stdout[-5000:] + second.stderr[-8000:]
    store = RunStore.for_config(cfg)
    assert store.is_file(ARTEFACTS.stage_marker("train"))
    _check_training(cfg, store, samples(events), killed_at)

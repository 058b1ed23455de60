"""Spot preemption on a real two-node cluster (``flora_ray.testing.multinode``): nothing lost, little repeated.

One run (a module fixture, shared by every test; a random teacher stands in for pretraining, and the profile stage is
switched off: no latency table) goes through filter, train and search on a head without CPUs and one worker node that
shares only the storage directory; the worker node is killed (SIGKILL to all its processes) once during ``filter``, once
during ``train`` and once during ``search``, each time at a seeded random point after the stage's first durable progress
with work in flight, and a replacement node joins a few seconds later (``flora_ray.testing.preemption``). Later in
``train``, once the restarted worker group has passed a checkpoint of its own, the head itself is lost: driver, head and
worker processes are SIGKILLed and the head's disk is deleted; a new cluster with the same ``run.storage`` resumes the
run from storage and goes on to the search (with its own reclaim). The guarantees are checked from the artefacts in
storage and the event logs.
"""

import contextlib
import itertools
import json
import math
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
from flora_ray.search.study import DUPLICATE_OF
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


# No latency table: no test here reads one, and the profile stage (a Ray task before filter) is never reclaimed.
NO_PROFILE = ["profile.enabled=false"]


def _config(base: Path, name: str, *overrides: str):
    cfg = load_config(
        None,
        [*SMALL_RUN, *NO_PROFILE, f"run.name={name}", f"run.output_dir={base / name / 'head' / 'runs'}",
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
    """The run: filter and train with a reclaim each on a first cluster whose head is then lost in ``train``; the
    rest of ``train`` and the search (with a reclaim) on a second one. Returns the config, the store, the events
    directory and when the head was lost (all of its processes dead)."""
    from flora_ray.testing.multinode import run_on_two_nodes

    cfg, config_file = _config(cluster_dirs, "spot")
    head = cluster_dirs / "spot" / "head"
    events = cluster_dirs / "spot" / "storage" / "events"  # every node sees the storage directory
    head_lost_at = _lose_the_head(config_file, head, events, cluster_dirs / "spot" / "first.log")
    for item in head.iterdir():  # the head's disk is gone (but for the config the user submits again)
        if item.is_dir():
            shutil.rmtree(item)
        elif item != config_file:
            item.unlink()
    result = run_on_two_nodes(_driver(config_file, events, "search"), hide=[head], env=_env(), timeout_s=900)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-8000:]
    return cfg, RunStore.for_config(cfg), events, head_lost_at


def _restarted_past_a_checkpoint(events: Path) -> bool:
    """Whether the worker group that training restarted after its reclaim has passed a checkpoint of its own: a
    step ``CHECKPOINT_STEPS + 1`` past the one it resumed at (that checkpoint is then registered in storage)."""
    log = read_events(events / "events")
    if not any(e["kind"] == "node_added" and e["stage"] == "train" for e in log):
        return False
    killed_at = next(e["time"] for e in log if e["kind"] == "node_killed" and e["stage"] == "train")
    steps = [r["global_step"] for r in samples(events) if r["time"] > killed_at]
    return bool(steps) and max(steps) >= min(steps) + CHECKPOINT_STEPS + 1


def _lose_the_head(config_file: Path, head: Path, events: Path, log: Path) -> float:
    """Run filter and train (a reclaim in each) on a first cluster and SIGKILL driver, head and worker processes
    once ``_restarted_past_a_checkpoint``; when the last of them was dead."""
    from flora_ray.testing.multinode import harness_command

    temp_root = Path(tempfile.mkdtemp(prefix="frh-", dir="/tmp"))
    driver = _driver(config_file, events, "filter", "train", until="train")
    command = harness_command(driver, [head], timeout_s=600, temp_root=temp_root)
    with open(log, "w") as output:  # a file, not a pipe: a full pipe would stall the driver
        first = subprocess.Popen(command, env=_env(), start_new_session=True, stdout=output, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    try:
        while not _restarted_past_a_checkpoint(events):
            assert first.poll() is None, "the first cluster ended before its head was lost: " + _tail(log)
            assert time.monotonic() < deadline, "training never passed a checkpoint after its reclaim: " + _tail(log)
            time.sleep(0.05)
    finally:
        _kill_cluster(first.pid)
        first.wait(timeout=60)
    lost_at = time.time()
    shutil.rmtree(temp_root, ignore_errors=True)
    return lost_at


def _kill_cluster(harness: int) -> None:
    """SIGKILL every process of the cluster around the harness process ``harness`` at once (driver, nodes and Ray's
    workers: everything in its network namespace), until none is left. Ray's workers rename themselves
    (``ray::...``) and would otherwise outlive their node by a moment, still training."""
    try:
        netns = os.stat(f"/proc/{harness}/ns/net")
    except OSError:  # it has exited: nothing to lose
        return
    if os.path.samestat(netns, os.stat("/proc/self/ns/net")):  # not in a namespace of its own (yet)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(harness, signal.SIGKILL)
        return
    deadline = time.monotonic() + 30
    while pids := _processes_in(netns):
        assert time.monotonic() < deadline, f"processes of the lost cluster survived SIGKILL: {pids}"
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def _processes_in(netns: os.stat_result) -> list[int]:
    """Live (non-zombie) processes in the network namespace ``netns``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            inside = os.path.samestat(os.stat(entry / "ns" / "net"), netns)
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if inside and state != "Z":
            pids.append(int(entry.name))
    return pids


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-5000:]


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


def _check_training(cfg, store: RunStore, records: list[dict], interruptions: list[float]) -> None:
    """Right epochs, the uninterrupted draws at every step, and per interruption (the times, in order) at most one
    checkpoint interval of finished steps (plus the step in flight) repeated per rank, by a new worker group."""
    history = store.read_json(ARTEFACTS.history("train"))
    assert [h["epoch"] for h in history] == list(range(1, cfg.train.epochs + 1))
    bounds = [-math.inf, *interruptions, math.inf]
    for rank in {r["rank"] for r in records}:
        mine = [r for r in records if r["rank"] == rank]
        counts = Counter((r["epoch"], r["step"]) for r in mine)
        steps_per_epoch = max(s for e, s in counts if e == 0) + 1
        assert set(counts) == {(e, s) for e in range(cfg.train.epochs) for s in range(steps_per_epoch)}
        drawn = {(r["epoch"], r["step"]): r["digest"] for r in mine}
        assert drawn == _expected_digests(cfg, store, sorted(drawn))
        assert all(r["digest"] == drawn[(r["epoch"], r["step"])] for r in mine)  # repeated steps drew the same
        segments = [[r for r in mine if lo < r["time"] < hi] for lo, hi in itertools.pairwise(bounds)]
        timeline = [(r["epoch"], r["step"], r["global_step"], r["pid"], round(r["time"], 2)) for r in mine]
        repeats = []
        for i, after in enumerate(segments[1:], start=1):
            done = {(r["epoch"], r["step"]) for segment in segments[:i] for r in segment}
            repeats.append(sum((r["epoch"], r["step"]) in done for r in after))  # done after the checkpoint, in flight
            assert 1 <= repeats[-1] <= CHECKPOINT_STEPS + 1, f"rank {rank}, interruption {i}: {repeats}: {timeline}"
            before = {r["pid"] for r in segments[i - 1]}
            assert after and not before & {r["pid"] for r in after}  # a new worker group went on, then finished
        assert sum(n - 1 for n in counts.values()) == sum(repeats), timeline  # nothing repeated but after them


def test_training_survives_a_reclaimed_worker_node_and_a_lost_head(preempted_run):
    """The worker node reclaimed after the first mid-epoch checkpoint, later the head lost with its disk: a new
    cluster resumes from storage, with the same guarantees after each interruption."""
    cfg, store, events, head_lost_at = preempted_run
    killed_at, _ = _killed(events, "train")
    assert killed_at < head_lost_at
    assert store.is_file(ARTEFACTS.stage_marker("train"))
    _check_training(cfg, store, samples(events), [killed_at, head_lost_at])


def test_filter_keeps_finished_blocks_and_runs_lost_ones_again(preempted_run):
    _cfg, store, events, _ = preempted_run
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
    cfg, store, events, head_lost_at = preempted_run
    killed_at, _ = _killed(events, "search")
    assert killed_at > head_lost_at  # on the second cluster
    study = optuna.load_study(
        study_name=f"{cfg.run.name}-search",
        storage=optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(store.local_path(ARTEFACTS.journal)))
        ),
    )
    states = Counter(t.state.name for t in study.trials if DUPLICATE_OF not in t.user_attrs)  # evaluations only
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

"""Spot reclaims during a run on the two-node harness: the driver kills the worker node once in chosen stages.

``python -m flora_ray.testing.preemption CONFIG --events DIR [--kill filter train search] [--seed S] [--gap S]``
runs as the two-node harness's COMMAND (``flora_ray.testing.multinode``). It runs the run's stages in order
(``pipeline.run_stage``, skipping finished ones) on Ray with a ``FaultyRayBackend`` that logs into ``DIR``, a
directory every node sees: training steps (``DIR/samples/rank<r>.jsonl``), filter tasks and trial evaluations
(``DIR/events``). For each stage named by ``--kill``, a thread waits for the stage's first durable progress, then
for a seeded random amount of further progress while work is in flight:

* ``train`` (the supernet, whose steps are logged): a step one to two checkpoint intervals past the first
  mid-epoch checkpoint;
* ``filter``: one or two finished blocks with another block's task running;
* ``search``: one to three finished trials with another trial being evaluated;

then kills the worker node (SIGKILL to all its processes, as a spot reclaim does), waits ``--gap`` seconds and adds
a replacement node. Kill and replacement times are logged as events. The stage must finish by itself (Ray Train
restarts the worker group from the latest checkpoint, lost tasks and trials run again). ``read_events`` and the run's
artefacts are what tests and ``experiments/benchmarks/preemption.py`` check and measure.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flora_ray.testing.faults import log_event, read_events

KILLABLE = ("filter", "train", "search")
# The events of one unit of work of a stage: (start, end, the field that names the unit).
WORK = {"filter": ("task_start", "task_end", "item"), "search": ("trial_start", "trial_end", "genes")}
CHECKPOINT_STEPS = 2
# A small run (depth-4 ViT, 4 filter blocks, 14 supernet steps, 10 trials) for the tests and the benchmark, on a
# 12-class folder of 32 px JPEG files; the benchmark's full size adds epochs and trials.
SMALL_RUN = [
    "model.name=test_vit",
    "model.kwargs={patch_size: 8, embed_dim: 32, depth: 4, num_heads: 2, mlp_ratio: 2}",
    "model.ratios=[0.25, 0.5, 1.0]",
    "data.name=imagefolder", "data.img_size=32", "data.in_chans=3", "data.search_per_class=4", "data.augment=true",
    "pretrain.epochs=2", "pretrain.batch_size=32", "pretrain.lr=0.003", "pretrain.warmup_epochs=0",
    "filter.epochs=1", "filter.batch_size=32", "filter.eval_images=48", "filter.subset=0.5", "filter.concurrency=2",
    "train.epochs=2", "train.batch_size=16", "train.warmup_epochs=0", "train.eval_images=48",
    f"train.checkpoint_every_steps={CHECKPOINT_STEPS}",
    "search.trials=10", "search.population=4", "search.eval_images=48", "search.concurrency=2",
    "search.guided_anchors=false",  # uniform anchors only: 10 trials leave NSGA-II a second generation to breed
    "run.threads_per_worker=1", "run.max_failures=10", "scaling.num_workers=2",
]  # fmt: skip
# The head marks a dead node after about 1.5 s instead of Ray's default 15 s (raylet health checks).
FAST_FAILURE_DETECTION = {"RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "3"}
STAGE_NAMES = ("pretrain", "filter", "train", "search", "export", "report")


def samples(events_dir: Path) -> list[dict[str, Any]]:
    """The training step records of every rank, in time order."""
    records = []
    for path in sorted((events_dir / "samples").glob("rank*.jsonl")):
        rank = int(path.stem.removeprefix("rank"))
        records += [{**json.loads(line), "rank": rank} for line in path.read_text().splitlines() if line.strip()]
    return sorted(records, key=lambda r: r["time"])


def unfinished(log: list[dict[str, Any]], stage: str, before: float = math.inf) -> list[dict[str, Any]]:
    """The ``stage``'s (``filter`` or ``search``) work started before ``before`` and not finished before it."""
    start, end, key = WORK[stage]
    ident = lambda e: json.dumps(e[key], sort_keys=True)  # noqa: E731
    finished = {ident(e) for e in log if e["kind"] == end and e["time"] < before}
    return [e for e in log if e["kind"] == start and e["time"] < before and ident(e) not in finished]


def kill_condition(stage: str, cfg: Any, events_dir: Path, rng: random.Random) -> Callable[[], bool]:
    """When to reclaim the worker node during ``stage`` (see the module docstring)."""
    if stage == "train":
        every = cfg.train.checkpoint_every_steps
        if not every:
            raise ValueError("train.checkpoint_every_steps must be set to kill after the first checkpoint")
        target = every + rng.randint(1, every)
        return lambda: any(r["global_step"] >= target for r in samples(events_dir))
    target = rng.randint(1, 2 if stage == "filter" else 3)

    def ready() -> bool:
        log = read_events(events_dir / "events")
        done = sum(e["kind"] == WORK[stage][1] for e in log)
        return done >= target and bool(unfinished(log, stage))

    return ready


def reclaim(stage: str, ready: Callable[[], bool], events_dir: Path, gap_s: float, stop: threading.Event) -> None:
    """Wait for ``ready()``, kill the worker node, wait ``gap_s``, add a replacement; log each step."""
    from flora_ray.testing.multinode import control

    while not ready():
        if stop.wait(0.05):
            return
    reply = control("kill-worker")
    log_event(events_dir / "events", "node_killed", stage=stage, reply=reply)
    time.sleep(gap_s)
    reply = control("add-worker", timeout_s=120)
    log_event(events_dir / "events", "node_added", stage=stage, reply=reply)


def run(
    config: str,
    events_dir: Path,
    kill: Sequence[str],
    seed: int,
    gap_s: float,
    work_s: float = 0.0,
    until: str | None = None,
) -> dict[str, Any]:
    """Run every unfinished stage of ``config`` (up to ``until``) on the harness's cluster, reclaiming the worker
    node in the stages named by ``kill``."""
    import ray

    from flora_ray.backends.ray import init_ray
    from flora_ray.config import load_config
    from flora_ray.pipeline import run_stage, stage_marker
    from flora_ray.stages import STAGES
    from flora_ray.stages.inputs import claim_run
    from flora_ray.testing.faults import FaultyRayBackend

    cfg = load_config(config)
    store = claim_run(cfg)
    rng = random.Random(seed)
    backend = FaultyRayBackend(
        sample_log=str(events_dir / "samples"), event_log=str(events_dir / "events"), min_work_seconds=work_s
    )
    init_ray("auto")
    seconds: dict[str, float] = {}
    try:
        for stage in STAGES:
            if stage_marker(store, stage) is not None:
                continue
            stop = threading.Event()
            killer = None
            if stage in kill:
                ready = kill_condition(stage, cfg, events_dir, rng)
                killer = threading.Thread(target=reclaim, args=(stage, ready, events_dir, gap_s, stop), daemon=True)
                killer.start()
            log_event(events_dir / "events", "stage_start", stage=stage)
            started = time.perf_counter()
            try:
                run_stage(cfg, stage, backend)
            finally:
                stop.set()
                if killer is not None:
                    killer.join(timeout=180)
            seconds[stage] = time.perf_counter() - started
            log_event(events_dir / "events", "stage_end", stage=stage, seconds=seconds[stage])
            if stage == until:
                break
    finally:
        ray.shutdown()
    return {"seconds": seconds}


def _training_cost(events_dir: Path, killed: float) -> dict[str, Any]:
    records = samples(events_dir)
    after = [r["time"] for r in records if r["time"] > killed]
    repeated = 0
    for rank in {r["rank"] for r in records}:
        keys = [(r["epoch"], r["step"]) for r in records if r["rank"] == rank]
        repeated = max(repeated, len(keys) - len(set(keys)))
    first = [r for r in records if r["rank"] == 0 and r["time"] < killed]  # one process, before the reclaim
    gaps = [b["time"] - a["time"] for a, b in itertools.pairwise(first) if b["pid"] == a["pid"]]
    step_s = statistics.median(gaps) if gaps else 0.0
    return {"resumed_s": min(after) - killed if after else None, "redone": repeated, "unit": "steps",
            "redone_s": repeated * step_s}  # fmt: skip


def _work_cost(log: list[dict[str, Any]], stage: str, killed: float, unit: str) -> dict[str, Any]:
    lost = unfinished(log, stage, killed)
    restarted = [e["time"] for e in log if e["kind"] == WORK[stage][0] and e["time"] > killed]
    return {"resumed_s": min(restarted) - killed if restarted else None, "redone": len(lost), "unit": unit,
            "redone_s": sum(killed - e["time"] for e in lost)}  # fmt: skip


def costs(events_dir: Path) -> list[dict[str, Any]]:
    """Per reclaim: the stage, seconds from the kill to the replacement node and to resumed progress (the first
    training step, filter task or trial evaluation started after it), and the work redone (steps repeated,
    blocks or trials lost) with the seconds it had run."""
    log = read_events(events_dir / "events")
    rows = []
    for kill in (e for e in log if e["kind"] == "node_killed"):
        stage, killed = kill["stage"], kill["time"]
        added = next(e["time"] for e in log if e["kind"] == "node_added" and e["stage"] == stage)
        if stage == "train":
            cost = _training_cost(events_dir, killed)
        elif stage == "filter":
            cost = _work_cost(log, "filter", killed, "blocks")
        else:
            cost = _work_cost(log, "search", killed, "trials")
        rows.append({"stage": stage, "replacement_s": added - killed, **cost})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flora_ray.testing.preemption", description=__doc__.split("\n")[0])
    parser.add_argument("config")
    parser.add_argument("--events", type=Path, required=True, help="a directory every node sees")
    parser.add_argument("--kill", nargs="*", default=[], choices=KILLABLE, help="stages whose worker node is reclaimed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gap", type=float, default=3.0, help="seconds without a worker node after each kill")
    parser.add_argument(
        "--work-seconds", type=float, default=0.0, help="stretch each filter task and evaluation to this long"
    )
    parser.add_argument("--until", choices=STAGE_NAMES, help="stop after this stage")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    summary = run(args.config, args.events, args.kill, args.seed, args.gap, args.work_seconds, args.until)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

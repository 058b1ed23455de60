"""What one spot reclaim costs in each stage: seconds from the kill to resumed progress, and the work redone.

A real two-node Ray cluster on this machine (``flora_ray.testing.multinode``: a head without CPUs, one 2-CPU worker
node that shares only the storage directory, inside a loopback-only network namespace) runs the whole pipeline on a
generated image folder of JPEG files. ``flora_ray.testing.preemption`` kills the worker node (SIGKILL to all its
processes) once in ``filter``, ``train`` and ``search``, each at a seeded random point after the stage's first
durable progress with work in flight, and adds a replacement node ``--gap`` seconds later. Per reclaim the table
shows: seconds from the kill until the replacement node had joined, until progress resumed (the first training
step, filter task or trial evaluation started afterwards), and the work redone (training steps repeated, filter
blocks or trials lost) with the seconds it had run. Writes ``results/preemption.json``.

    .venv/bin/python experiments/benchmarks/preemption.py            # 3 epochs, 4 blocks, 16 trials
    .venv/bin/python experiments/benchmarks/preemption.py --smoke    # the test's sizes

Needs root (network and mount namespaces), like ``tests/cluster/test_preemption.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml
from harness import bench_parser, environment, write_result

from flora_ray.config import config_to_dict, load_config
from flora_ray.testing.imagefolder import write_image_folder
from flora_ray.testing.multinode import can_make_namespaces, run_on_two_nodes
from flora_ray.testing.preemption import CHECKPOINT_STEPS, FAST_FAILURE_DETECTION, SMALL_RUN, costs

SIZES = {"full": ["train.epochs=3", "search.trials=16"], "smoke": []}


def run(base: Path, size: str, gap_s: float, seed: int) -> tuple[list[dict], float]:
    """One preempted pipeline run; returns the per-reclaim costs and the wall time."""
    write_image_folder(base / "data", classes=12, train_per_class=24, val_per_class=6, size=32)
    head, storage = base / "head", base / "storage"
    head.mkdir()
    cfg = load_config(
        None,
        [*SMALL_RUN, *SIZES[size], "run.name=bench", f"run.output_dir={head / 'runs'}", f"run.storage={storage}",
         f"data.root={base / 'data'}"],
    )  # fmt: skip
    (head / "run.yaml").write_text(yaml.safe_dump(config_to_dict(cfg)))
    events = storage / "events"
    driver = [sys.executable, "-m", "flora_ray.testing.preemption", str(head / "run.yaml"), "--events", str(events),
              "--seed", str(seed), "--gap", str(gap_s), "--work-seconds", "2", "--kill", "filter", "train", "search"]  # fmt: skip
    env = {**os.environ, **FAST_FAILURE_DETECTION}
    started = time.perf_counter()
    result = run_on_two_nodes(driver, hide=[head], env=env, timeout_s=1500)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"the preempted run failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return costs(events), wall


def table(rows: list[dict]) -> str:
    lines = ["| stage | kill -> replacement joined (s) | kill -> progress resumed (s) | work redone | redone work ran (s) |",
             "| --- | ---: | ---: | --- | ---: |"]  # fmt: skip
    for r in rows:
        resumed = "-" if r["resumed_s"] is None else f"{r['resumed_s']:.1f}"
        lines.append(
            f"| {r['stage']} | {r['replacement_s']:.1f} | {resumed} | {r['redone']} {r['unit']} | {r['redone_s']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = bench_parser(__doc__, smoke_help="the test's sizes (2 epochs, 10 trials)")
    parser.add_argument("--gap", type=float, default=3.0, help="seconds without a worker node after each kill")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill points")
    args = parser.parse_args()
    if not can_make_namespaces():
        raise SystemExit("needs network and mount namespaces (root): unshare --net and unshare --mount")
    base = Path(tempfile.mkdtemp(prefix="frb-", dir="/tmp"))  # short: Ray's socket paths live below
    try:
        env_before = environment(threads=1)
        rows, wall = run(base, "smoke" if args.smoke else "full", args.gap, args.seed)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(table(rows))
    print(f"whole preempted run: {wall:.0f} s (gap without a worker node: {args.gap:.0f} s per reclaim)")
    record = {"environment": env_before, "loadavg_after": list(os.getloadavg()), "gap_s": args.gap,
              "seed": args.seed, "checkpoint_every_steps": CHECKPOINT_STEPS, "wall_s": wall, "reclaims": rows,
              "size": "smoke" if args.smoke else "full"}  # fmt: skip
    path = write_result(args.output / "preemption.json", record)
    print(json.dumps({"written": str(path)}))


if __name__ == "__main__":
    main()

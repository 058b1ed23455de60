"""Scaling: Ray Train data-parallel throughput with 1 and 2 workers, Ray Tune evaluation throughput with 1 and 2
evaluator actors, and the efficiency (speedup / workers).

Training runs ``stages.training.train(cfg, RayBackend())`` (the ``flora-ray train`` path: supernet distillation
from a random-init teacher) on the quickstart config with a share of Fashion-MNIST, one CPU and one torch thread per
worker; throughput is the last epoch's ``images_per_s`` that the workers report (images of all workers / epoch
seconds, evaluation and Ray start-up excluded). The search runs ``stages.search.search_stage(cfg, RayBackend())``
(Ray Tune + Optuna NSGA-II, reused evaluator actors, one CPU and thread each) with ``search.concurrency`` 1 and 2;
throughput is the steady-state trials/s (from each actor's first completed trial to the last one, so that actor
start-up and the supernet build are excluded) and, for reference, trials / the Tuner's whole wall time. The machine
has 2 cores, so 2 workers can at best be 2x (efficiency 1.0) and share them with anything else running; every
measurement is repeated (worker counts in ABBA order) and averaged, and the machine's CPU busy share over each run
is recorded. Prints a table, writes ``results/scaling.json``.

    .venv/bin/python experiments/benchmarks/scaling.py            # full run (about 6 minutes on 2 CPU cores)
    .venv/bin/python experiments/benchmarks/scaling.py --smoke    # tiny data and few trials (about 1.5 minutes)
"""

from __future__ import annotations

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # local Ray on 127.0.0.1 only; before Ray is imported

import dataclasses
import logging
import tempfile
import time
from pathlib import Path

import torch
from harness import EXPERIMENTS, bench_parser, environment, write_result
from harness_runs import prepare_search_run

from flora_ray.backends.ray import RayBackend, init_ray
from flora_ray.config import load_config
from flora_ray.core.models import dense_checkpoint_metadata
from flora_ray.results import load_trials
from flora_ray.stages.inputs import resolve_model_spec
from flora_ray.stages.search import search_problem, search_stage
from flora_ray.stages.training import train
from flora_ray.storage.run_store import ARTEFACTS, RunStore

WORKER_COUNTS = (1, 2)


def cpu_times() -> tuple[int, int]:
    """Busy and total jiffies of all CPUs since boot (``/proc/stat``): every process, not only this benchmark's."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def with_cpu_busy(measure, *args) -> dict:
    """Run ``measure(*args)`` and add the machine's CPU busy share over its run (1.0: every core busy)."""
    busy0, total0 = cpu_times()
    row = measure(*args)
    busy1, total1 = cpu_times()
    row["machine_cpu_busy"] = (busy1 - busy0) / max(total1 - total0, 1)
    return row


def train_throughput(workers: int, out: Path, train_subset: float, epochs: int) -> dict:
    """Supernet training on Ray Train with ``workers`` data-parallel workers; the last epoch's images/s."""
    cfg = load_config(
        EXPERIMENTS / "quickstart.yaml",
        [
            f"run.output_dir={out}",
            f"run.name=scaling-train-{workers}",
            "run.threads_per_worker=1",
            f"scaling.num_workers={workers}",
            "scaling.cpus_per_worker=1",
            f"data.train_subset={train_subset}",
            f"train.epochs={epochs}",
            "train.warmup_epochs=0",
            "train.eval_images=200",
            "train.log_every=1000",
        ],
    )
    spec = resolve_model_spec(cfg)
    store = RunStore.for_config(cfg)
    store.write_checkpoint(ARTEFACTS.teacher, spec.create().state_dict(), dense_checkpoint_metadata(spec))
    result = train(cfg, RayBackend())
    images_per_s = float(result["metrics"]["images_per_s"])
    return {
        "kind": "Ray Train supernet training",
        "workers": workers,
        "unit": "images/s",
        "throughput": images_per_s,
        "step_ms": 1e3 * cfg.train.batch_size * workers / images_per_s,  # one worker's step (its batch)
        "wall_s": result["seconds"],
        "epochs": epochs,
        "batch_per_worker": cfg.train.batch_size,
    }


def steady_trials_per_s(cfg, actors: int) -> float:
    """Trials/s between the first completion of each actor and the last completion (actor start-up excluded), from
    the completion times in the search's Optuna journal."""
    study = search_problem(cfg, RunStore.for_config(cfg)).load_study()
    done = sorted(t.datetime_complete for t in study.trials if t.datetime_complete is not None)
    span = (done[-1] - done[actors - 1]).total_seconds()
    return (len(done) - actors) / max(span, 1e-6)


def search_throughput(actors: int, out: Path, trials: int, eval_images: int) -> dict:
    """The search with ``actors`` evaluator actors (``search.concurrency``): steady-state trials/s and images/s."""
    cfg, _ = prepare_search_run(trials, eval_images, out)
    cfg = dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, concurrency=actors))
    summary = search_stage(cfg, RayBackend())
    steady = steady_trials_per_s(cfg, actors)
    return {
        "kind": "Ray Tune subnet evaluation",
        "workers": actors,
        "unit": "trials/s",
        "throughput": steady,
        "images_per_s": steady * eval_images,
        "wall_s": summary["seconds"],
        "wall_trials_per_s": summary["complete"] / summary["seconds"],
        "trials": summary["complete"],
        "eval_images": eval_images,
        "evaluator_builds": sum(summary["evaluator_builds"].values()),
        # Seconds inside Evaluator.evaluate per trial: grows when the actors compete for the cores.
        "eval_s_per_trial": float(load_trials(RunStore.for_config(cfg))["eval_seconds"].mean()),
    }


def measure_all(out: Path, args) -> list[dict]:
    """Every measurement, ``args.repeats`` times, the worker counts in ABBA order (1, 2, 2, 1, ...) so that a
    drift in the machine's load hits both alike."""
    measurements = []
    for repeat in range(args.repeats):
        counts = WORKER_COUNTS if repeat % 2 == 0 else WORKER_COUNTS[::-1]
        for workers in counts:
            row = with_cpu_busy(train_throughput, workers, out / f"train-{repeat}", args.train_subset, args.epochs)
            measurements.append({**row, "repeat": repeat})
        for actors in counts:
            search_dir = out / f"search-{actors}-{repeat}"
            row = with_cpu_busy(search_throughput, actors, search_dir, args.trials, args.eval_images)
            measurements.append({**row, "repeat": repeat})
    return measurements


def summarize(measurements: list[dict]) -> list[dict]:
    """One row per kind and worker count: numeric fields averaged over the repeats, speedup and efficiency
    (speedup / workers) against the 1-worker row of the same kind."""
    rows = []
    for kind in dict.fromkeys(m["kind"] for m in measurements):
        for workers in WORKER_COUNTS:
            group = [m for m in measurements if m["kind"] == kind and m["workers"] == workers]
            row = {k: v for k, v in group[0].items() if k != "repeat"}
            for key, value in group[0].items():
                if isinstance(value, float):
                    row[key] = sum(m[key] for m in group) / len(group)
            row["throughput_repeats"] = [m["throughput"] for m in group]
            rows.append(row)
    for row in rows:
        base = next(r for r in rows if r["kind"] == row["kind"] and r["workers"] == 1)
        row["speedup"] = row["throughput"] / base["throughput"]
        row["efficiency"] = row["speedup"] / row["workers"]
    return rows


def main() -> None:
    parser = bench_parser(
        __doc__,
        smoke={"train_subset": 0.02, "epochs": 1, "trials": 4, "eval_images": 200, "repeats": 1},
        smoke_help="tiny data and few trials",
    )
    parser.add_argument("--train-subset", type=float, default=0.2, help="share of the Fashion-MNIST training split")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--eval-images", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=2, help="measurements of each worker count (ABBA order)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    env_before = environment()
    started = time.perf_counter()
    import ray

    init_ray(num_cpus=2)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            measurements = measure_all(Path(tmp), args)
    finally:
        ray.shutdown()
    rows = summarize(measurements)
    print(
        f"\n{'':<28} {'workers':>7} {'throughput':>16} {'wall s':>7} {'speedup':>7} {'efficiency':>10} "
        f"{'CPU busy':>8}  per step / trial"
    )
    for r in rows:
        detail = f"{r['step_ms']:.0f} ms/step" if "step_ms" in r else f"{r['eval_s_per_trial']:.3f} s in evaluate"
        print(
            f"{r['kind']:<28} {r['workers']:>7} {r['throughput']:>9.2f} {r['unit']:<8}{r['wall_s']:>6.1f} "
            f"{r['speedup']:>7.2f} {r['efficiency']:>10.2f} {100 * r['machine_cpu_busy']:>7.0f}%  {detail}"
        )
    result = {
        "smoke": args.smoke,
        "rows": rows,
        "measurements": measurements,
        "repeats": args.repeats,
        "train_subset": args.train_subset,
        "seconds": time.perf_counter() - started,
        **environment(),
        "loadavg_before": env_before["loadavg"],
    }
    print(f"wrote {write_result(args.output / 'scaling.json', result)}")


if __name__ == "__main__":
    main()

"""Autoscaling on one machine: worker nodes over time, and time from demand to first evaluation.

A local autoscaling cluster on Ray's ``fake_multinode`` provider (``flora_ray.testing.fake_cluster``): a head with no CPUs,
one worker type ``{"CPU": 1, "accel": 1}`` from 0 to 2 nodes, idle nodes removed after 6 s. The digits-tiny run
(random teacher) goes through its stages as ``flora-ray STAGE --address 127.0.0.1:6379`` subprocesses with
``scaling.accelerator=accel``: filter tasks and training workers ask for 1 ``accel`` each, search evaluators for
``search.gpus_per_trial`` of it. Before each stage the cluster is back at zero worker nodes, so every stage's
demand has to be met by the autoscaler. The GCS is sampled every 0.5 s. Prints the node-count timeline and, per
stage, when demand appeared, when nodes came up, and (search) when the first trial finished; writes
``results/autoscale.json``.

    .venv/bin/python experiments/benchmarks/autoscale.py            # filter, train (2 epochs), search (12 trials)
    .venv/bin/python experiments/benchmarks/autoscale.py --smoke    # train (1 epoch), search (4 trials)

Needs port 6379 free (the provider dials the default GCS port).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

from harness import EXPERIMENTS, bench_parser, write_result

from flora_ray.config import dump_config, load_config
from flora_ray.core.models import dense_checkpoint_metadata
from flora_ray.stages.inputs import resolve_model_spec
from flora_ray.stages.search import search_problem
from flora_ray.storage.run_store import ARTEFACTS, RunStore
from flora_ray.testing.fake_cluster import HEAD_PORT, autoscaler_config, start_fake_cluster
from flora_ray.testing.processes import port_in_use

ACCEL = "accel"
MAX_WORKERS = 2


def run_overrides(smoke: bool, output_dir: Path) -> list[str]:
    """The digits-tiny run, sized for two 1-CPU nodes, asking for the custom accelerator."""
    return [
        f"run.output_dir={output_dir}",
        "run.name=autoscale",
        f"train.epochs={1 if smoke else 2}",
        "scaling.num_workers=2",
        "scaling.use_gpu=true",
        f"scaling.accelerator={ACCEL}",
        "scaling.cpus_per_worker=1",
        "filter.epochs=1",
        "filter.concurrency=2",
        "filter.cpus_per_task=1",
        f"search.trials={4 if smoke else 12}",
        f"search.population={2 if smoke else 4}",
        "search.eval_images=100",
        "search.concurrency=2",
        "search.cpus_per_trial=1",
        "search.gpus_per_trial=1",
    ]


def prepare_run(smoke: bool, workdir: Path) -> tuple[Path, Any]:
    """Write the run's config file and a randomly initialised teacher; returns (config file, config)."""
    cfg = load_config(EXPERIMENTS / "digits_tiny.yaml", run_overrides(smoke, workdir / "runs"))
    spec = resolve_model_spec(cfg)
    store = RunStore.for_config(cfg)
    store.write_checkpoint(ARTEFACTS.teacher, spec.create().state_dict(), dense_checkpoint_metadata(spec))
    config_file = workdir / "autoscale.yaml"
    config_file.write_text(dump_config(cfg))
    return config_file, cfg


def first_evaluation(cfg) -> float | None:
    """Wall-clock time the first search trial finished, from the Optuna journal."""
    study = search_problem(cfg, RunStore.for_config(cfg)).load_study()
    done = [t.datetime_complete.timestamp() for t in study.trials if t.datetime_complete is not None]
    return min(done) if done else None


def _first(samples: list[dict], start: float, predicate) -> float | None:
    return next((s["t"] for s in samples if s["t"] >= start and predicate(s)), None)


def stage_phases(samples: list[dict], run: dict[str, Any], scaled_down: float | None) -> dict[str, Any]:
    """When the accelerator demand appeared, the first and last nodes came up, and the nodes went away."""
    window = [s for s in samples if run["started"] <= s["t"] <= run["ended"]]
    peak = max((s["workers"] for s in window), default=0)
    bundles = {tuple(sorted(b.items())) for s in window for b, _ in s["demand"]}
    return {
        **run,
        "workers_at_submit": window[0]["workers"] if window else None,
        "demand_seen": _first(samples, run["started"], lambda s: any(ACCEL in b for b, _ in s["demand"])),
        "first_node": _first(samples, run["started"], lambda s: s["workers"] >= 1),
        "peak_node": _first(samples, run["started"], lambda s: s["workers"] >= max(peak, 1)),
        "peak_workers": peak,
        "scaled_down": scaled_down,
        "demand_bundles": [dict(b) for b in sorted(bundles)],
    }


def timeline_rows(samples: list[dict], t0: float) -> list[list]:
    """``[seconds since the head was up, worker nodes, pending launches]`` at every change."""
    rows, last = [], None
    for s in samples:
        state = (s["workers"], s["pending"])
        if state != last:
            rows.append([round(s["t"] - t0, 1), *state])
            last = state
    return rows


def run_stages(cluster, config_file: Path, stages: tuple[str, ...], logs: Path) -> dict[str, dict]:
    """Run each stage from zero worker nodes; returns its subprocess timing and when its nodes were gone."""
    runs = {}
    for stage in stages:
        if cluster.wait_for_workers(0, timeout_s=120) is None:
            raise RuntimeError(f"worker nodes did not scale down to zero before {stage}")
        print(f"{stage}: submitting (load {os.getloadavg()[0]:.1f})", flush=True)
        run = cluster.run_cli([stage, str(config_file)], logs / f"{stage}.log", timeout_s=600)
        if run["returncode"] != 0:
            tail = (logs / f"{stage}.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"flora-ray {stage} failed ({run['returncode']}):\n{tail}")
        run["scaled_down"] = cluster.wait_for_workers(0, timeout_s=120)
        print(f"{stage}: done in {run['seconds']:.1f} s", flush=True)
        runs[stage] = run
    return runs


def _cell(value: float | None, width: int) -> str:
    return f"{value:>{width}.1f}" if value is not None else f"{'-':>{width}}"


def print_report(result: dict[str, Any]) -> None:
    print(f"\n{'t (s)':>7} {'workers':>8} {'pending':>8}")
    for t, workers, pending in result["timeline"]:
        print(f"{t:>7.1f} {workers:>8} {pending:>8}")
    print(f"\n{'stage':<7} {'submit':>7} {'demand':>7} {'1st node':>8} {'peak':>5} {'at':>7} {'end':>7} {'down':>7}")
    for name, p in result["stages"].items():
        cells = [_cell(p[k], 7) for k in ("started", "demand_seen")] + [_cell(p["first_node"], 8)]
        cells += [f"{p['peak_workers']:>5}"] + [_cell(p[k], 7) for k in ("peak_node", "ended", "scaled_down")]
        print(f"{name:<7} " + " ".join(cells))
    for name, p in result["stages"].items():
        print(f"{name} asked for: {', '.join(json.dumps(b, sort_keys=True) for b in p['demand_bundles'])}")
    s = result["search"]
    print(
        f"\nsearch: demand to first evaluation {s['demand_to_first_evaluation_s']} s (submit to first evaluation "
        f"{s['submit_to_first_evaluation_s']} s, demand to first node {s['demand_to_first_node_s']} s); "
        "times in s since the head was up"
    )


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 2)


def relative(stages: dict[str, dict], t0: float) -> dict[str, dict]:
    keys = ("started", "ended", "demand_seen", "first_node", "peak_node", "scaled_down")
    return {name: {k: (_minus(v, t0) if k in keys else v) for k, v in p.items()} for name, p in stages.items()}


def main() -> None:
    args = bench_parser(__doc__, smoke_help="train and a 4-trial search only").parse_args()
    if port_in_use(HEAD_PORT):
        sys.exit(f"port {HEAD_PORT} is in use: another Ray head runs on this machine; try again later")
    stages = ("train", "search") if args.smoke else ("filter", "train", "search")
    load_start, wall_start = os.getloadavg(), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="flora-autoscale-") as tmp:
        workdir = Path(tmp)
        config_file, cfg = prepare_run(args.smoke, workdir)
        config = autoscaler_config({"CPU": 1, ACCEL: 1}, max_workers=MAX_WORKERS, idle_timeout_minutes=0.1)
        head_start = time.time()
        with start_fake_cluster(workdir / "cluster", config) as cluster:
            t0 = time.time()
            runs = run_stages(cluster, config_file, stages, workdir)
            samples = cluster.samples()
        first_eval = first_evaluation(cfg)
    phases = {name: stage_phases(samples, run, run.pop("scaled_down")) for name, run in runs.items()}
    search = phases["search"]
    result = {
        "smoke": args.smoke,
        "autoscaler_config": config,
        "overrides": run_overrides(args.smoke, Path("<tmp>/runs")),
        "head_start_s": t0 - head_start,
        "stages": relative(phases, t0),
        "search": {
            "first_evaluation": _minus(first_eval, t0),
            "demand_to_first_evaluation_s": _minus(first_eval, search["demand_seen"]),
            "submit_to_first_evaluation_s": _minus(first_eval, search["started"]),
            "demand_to_first_node_s": _minus(search["first_node"], search["demand_seen"]),
        },
        "timeline": timeline_rows(samples, t0),
        "samples": len(samples),
        "wall_seconds": time.perf_counter() - wall_start,
        "loadavg_start": list(load_start),
        "loadavg_end": list(os.getloadavg()),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "ray": __import__("ray").__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    print_report(result)
    print(f"wall {result['wall_seconds']:.0f} s; load average {load_start[0]:.2f} -> {os.getloadavg()[0]:.2f}")
    print(f"wrote {write_result(args.output / 'autoscale.json', result)}")


if __name__ == "__main__":
    main()

"""Search overhead: share of wall time outside subnet evaluation, Ray Tune + Optuna versus a plain Optuna loop.

Both run NSGA-II over the same space with the same ``Evaluator`` (quickstart model and data, the same search
images), one evaluation at a time. Overhead share = (wall time - time inside ``Evaluator.evaluate``) / wall time.
The plain loop asks and tells an in-memory Optuna study in this process and evaluates through the run's
``stages.search.search_problem`` (``SearchProblem.evaluate``; the evaluator is built before the clock starts). The
Ray Tune wall time is that of ``stages.search.search_stage`` on ``RayBackend`` building and fitting the ``Tuner``
(local Ray already started), so it includes the evaluator actor's start and its one supernet build. Target: under
10%. Prints a table, writes ``results/search_overhead.json``.

    .venv/bin/python experiments/benchmarks/search_overhead.py            # 60 trials each (about 4 minutes)
    .venv/bin/python experiments/benchmarks/search_overhead.py --smoke    # 6 trials each, writes runs/bench-smoke/
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import optuna
import torch
from harness import EXPERIMENTS, bench_parser, write_result
from harness_runs import prepare_search_run

from flora_ray.backends.ray import RayBackend, init_ray
from flora_ray.config import load_config
from flora_ray.results import load_trials
from flora_ray.stages.search import search_problem, search_stage
from flora_ray.storage.run_store import RunStore


def plain_optuna(cfg) -> tuple[float, float]:
    """Wall seconds and seconds inside evaluate() of an ask/tell NSGA-II loop in this process.

    The loop evaluates through the run's ``SearchProblem`` (the search's evaluator, built before the clock starts)
    with an in-memory study: no journal, no Ray."""
    problem = search_problem(cfg, RunStore.for_config(cfg))
    problem.evaluator()  # built (and cached in this process) outside the timed loop
    sampler = optuna.samplers.NSGAIISampler(population_size=cfg.search.population, seed=cfg.run.seed)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    distributions = {
        name: optuna.distributions.CategoricalDistribution(list(range(n))) for name, n in problem.genes.items()
    }
    inside = 0.0
    started = time.perf_counter()
    for _ in range(cfg.search.trials):
        trial = study.ask(distributions)
        metrics = problem.evaluate(trial.params)
        inside += metrics["eval_seconds"]
        study.tell(trial, [metrics["accuracy"], metrics["macs"]])
    return time.perf_counter() - started, inside


def main() -> None:
    parser = bench_parser(__doc__, smoke={"trials": 6, "eval_images": 200}, smoke_help="6 trials each, 200 images")
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument(
        "--eval-images", type=int, default=None, help="search images per subnet (default: the quickstart's)"
    )
    args = parser.parse_args()
    if args.eval_images is None:
        args.eval_images = load_config(EXPERIMENTS / "quickstart.yaml").search.eval_images
    trials = args.trials
    torch.set_num_threads(1)
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        cfg, _ = prepare_search_run(trials, args.eval_images, Path(tmp))
        plain_wall, plain_inside = plain_optuna(cfg)
        init_ray(num_cpus=2)
        try:
            # Tuner construction and fit (RayBackend.search), not the baselines and the Parquet writing
            tune_wall = search_stage(cfg, RayBackend())["seconds"]
        finally:
            ray.shutdown()
        trials_df = load_trials(RunStore.for_config(cfg))
        tune_inside = float(trials_df["eval_seconds"].sum())
    rows = [
        {"loop": "plain Optuna ask/tell", "wall_s": plain_wall, "eval_s": plain_inside},
        {"loop": "Ray Tune + OptunaSearch", "wall_s": tune_wall, "eval_s": tune_inside},
    ]
    for row in rows:
        row["overhead_share"] = (row["wall_s"] - row["eval_s"]) / row["wall_s"]
        row["trials_per_s"] = trials / row["wall_s"]
        print(
            f"{row['loop']:<26} {trials} trials  wall {row['wall_s']:7.2f} s  in evaluate {row['eval_s']:7.2f} s  "
            f"overhead {100 * row['overhead_share']:5.1f}%  {row['trials_per_s']:.2f} trials/s",
            flush=True,
        )
    result = {
        "smoke": args.smoke,
        "rows": rows,
        "trials": trials,
        "eval_images": args.eval_images,
        "date": time.strftime("%Y-%m-%d"),
        "load_average": os.getloadavg(),
    }
    print(f"wrote {write_result(args.output / 'search_overhead.json', result)}")


if __name__ == "__main__":
    main()

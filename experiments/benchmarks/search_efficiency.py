"""Search efficiency: hypervolume versus evaluations on one trained supernet, for four ways of searching it.

(a) flora-ray's NSGA-II: Optuna's ``NSGAIISampler`` with the settings ``flora-ray search`` gives it (the run's
    ``search.population``, ``mutation_prob``, ``crossover_prob``; ``search.anchor_points`` enqueued first: the
    uniform configurations the space contains and its cheapest configuration), driven by an in-process ask/tell loop instead of Ray Tune (same sampler, same ``Evaluator``; Tune's
    overhead is what ``search_overhead.py`` measures);
(b) random search over the same genes (one kept triple per block, uniformly);
(c) the reference code's constrained evolutionary search, re-implemented from docs/design.md (section 5): per MAC
    window a population, top-k parents over everything evaluated, mutation children (p = 0.2 per block, a block's
    whole triple redrawn from its kept ones) and crossover children (per layer, so they may leave the filtered
    space, as in the reference), only candidates inside the window and not seen before are evaluated; run at
    several windows that split [smallest, full-rank] MACs, the budget split evenly, the union of the windows'
    winners (top-1 each) is its front;
(d) the uniform configurations only (every ratio).

All use one cached, deterministic evaluator (identical configuration, identical accuracy) and one fixed
hypervolume reference point: (full-rank MACs, full-rank accuracy - ``--floor-drop``). Hypervolumes are printed as
fractions of the box [0, full-rank MACs] x [floor, 100%]. Target: NSGA-II reaches random search's final
hypervolume in at most half the evaluations. Prints a table, writes ``results/search_efficiency.json`` and
``results/search_efficiency.png``.

    .venv/bin/python experiments/benchmarks/search_efficiency.py                          # prepares runs/bench-quickstart if needed
    .venv/bin/python experiments/benchmarks/search_efficiency.py --run-dir runs/quickstart
    .venv/bin/python experiments/benchmarks/search_efficiency.py --smoke --output /tmp/x   # digits, seconds

Without ``--run-dir`` the script prepares ``runs/bench-quickstart`` from ``experiments/quickstart.yaml`` (pretrain,
filter, train with ``pipeline.run_stage`` on ``RayBackend``, local Ray; about 5 minutes on a 2-core CPU) unless it
already exists. ``--smoke`` prepares a tiny digits run in-process instead (``LocalBackend``, zero-training filter)
under ``OUTPUT/runs``.
"""

from __future__ import annotations

import functools
import itertools
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import numpy as np
import optuna
from harness import bench_parser, write_result
from harness_runs import (
    CachedEvaluator,
    Evaluate,
    Point,
    build_evaluator,
    nsga2_search,
    pareto_points,
    points_hypervolume,
    prepare_base_run,
    run_config,
    uniform_search,
)

from flora_ray.config import SearchConfig
from flora_ray.core.space import RankConfig, RankSpace
from flora_ray.search.plots import pyplot, save_png

# --- the four methods ---------------------------------------------------------------------------------------------


def random_config(space: RankSpace, rng: np.random.Generator) -> RankConfig:
    """One kept triple per block, uniformly."""
    return space.from_block_tuples([b.candidates[rng.integers(len(b.candidates))] for b in space.blocks])


def random_search(space: RankSpace, evaluate: Evaluate, trials: int, seed: int) -> list[Point]:
    """``trials`` uniformly random configurations of the space."""
    rng = np.random.default_rng(seed)
    return [evaluate(random_config(space, rng)) for _ in range(trials)]


def mutate(space: RankSpace, parent: RankConfig, prob: float, rng: np.random.Generator) -> RankConfig:
    """Redraw each block's whole triple from its kept candidates with probability ``prob`` (the reference's)."""
    child = dict(parent)
    for block in space.blocks:
        if rng.random() < prob:
            child.update(zip(block.fqns, block.candidates[rng.integers(len(block.candidates))], strict=True))
    return child


def crossover(space: RankSpace, a: RankConfig, b: RankConfig, rng: np.random.Generator) -> RankConfig:
    """Each layer's rank from either parent (the reference's per-layer crossover: may leave the kept triples)."""
    return {fqn: a[fqn] if rng.random() < 0.5 else b[fqn] for fqn in space.fqns}


class WindowEvolution:
    """The reference's evolutionary search under one MAC window ``[low, high]``, for at most ``budget`` evaluations.

    Scaled from the reference's population 50, top-10 parents, 25 mutation and 25 crossover children per
    generation: ``population`` candidates per generation, ``population // 5`` parents, half mutation, half
    crossover children. A candidate is evaluated only if its MACs are in the window and it was not seen before;
    mutation and crossover give up after ten tries per wanted child, as the reference does.
    """

    def __init__(self, space, evaluate: CachedEvaluator, window: tuple[float, float], population: int, rng) -> None:
        self.space, self.evaluate, self.window, self.rng = space, evaluate, window, rng
        self.population = population
        self.parents = max(1, population // 5)
        self.mutations = population // 2
        self.seen: dict[tuple[int, ...], tuple[RankConfig, Point]] = {}
        self.points: list[Point] = []

    def _try(self, config: RankConfig, budget: int) -> bool:
        key = tuple(config[f] for f in self.space.fqns)
        low, high = self.window
        if len(self.points) >= budget or key in self.seen or not low <= self.evaluate.macs(config) <= high:
            return False
        point = self.evaluate(config)
        self.seen[key] = (config, point)
        self.points.append(point)
        return True

    def _children(self, wanted: int, make: Callable[[], RankConfig], budget: int) -> int:
        made = 0
        for _ in range(10 * wanted):
            if made == wanted or len(self.points) >= budget:
                break
            made += self._try(make(), budget)
        return made

    def _top(self) -> list[RankConfig]:
        ranked = sorted(self.seen.values(), key=lambda item: (-item[1][1], item[1][0]))
        return [config for config, _ in ranked[: self.parents]]

    def _mutant(self, top: list[RankConfig]) -> RankConfig:
        return mutate(self.space, top[self.rng.integers(len(top))], 0.2, self.rng)

    def _cross(self, top: list[RankConfig]) -> RankConfig:
        return crossover(self.space, top[self.rng.integers(len(top))], top[self.rng.integers(len(top))], self.rng)

    def _generation(self, budget: int) -> int:
        top = self._top()
        made = self._children(self.mutations, functools.partial(self._mutant, top), budget)
        return made + self._children(self.population - self.mutations, functools.partial(self._cross, top), budget)

    def run(self, budget: int, max_random_draws: int = 20000) -> list[Point]:
        """Initial random population, then generations until the budget is spent or no child can be made."""
        for _ in range(max_random_draws):
            if len(self.points) >= min(self.population, budget):
                break
            self._try(random_config(self.space, self.rng), budget)
        while self.points and len(self.points) < budget:
            if self._generation(budget) == 0:
                break
        return self.points


def mac_windows(evaluate: CachedEvaluator, count: int) -> list[tuple[float, float]]:
    """``count`` equal MAC windows between the space's smallest and largest configurations."""
    low, high = evaluate.macs(evaluate.space.smallest()), evaluate.macs(evaluate.space.largest())
    edges = np.linspace(low, high, count + 1)
    return [(float(a), float(b)) for a, b in itertools.pairwise(edges)]


def reference_evolution(
    evaluate: CachedEvaluator, trials: int, seed: int, windows: Sequence[tuple[float, float]], population: int
) -> tuple[list[Point], list[int]]:
    """The evolutionary search at each window in turn, ``trials`` split evenly: points and their window index."""
    rng = np.random.default_rng(seed)
    points, window_of = [], []
    for i, window in enumerate(windows):
        budget = trials // len(windows) + (i < trials % len(windows))
        found = WindowEvolution(evaluate.space, evaluate, window, population, rng).run(budget)
        points += found
        window_of += [i] * len(found)
    return points, window_of


# --- hypervolume curves -------------------------------------------------------------------------------------------


def hv_curve(points: Sequence[Point], ref: Point) -> list[float]:
    """Hypervolume of the first n points, for n = 1 .. len(points)."""
    front: list[Point] = []
    curve = []
    for point in points:
        front = pareto_points([*front, point])
        curve.append(points_hypervolume(front, ref))
    return curve


def winners(points: Sequence[Point], window_of: Sequence[int]) -> list[Point]:
    """Each window's winner: its most accurate point (the cheaper one on ties)."""
    best: dict[int, Point] = {}
    for (macs, accuracy), window in zip(points, window_of, strict=True):
        old = best.get(window)
        if old is None or (accuracy, -macs) > (old[1], -old[0]):
            best[window] = (macs, accuracy)
    return [best[w] for w in sorted(best)]


def winners_curve(points: Sequence[Point], window_of: Sequence[int], ref: Point) -> list[float]:
    """Hypervolume of the windows' winners among the first n points (it can fall: a winner is the most accurate
    point of its window, not the one that adds most hypervolume)."""
    return [points_hypervolume(winners(points[:n], window_of[:n]), ref) for n in range(1, len(points) + 1)]


def evaluations_to_reach(curve: Sequence[float], target: float) -> int | None:
    """The first n at which ``curve`` reaches ``target`` (``None``: never)."""
    return next((n + 1 for n, value in enumerate(curve) if value >= target * (1 - 1e-12)), None)


# --- the benchmark ------------------------------------------------------------------------------------------------


def _record(run: dict[str, list], points: list[Point], curve: list[float], front: list[Point]) -> None:
    run["points"].append(points)
    run["curves"].append(curve)
    run["fronts"].append(front)


def run_methods(evaluate: CachedEvaluator, search: SearchConfig, args, seeds, ref, windows) -> dict[str, Any]:
    """Every method at every seed: ``{method: {"points", "curves", "fronts": one list per seed}}`` (raw HV)."""
    runs: dict[str, dict[str, list]] = {
        m: {"points": [], "curves": [], "fronts": []} for m in ("nsga2", "random", "evolution", "uniform")
    }
    runs["evolution"]["all_points_hv"] = []
    for seed in seeds:
        started = time.perf_counter()
        points = nsga2_search(evaluate.space, evaluate, search, args.trials, seed)
        _record(runs["nsga2"], points, hv_curve(points, ref), pareto_points(points))
        points = random_search(evaluate.space, evaluate, args.trials, seed)
        _record(runs["random"], points, hv_curve(points, ref), pareto_points(points))
        points, window_of = reference_evolution(evaluate, args.trials, seed, windows, args.evo_population)
        _record(runs["evolution"], points, winners_curve(points, window_of, ref), winners(points, window_of))
        runs["evolution"]["all_points_hv"].append(points_hypervolume(pareto_points(points), ref))
        print(
            f"seed {seed}: {time.perf_counter() - started:.0f} s, {len(evaluate.cache)} distinct configurations "
            f"evaluated so far, load average {os.getloadavg()[0]:.2f}",
            flush=True,
        )
    points = uniform_search(evaluate)
    for _ in seeds:  # deterministic: the same for every seed
        _record(runs["uniform"], points, hv_curve(points, ref), pareto_points(points))
    return runs


def _padded(curves: Sequence[Sequence[float]], length: int) -> np.ndarray:
    """Curves as an array, each held at its last value up to ``length`` (a search that stopped early)."""
    return np.array([[*c, *[c[-1] if c else 0.0] * (length - len(c))] for c in curves])


def summarise(runs: dict[str, Any], trials: int, scale: float) -> dict[str, Any]:
    """Per method: normalised final hypervolumes per seed, mean and std curves, evaluation counts."""
    out = {}
    for method, run in runs.items():
        length = max(len(c) for c in run["curves"])
        curves = _padded(run["curves"], length) / scale
        out[method] = {
            "evaluations": [len(p) for p in run["points"]],
            "hypervolume": [float(c[-1]) for c in curves],
            "hypervolume_mean": float(curves[:, -1].mean()),
            "hypervolume_std": float(curves[:, -1].std()),
            "curve_mean": curves.mean(axis=0).tolist(),
            "curve_std": curves.std(axis=0).tolist(),
            "at": {str(n): float(curves[:, min(n, length) - 1].mean()) for n in checkpoints(trials)},
        }
        out[method]["fronts"] = [[list(p) for p in sorted(front)] for front in run["fronts"]]
        if "all_points_hv" in run:
            out[method]["hypervolume_all_evaluated_points"] = [v / scale for v in run["all_points_hv"]]
    return out


def checkpoints(trials: int) -> list[int]:
    """Evaluation counts of the table's columns."""
    return sorted({max(1, trials // 8), max(1, trials // 4), max(1, trials // 2), trials})


def target(summary: dict[str, Any], runs: dict[str, Any], scale: float, trials: int) -> dict[str, Any]:
    """When NSGA-II's mean curve reaches random search's mean final hypervolume, and the same per (paired) seed."""
    goal = summary["random"]["hypervolume_mean"]
    reached = evaluations_to_reach(summary["nsga2"]["curve_mean"], goal)
    per_seed = [
        evaluations_to_reach([v / scale for v in curve], final)
        for curve, final in zip(runs["nsga2"]["curves"], summary["random"]["hypervolume"], strict=True)
    ]
    return {
        "random_final_hypervolume_mean": goal,
        "nsga2_evaluations_to_reach_mean": reached,
        "fraction_of_budget": None if reached is None else reached / trials,
        "met": reached is not None and reached <= trials / 2,
        "nsga2_evaluations_to_reach_per_seed": per_seed,
    }


def print_table(summary: dict[str, Any], trials: int, goal: dict[str, Any]) -> None:
    """A Markdown table of mean (std) normalised hypervolume at several evaluation counts."""
    names = {
        "nsga2": "(a) NSGA-II (flora-ray)",
        "random": "(b) random search",
        "evolution": "(c) reference evolution",
        "uniform": "(d) uniform ranks",
    }
    marks = checkpoints(trials)
    print("| method | evaluations | " + " | ".join(f"HV @ {n}" for n in marks) + " | final HV (std) |")
    print("| --- | --- | " + " | ".join("---" for _ in marks) + " | --- |")
    for method, row in summary.items():
        cells = " | ".join(f"{row['at'][str(n)]:.4f}" for n in marks)
        evaluations = sorted(set(row["evaluations"]))
        print(
            f"| {names[method]} | {'/'.join(map(str, evaluations))} | {cells} | "
            f"{row['hypervolume_mean']:.4f} ({row['hypervolume_std']:.4f}) |"
        )
    reached = goal["nsga2_evaluations_to_reach_mean"]
    when = f"after {reached} of {trials} evaluations" if reached is not None else f"not within {trials} evaluations"
    print(
        f"NSGA-II (mean over seeds) reaches random search's final mean hypervolume "
        f"{goal['random_final_hypervolume_mean']:.4f} {when} (target: at most {trials // 2}): "
        f"{'met' if goal['met'] else 'NOT met'}; per seed (vs that seed's random search): "
        f"{goal['nsga2_evaluations_to_reach_per_seed']}"
    )


def plot(path: Path, summary: dict[str, Any], trials: int) -> None:
    """Mean normalised hypervolume versus evaluations with a band of one standard deviation over seeds."""
    fig, ax = pyplot().subplots(figsize=(6.4, 4.2))
    labels = {"nsga2": "NSGA-II (flora-ray)", "random": "random", "evolution": "reference evolution (winners)"}
    for i, (method, label) in enumerate(labels.items()):
        mean, std = np.array(summary[method]["curve_mean"]), np.array(summary[method]["curve_std"])
        n = np.arange(1, len(mean) + 1)
        ax.plot(n, mean, color=f"C{i}", label=label)
        ax.fill_between(n, mean - std, mean + std, color=f"C{i}", alpha=0.2)
    uniform = summary["uniform"]
    ax.hlines(uniform["hypervolume_mean"], len(uniform["curve_mean"]), trials, colors="C3", linestyles="--")
    ax.scatter([len(uniform["curve_mean"])], [uniform["hypervolume_mean"]], color="C3", label="uniform ranks")
    ax.set_xlabel("evaluations")
    ax.set_ylabel("hypervolume (fraction of box)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    save_png(fig, path)


def parse_args():
    parser = bench_parser(
        __doc__,
        smoke={"seeds": 2, "trials": 16, "eval_images": 200, "windows": 2, "evo_population": 4},
        smoke_help="tiny digits run prepared in-process (under OUTPUT/runs), seconds",
    )
    parser.add_argument("--run-dir", type=Path, help="a trained run (teacher, space.json, supernet.safetensors)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--trials", type=int, default=120, help="evaluations per method and seed")
    parser.add_argument("--eval-images", type=int, default=1000, help="search-split images per evaluation")
    parser.add_argument("--windows", type=int, default=4, help="MAC windows of the reference evolution")
    parser.add_argument("--evo-population", type=int, default=10, help="reference: 50")
    parser.add_argument("--floor-drop", type=float, default=10.0, help="HV floor below full-rank accuracy")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override of a prepared run")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    load_start, started = os.getloadavg(), time.perf_counter()
    run_dir = prepare_base_run(args.run_dir, args.smoke, args.output, args.set).resolve()
    cfg = run_config(run_dir)
    evaluate = build_evaluator(cfg, run_dir, args.eval_images)
    full_macs, full_accuracy = evaluate(evaluate.full_rank())
    ref = (full_macs, full_accuracy - args.floor_drop)
    scale = ref[0] * (100.0 - ref[1])
    windows = mac_windows(evaluate, args.windows)
    seed0 = cfg.search.seed if cfg.search.seed is not None else cfg.run.seed
    seeds = [seed0 + i for i in range(args.seeds)]
    search_started = time.perf_counter()
    runs = run_methods(evaluate, cfg.search, args, seeds, ref, windows)
    summary = summarise(runs, args.trials, scale)
    goal = target(summary, runs, scale, args.trials)
    every = [p for run in runs.values() for points in run["points"] for p in points]
    result = {
        "benchmark": "search_efficiency",
        "date": time.strftime("%Y-%m-%d"),
        "smoke": args.smoke,
        "run_dir": str(run_dir),
        "model": cfg.model.name,
        "model_kwargs": cfg.model.kwargs,
        "dataset": cfg.data.name,
        "ratios": list(evaluate.space.ratios),
        "candidates_per_block": [len(b.candidates) for b in evaluate.space.blocks],
        "space_configs": evaluate.space.num_configs,
        "eval_images": args.eval_images,
        "seeds": seeds,
        "trials": args.trials,
        "full_rank_macs": full_macs,
        "full_rank_accuracy": full_accuracy,
        "reference_point": {"macs": ref[0], "accuracy": ref[1]},
        "hypervolume_unit": "fraction of [0, full-rank MACs] x [reference accuracy, 100]",
        "hypervolume_scale": scale,
        "hypervolume_all_evaluated": points_hypervolume(pareto_points(every), ref) / scale,
        "settings": {
            "nsga2": {
                "loop": "in-process Optuna ask/tell, same NSGAIISampler settings and Evaluator as flora-ray search",
                "population": cfg.search.population,
                "mutation_prob": cfg.search.mutation_prob,
                "crossover_prob": cfg.search.crossover_prob,
            },
            "evolution": {
                "windows": windows,
                "population": args.evo_population,
                "parents": max(1, args.evo_population // 5),
                "mutation_children": args.evo_population // 2,
                "crossover_children": args.evo_population - args.evo_population // 2,
                "mutation_prob": 0.2,
                "front": "union of the windows' winners (top-1 each)",
            },
        },
        "methods": summary,
        "target": goal,
        "distinct_configurations_evaluated": len(evaluate.cache),
        "eval_seconds": evaluate.eval_seconds,
        "search_wall_seconds": time.perf_counter() - search_started,
        "wall_seconds": time.perf_counter() - started,
        "loadavg_start": list(load_start),
        "loadavg_end": list(os.getloadavg()),
    }
    print(
        f"{cfg.model.name} on {cfg.data.name}, {len(evaluate.space.blocks)} blocks x "
        f"{result['candidates_per_block']} kept triples; full rank {full_macs / 1e6:.3f} MMACs, "
        f"{full_accuracy:.2f}% on {args.eval_images} search images; HV reference point "
        f"({full_macs / 1e6:.3f} MMACs, {ref[1]:.2f}%); {len(seeds)} seeds x {args.trials} evaluations; "
        f"NSGA-II runs as an in-process Optuna ask/tell loop (same sampler settings and Evaluator as flora-ray search)"
    )
    print_table(summary, args.trials, goal)
    print(
        f"HV of every evaluated point: {result['hypervolume_all_evaluated']:.4f}; "
        f"{len(evaluate.cache)} distinct configurations, {evaluate.eval_seconds:.0f} s evaluating, "
        f"{result['wall_seconds']:.0f} s wall; load average {load_start[0]:.2f} -> {os.getloadavg()[0]:.2f}"
    )
    write_result(args.output / "search_efficiency.json", result)
    plot(args.output / "search_efficiency.png", summary, args.trials)
    print(f"wrote {args.output / 'search_efficiency.json'} and search_efficiency.png")


if __name__ == "__main__":
    main()

"""Evaluation rate: images/s of inherited subnets as the search scores them, against the same subnets extracted.

The search's rate (issue 29 item 6) is what one trial of the search stage costs per image: the run's
``SearchProblem`` (``stages.search.search_problem``, its evaluator built once, before the clock, as an evaluator
actor builds it once per search) scores a subnet the way ``LocalBackend.search`` runs a trial: ``study.ask`` on an
in-memory NSGA-II study (the subnet's genes enqueued), ``SearchProblem.evaluate`` (subnet switching with
``set_ranks``, BatchNorm recalibration where the model has BatchNorm, the uint8 images preprocessed batch by batch,
the forward pass, per-image correctness packed, the cost model), ``study.record_result`` and ``study.tell``. The
plain rate is a forward pass (and argmax) of the same subnet extracted as a static model
(``core.subnet.extract_subnet``, made before the clock) on the same images, already preprocessed to floats, with
the same device, torch threads and batch size. Ratio = search images/s / plain images/s (target >= 0.9).

Subnets: the run's front (``pareto.parquet``) and the uniform configurations its space contains. Each is timed
``--repeats`` times, the two paths back to back in alternating order; per subnet the medians, overall the sums of
the medians. The accuracies of the two paths must agree (the same function up to float rounding).

    .venv/bin/python experiments/benchmarks/eval_rate.py --run-dir runs/proving_ground
    .venv/bin/python experiments/benchmarks/eval_rate.py --smoke --output /tmp/x    # digits, seconds
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import optuna
import torch
from harness import ROOT, bench_parser, environment, write_result
from harness_runs import prepare_base_run, run_config

from flora_ray.core.subnet import extract_subnet
from flora_ray.results import load_front
from flora_ray.search.evaluator import config_to_genes, search_images
from flora_ray.search.study import DIRECTIONS, SearchProblem, record_result
from flora_ray.stages.search import search_problem
from flora_ray.storage.run_store import ARTEFACTS, RunStore

TARGET = 0.9  # search rate / plain rate


def load_problem(run_dir: Path, eval_images: int | None) -> SearchProblem:
    """The run's search problem with its search images (``search.eval_images``, or ``eval_images``)."""
    overrides = [] if eval_images is None else [f"search.eval_images={eval_images}"]
    cfg = run_config(run_dir, overrides)
    problem = search_problem(cfg, RunStore(run_dir))
    problem.images, problem.labels = search_images(problem.config)
    return problem


def subnets(run_dir: Path, problem: SearchProblem) -> list[dict[str, Any]]:
    """The run's front points and the uniform configurations its space contains (each configuration once, under
    its front name when it is on the front)."""
    space = problem.evaluator().supernet.space
    out = []
    if RunStore(run_dir).is_file(ARTEFACTS.pareto):
        out += [
            {"name": f"front trial {r.trial}", "ranks": json.loads(r.ranks)} for r in load_front(run_dir).itertuples()
        ]
    out += [{"name": f"uniform {r:g}", "ranks": ranks} for r, ranks in sorted(space.uniform_configs().items())]
    seen, unique = set(), []
    for s in out:
        key = tuple(s["ranks"][f] for f in space.fqns)
        if key not in seen:
            seen.add(key)
            unique.append(s)
    return unique


class SearchPath:
    """One trial of the search as ``LocalBackend.search`` runs it, on an in-memory study."""

    def __init__(self, problem: SearchProblem) -> None:
        self.problem = problem
        self.study = optuna.create_study(directions=list(DIRECTIONS), sampler=problem.sampler())
        self.distributions = {
            name: optuna.distributions.CategoricalDistribution(list(range(n))) for name, n in problem.genes.items()
        }

    def __call__(self, genes: dict[str, int]) -> float:
        """Accuracy (%) of the subnet ``genes``, scored and recorded as a search trial."""
        self.study.enqueue_trial(genes)
        trial = self.study.ask(self.distributions)
        result = self.problem.evaluate(trial.params)
        record_result(trial, result, self.problem.objectives)
        self.study.tell(trial, [result["accuracy"], result[self.problem.objectives.cost]])
        return float(result["accuracy"])


class PlainPath:
    """A forward pass of a static model over the search images, preprocessed to floats once."""

    def __init__(self, problem: SearchProblem) -> None:
        evaluator = problem.evaluator()
        self.batches = []
        for start in range(0, len(evaluator.labels), evaluator.batch_size):
            x = evaluator.images[start : start + evaluator.batch_size].to(evaluator.device)
            x = evaluator.preprocess(x) if evaluator.preprocess is not None else x
            self.batches.append((x, evaluator.labels[start : start + evaluator.batch_size].to(evaluator.device)))

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> float:
        """Accuracy (%) of ``model`` on the images."""
        correct = sum(int((model(x).argmax(-1) == y).sum()) for x, y in self.batches)
        return 100.0 * correct / sum(len(y) for _, y in self.batches)


def timed(fn: Callable[[], float]) -> tuple[float, float]:
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


def measure_subnet(subnet: dict[str, Any], search: SearchPath, plain: PlainPath, repeats: int) -> dict[str, Any]:
    """Both paths ``repeats`` times back to back, alternating which goes first."""
    supernet = search.problem.evaluator().supernet
    genes = config_to_genes(supernet.space, subnet["ranks"])
    model = extract_subnet(supernet, subnet["ranks"]).eval()
    searched, plain_s, ratios = [], [], []
    for i in range(repeats):
        runs = [("search", lambda: search(genes)), ("plain", lambda: plain(model))]
        out = dict((name, timed(fn)) for name, fn in (runs if i % 2 == 0 else runs[::-1]))
        searched.append(out["search"][0])
        plain_s.append(out["plain"][0])
        ratios.append(out["plain"][0] / out["search"][0])
        accuracies = (out["search"][1], out["plain"][1])
    images = len(search.problem.labels)
    s, p = statistics.median(searched), statistics.median(plain_s)
    return {
        "name": subnet["name"], "macs": float(supernet.cost.macs(subnet["ranks"])), "images": images,
        "search_accuracy": accuracies[0], "plain_accuracy": accuracies[1],
        "search_seconds": searched, "plain_seconds": plain_s, "search_images_per_s": images / s,
        "plain_images_per_s": images / p, "ratio": statistics.median(ratios),
    }  # fmt: skip


def measure(problem: SearchProblem, items: list[dict[str, Any]], repeats: int) -> dict[str, Any]:
    """Every subnet's rates and ratio, and the overall ratio (sums of the per-subnet median times)."""
    search, plain = SearchPath(problem), PlainPath(problem)
    warm = extract_subnet(problem.evaluator().supernet, items[0]["ranks"]).eval()
    search(config_to_genes(problem.evaluator().supernet.space, items[0]["ranks"]))  # first-call allocations
    plain(warm)
    rows = [measure_subnet(s, search, plain, repeats) for s in items]
    total_search = sum(statistics.median(r["search_seconds"]) for r in rows)
    total_plain = sum(statistics.median(r["plain_seconds"]) for r in rows)
    evaluator = problem.evaluator()
    return {
        "subnets": rows, "overall_ratio": total_plain / total_search, "target": TARGET,
        "search_images_per_s": sum(r["images"] for r in rows) / total_search,
        "plain_images_per_s": sum(r["images"] for r in rows) / total_plain,
        "batch_size": evaluator.batch_size, "device": str(evaluator.device), "threads": torch.get_num_threads(),
        "batchnorm_recalibration": evaluator.calibration is not None, "repeats": repeats,
    }  # fmt: skip


def print_table(out: dict[str, Any]) -> None:
    print(
        f"{'subnet':<22} {'MMACs':>7} {'search img/s':>13} {'plain img/s':>12} {'ratio':>6} {'acc (search/plain)':>20}"
    )
    for r in out["subnets"]:
        print(f"{r['name']:<22} {r['macs'] / 1e6:>7.3f} {r['search_images_per_s']:>13.0f} "
              f"{r['plain_images_per_s']:>12.0f} {r['ratio']:>6.3f} {r['search_accuracy']:>9.2f}/{r['plain_accuracy']:.2f}")  # fmt: skip
    print(f"overall: search {out['search_images_per_s']:.0f} img/s, plain {out['plain_images_per_s']:.0f} img/s, "
          f"ratio {out['overall_ratio']:.3f} (target >= {TARGET}); {out['threads']} thread(s), batch "
          f"{out['batch_size']}, {out['device']}, BatchNorm recalibration: {out['batchnorm_recalibration']}")  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = bench_parser(__doc__, smoke={"repeats": 2}, smoke_help="a tiny digits run made in this process, seconds")
    parser.add_argument("--run-dir", type=Path, help="a trained run (default: runs/proving_ground; --smoke: digits)")
    parser.add_argument("--eval-images", type=int, help="search images (default: the run's search.eval_images)")
    parser.add_argument("--repeats", type=int, default=3, help="timings of each path per subnet")
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    run_dir = args.run_dir or (None if args.smoke else ROOT / "runs" / "proving_ground")
    run_dir = prepare_base_run(run_dir, args.smoke, args.output)
    load_start = os.getloadavg()
    problem = load_problem(run_dir, args.eval_images)
    out = measure(problem, subnets(run_dir, problem), args.repeats)
    out.update(run=str(run_dir), smoke=args.smoke, loadavg_start=list(load_start), environment=environment())
    print_table(out)
    path = write_result(args.output / f"eval_rate_{run_dir.name}.json", out)
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()

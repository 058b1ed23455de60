"""Ranking fidelity: does a subnet's inherited accuracy order subnets the way their accuracy after fine-tuning does?

One-shot search trusts the supernet: a subnet's accuracy with inherited weights must rank subnets as their real
accuracy does. On one trained run (the proving ground: `flora-ray run experiments/proving_ground.yaml`, then
``--run-dir runs/proving_ground``), for supernets trained from the run's teacher with each sampler on the filtered
space (``lowrank``: the run itself; ``uniform``; ``sandwich``) and with the default sampler on the unfiltered space:

- one common set of subnets spread over the cost range: the run's front points (a run not searched yet is searched
  by the product's search stage, ``harness_runs.product_search``), every uniform configuration, and
  random configurations of the filtered space, one per MAC stratum (the same subnets for every supernet);
- per subnet and supernet: the inherited accuracy on the search images, and the test accuracy (whole test split)
  after the same short fine-tune (``stages.finetune.finetune_subnet``: distillation from the run's teacher with the
  run's ``finetune`` recipe, on a seeded class-balanced share of the training split), starting from that
  supernet's weights;
- Kendall tau and Spearman rho between the two, with paired-bootstrap 95% intervals (``results.bootstrap_interval``);
- per block, for the run's own supernet: Spearman rho between the filter's per-triple score and the mean fine-tuned
  accuracy of the subnets that use the triple (does the filter's score predict final accuracy?);
- the front against uniform ranks (``results.gain_table``: extra MAC reduction at 0.5/1/2/3 points below dense,
  accuracy advantage at 25/33/50% of dense MACs), inherited (search images, reference: the teacher on them) and
  fine-tuned (test split, reference: the teacher on it).

Ablation supernets are trained as in ``flora_vs_uniform.py`` (``harness_runs.prepare_ablation``:
``runs/bench-<run>-<variant>``, reused while the teacher, space and configuration are unchanged). Results are cached
per subnet in the output folder, so an interrupted benchmark resumes.

``--recipes flora,sandwich,sandwich_inplace`` compares named training recipes (``train.recipe``, config/schema.py
``RECIPES``) instead: one supernet per recipe on the run's filtered space (variant ``recipe_<name>``; a recipe the
base run was trained with is the base run itself), the same subnets on each. ``--subnets N`` makes the common set N
distinct subnets (the random strata fill what the front and the uniform configurations leave); the measurement that
picks the default recipe wants N >= 40.

    .venv/bin/python experiments/benchmarks/ranking_fidelity.py --run-dir runs/proving_ground
    .venv/bin/python experiments/benchmarks/ranking_fidelity.py --run-dir runs/proving_ground \
        --recipes flora,sandwich,sandwich_inplace --subnets 40
    .venv/bin/python experiments/benchmarks/ranking_fidelity.py --smoke --output /tmp/x    # digits, a minute
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import numpy as np
import pandas as pd
import torch
from harness import bench_parser, write_result
from harness_runs import (
    CachedEvaluator,
    build_evaluator,
    local_ray,
    prepare_ablation,
    prepare_base_run,
    product_search,
    run_config,
)

from flora_ray.config import RECIPES
from flora_ray.data.datasets import build_datasets, eval_subset
from flora_ray.results import bootstrap_interval, gain_table, kendall_tau, load_front, spearman_rho
from flora_ray.stages.finetune import finetune_subnet
from flora_ray.stages.inputs import load_teacher
from flora_ray.storage.files import read_json, write_json
from flora_ray.storage.run_store import ARTEFACTS, RunStore
from flora_ray.training.tasks import accuracy

# variant: (overrides of the base run's training configuration, whether it keeps the base run's trained space);
# "lowrank" is the base run itself. Names match flora_vs_uniform.py's, so the two share the ablation supernets.
VARIANTS: dict[str, tuple[tuple[str, ...], bool] | None] = {
    "lowrank": None,
    "uniform_sampling": (("train.space_file=null", "train.sampler=uniform"), True),
    "sandwich_sampling": (("train.space_file=null", "train.sampler=sandwich"), True),
    "no_filter": (("train.space_file=null",), False),
}
CACHE_FILE = "ranking_fidelity_rows.json"
RECIPE_PREFIX = "recipe_"  # the variant of a named recipe: recipe_flora, recipe_sandwich_inplace, ...


def recipe_variant(recipe: str) -> tuple[tuple[str, ...], bool]:
    """The ablation of a named recipe: the base run's configuration with ``train.recipe`` set and the keys it sets
    unpinned (a recorded configuration holds them resolved), on the base run's trained space."""
    return ("train.space_file=null", f"train.recipe={recipe}", "train.sampler=null", "train.distill_from=null"), True


def trained_with(run_dir: Path, recipe: str) -> bool:
    """Whether ``run_dir``'s supernet was trained the way ``recipe`` trains (same sampler and distillation)."""
    train = run_config(run_dir).train
    return (train.sampler, train.distill_from) == RECIPES[recipe]


# --- the subnets --------------------------------------------------------------------------------------------------


def front_subnets(base: Path, trials: int, local: bool) -> list[dict[str, Any]]:
    """The run's front (``pareto.parquet``) or, for a run not searched yet, the front of the product's search stage
    (``harness_runs.product_search``: ``trials`` trials with the run's search seed, beside the run)."""
    store = RunStore(base)
    if not store.is_file(ARTEFACTS.pareto):
        cfg = run_config(base)
        seed = cfg.search.seed if cfg.search.seed is not None else cfg.run.seed
        with contextlib.nullcontext() if local else local_ray():
            store = RunStore(product_search(base, seed, trials, runs_root=base.parent, local=local))
    front = load_front(store)
    return [{"kind": "front", "name": f"trial {r.trial}", "ranks": json.loads(r.ranks)} for r in front.itertuples()]


def choose_subnets(base: Path, evaluate: CachedEvaluator, args) -> list[dict[str, Any]]:
    """Front points of the run, every uniform configuration, and random configurations of the filtered space, one
    from each MAC stratum (equal-count bins of 4000 random draws): ``args.random`` of them, or as many as make
    ``args.subnets`` distinct subnets in all."""
    space = evaluate.space
    subnets = front_subnets(base, args.front_trials, args.smoke)
    rng = np.random.default_rng(args.seed)
    for ratio, ranks in sorted(space.uniform_all().items()):
        subnets.append({"kind": "uniform", "name": f"uniform {ratio:g}", "ratio": ratio, "ranks": dict(ranks)})
    seen = {tuple(sorted(s["ranks"].items())) for s in subnets}
    n_random = max(args.random, (args.subnets or 0) - len(seen))
    subnets += random_subnets(evaluate, n_random, rng, seen)
    seen = set()
    for subnet in subnets:  # a front point may be a uniform configuration: it stays in both (measured once, cached)
        key = tuple(sorted(subnet["ranks"].items()))
        subnet["repeat"] = key in seen  # left out of the rank correlations, which count each subnet once
        seen.add(key)
    return subnets


def random_subnets(evaluate: CachedEvaluator, n: int, rng: np.random.Generator, seen: set) -> list[dict[str, Any]]:
    """One random configuration from each of ``n`` MAC strata of 4000 draws; where the stratum's pick is already in
    ``seen``, another configuration of that stratum that is not (if it has one)."""
    space, cost = evaluate.space, evaluate.evaluator.supernet.cost
    draws = []
    for _ in range(4000):
        tuples = [b.candidates[rng.integers(len(b.candidates))] for b in space.blocks]
        ranks = space.from_block_tuples(tuples)
        draws.append((cost.macs(ranks), ranks))
    draws.sort(key=lambda d: d[0])
    out: list[dict[str, Any]] = []
    for i, stratum in enumerate(np.array_split(np.arange(len(draws)), n) if n else []):
        ranks = draws[int(rng.choice(stratum))][1]
        if tuple(sorted(ranks.items())) in seen:
            fresh = [draws[j][1] for j in rng.permutation(stratum) if tuple(sorted(draws[j][1].items())) not in seen]
            ranks = fresh[0] if fresh else ranks
        seen.add(tuple(sorted(ranks.items())))
        out.append({"kind": "random", "name": f"random {i}", "ranks": dict(ranks)})
    return out


# --- one supernet ---------------------------------------------------------------------------------------------------


def finetune_splits(cfg, images: int, seed: int):
    """The run's splits with the training split cut to a seeded class-balanced ``images`` (the short fine-tune)."""
    splits = build_datasets(cfg.data, pixels=("train",))
    return dataclasses.replace(splits, train=eval_subset(splits.train, images, seed))


def measure_variant(run_dir: Path, subnets: list[dict[str, Any]], args, cache: dict[str, Any]) -> list[dict]:
    """Inherited search accuracy and fine-tuned test accuracy of every subnet on one supernet (cached)."""
    cfg = run_config(run_dir)
    evaluate = build_evaluator(cfg, run_dir, args.eval_images or cfg.search.eval_images)
    supernet = evaluate.evaluator.supernet
    (teacher,) = load_teacher(cfg, RunStore(run_dir))
    splits = finetune_splits(cfg, args.finetune_images, cfg.run.seed)
    rows = []
    for i, subnet in enumerate(subnets):
        key = f"{run_dir.name}|{json.dumps(subnet['ranks'], sort_keys=True)}|{args.settings}"
        if key not in cache:
            macs, inherited = evaluate(subnet["ranks"])
            tuned = finetune_subnet(cfg, subnet["ranks"], supernet=supernet, teacher=teacher, splits=splits,
                                    within_candidates=False, epochs=args.finetune_epochs)  # fmt: skip
            cache[key] = {"macs": macs, "inherited": inherited, "test_before": tuned["test_accuracy_before"],
                          "test_after": tuned["test_accuracy"], "finetune_seconds": tuned["seconds"]}  # fmt: skip
            write_json(args.output / CACHE_FILE, cache)
            print(
                f"  {run_dir.name} [{i + 1}/{len(subnets)}] {subnet['name']}: {macs / 1e6:.2f} MMACs, inherited "
                f"{inherited:.2f}%, test {tuned['test_accuracy_before']:.2f}% -> {tuned['test_accuracy']:.2f}% "
                f"({tuned['seconds']:.0f} s)",
                flush=True,
            )
        rows.append({**{k: v for k, v in subnet.items() if k != "ranks"}, **cache[key], "ranks": subnet["ranks"]})
    return rows


def correlations(rows: list[dict], x: str, y: str, resamples: int) -> dict[str, Any]:
    """Kendall tau and Spearman rho of columns ``x`` and ``y`` with their bootstrap 95% intervals, each distinct
    subnet counted once."""
    rows = [r for r in rows if not r.get("repeat")]
    a, b = [r[x] for r in rows], [r[y] for r in rows]
    return {
        "n": len(rows),
        "kendall_tau": kendall_tau(a, b),
        "kendall_tau_ci95": bootstrap_interval(a, b, kendall_tau, resamples),
        "spearman_rho": spearman_rho(a, b),
        "spearman_rho_ci95": bootstrap_interval(a, b, spearman_rho, resamples),
    }


# --- the filter's score and the gains -------------------------------------------------------------------------------


def filter_score_fidelity(base: Path, rows: list[dict], resamples: int) -> list[dict[str, Any]]:
    """Per block: Spearman rho between minus the filter's score of a triple (higher: better) and the mean
    fine-tuned test accuracy of the subnets using that triple, over the triples the subnets use."""
    store = RunStore(base)
    if not store.is_file(ARTEFACTS.filter_scores):
        return []
    scores = store.read_parquet(ARTEFACTS.filter_scores)
    out = []
    for block, table in scores.groupby("block", sort=False):
        fqns = list(json.loads(table["ranks_by_fqn"].iloc[0]))
        score = {
            tuple(json.loads(r)[f] for f in fqns): s for r, s in zip(table["ranks_by_fqn"], table["score"], strict=True)
        }
        used: dict[tuple[int, ...], list[float]] = {}
        for row in (r for r in rows if not r["repeat"]):
            triple = tuple(row["ranks"][f] for f in fqns)
            if triple in score:
                used.setdefault(triple, []).append(row["test_after"])
        finite = [(-score[t], float(np.mean(acc))) for t, acc in used.items() if np.isfinite(score[t])]
        entry: dict[str, Any] = {"block": block, "triples": len(finite), "subnets": sum(map(len, used.values()))}
        if len(finite) >= 3:
            x, y = zip(*finite, strict=True)
            entry["spearman_rho"] = spearman_rho(x, y)
            entry["spearman_rho_ci95"] = bootstrap_interval(x, y, spearman_rho, resamples)
        out.append(entry)
    return out


def gains(rows: list[dict], dense_cost: float, teacher_search: float, teacher_test: float) -> dict[str, Any]:
    """The front points against the uniform configurations, inherited and after fine-tuning."""
    frame = pd.DataFrame(rows)
    result = {}
    references = {"inherited": ("inherited", teacher_search), "finetuned": ("test_after", teacher_test)}
    for label, (column, reference) in references.items():
        points = frame.assign(accuracy=frame[column])
        front, uniform = points[points["kind"] == "front"], points[points["kind"] == "uniform"]
        table = gain_table(front, uniform, reference, dense_cost)
        result[label] = json.loads(table.to_json(orient="records"))
    return result


@torch.no_grad()
def teacher_accuracies(base: Path, evaluate: CachedEvaluator) -> tuple[float, float]:
    """The dense teacher's accuracy (%) on the search images (``evaluate``'s, the base run's evaluator) and on the
    test split."""
    cfg = run_config(base)
    (teacher,) = load_teacher(cfg, RunStore(base))
    teacher.eval()
    search = evaluate.evaluator.model_accuracy(teacher)
    return search, accuracy(teacher, build_datasets(cfg.data).test, "cpu")


# --- output ---------------------------------------------------------------------------------------------------------


def _ci(value: float, interval: tuple[float, float]) -> str:
    return f"{value:+.3f} [{interval[0]:+.3f}, {interval[1]:+.3f}]"


def print_tables(out: dict[str, Any]) -> None:
    """The fidelity table per supernet, the filter's per-block score fidelity and the gains."""
    print(f"\nRanking fidelity ({out['distinct_subnets']} distinct subnets; inherited search accuracy vs test accuracy after the same "
          f"fine-tune; 95% bootstrap intervals over {out['resamples']} resamples):")  # fmt: skip
    print("| supernet | sampler | distill from | space | Kendall tau [95% CI] | Spearman rho [95% CI] | inherited vs "
          "test before fine-tune (tau) | fine-tune gain (pts, mean) |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, v in out["variants"].items():
        c, b = v["inherited_vs_finetuned"], v["inherited_vs_test_before"]
        print(f"| {name} | {v['sampler']} | {v['distill_from']} | {v['space']} | "
              f"{_ci(c['kendall_tau'], c['kendall_tau_ci95'])} | "
              f"{_ci(c['spearman_rho'], c['spearman_rho_ci95'])} | {b['kendall_tau']:+.3f} | "
              f"{v['mean_finetune_gain']:+.2f} |")  # fmt: skip
    if out["filter_score_fidelity"]:
        print("\nDoes the filter's per-triple score predict the fine-tuned accuracy of subnets using the triple?")
        print("| block | triples used | subnets | Spearman rho [95% CI] |")
        print("| --- | --- | --- | --- |")
        for e in out["filter_score_fidelity"]:
            rho = _ci(e["spearman_rho"], e["spearman_rho_ci95"]) if "spearman_rho" in e else "- (< 3 triples)"
            print(f"| {e['block']} | {e['triples']} | {e['subnets']} | {rho} |")
    for label, rows in out["gains"].items():
        print(f"\nFront vs uniform ranks, {label} ({out['gain_reference'][label]}):")
        print("| kind | value | target | front MMACs (acc) | uniform MMACs (acc) | gain |")
        print("| --- | --- | --- | --- | --- | --- |")
        for r in rows:
            target = f"{r['target']:.2f}%" if r["kind"] == "drop" else f"{r['target'] / 1e6:.2f} MMACs"
            front = "-" if r["front_macs"] is None else f"{r['front_macs'] / 1e6:.2f} ({r['front_accuracy']:.2f})"
            uni = "-" if r["uniform_macs"] is None else f"{r['uniform_macs'] / 1e6:.2f} ({r['uniform_accuracy']:.2f})"
            gain = "-" if r["gain"] is None else (f"{100 * r['gain']:+.1f}% MACs" if r["kind"] == "drop"
                                                   else f"{r['gain']:+.2f} pts")  # fmt: skip
            value = f"{r['value']:g} pt" if r["kind"] == "drop" else f"{100 * r['value']:.0f}% of dense"
            print(f"| {r['kind']} | {value} | {target} | {front} | {uni} | {gain} |")


def parse_args():
    parser = bench_parser(
        __doc__,
        smoke={"random": 4, "finetune_images": 400, "resamples": 200, "front_trials": 16},
        smoke_help="tiny digits runs prepared in-process (under OUTPUT/runs), a minute",
    )
    parser.add_argument("--run-dir", type=Path, help="a searched run (default: a prepared quickstart run)")
    parser.add_argument("--random", type=int, default=8, help="random subnets, one per MAC stratum")
    parser.add_argument("--finetune-images", type=int, default=6000, help="training images of the short fine-tune")
    parser.add_argument("--finetune-epochs", type=int, default=1, help="epochs of the short fine-tune")
    parser.add_argument("--eval-images", type=int, help="search images per inherited accuracy (default: the run's)")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS),
                        help="ablation supernets (default: all of them, or none with --recipes)")  # fmt: skip
    parser.add_argument("--recipes", type=recipe_list, default=[],
                        help=f"comma-separated train.recipe names, one supernet each: {', '.join(RECIPES)}")  # fmt: skip
    parser.add_argument("--subnets", type=int, help="distinct subnets in all (random strata fill the rest)")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random subnets")
    parser.add_argument("--front-trials", type=int, default=120, help="search trials for a run with no front yet")
    args = parser.parse_args()
    if args.variants is None:
        args.variants = [] if args.recipes else list(VARIANTS)
    if not args.variants and not args.recipes:
        parser.error("nothing to measure: name --variants or --recipes")
    args.settings = f"ft{args.finetune_epochs}x{args.finetune_images}/ev{args.eval_images}"
    return args


def recipe_list(text: str) -> list[str]:
    """``--recipes flora,sandwich_inplace``: names of ``RECIPES``, in order, each once."""
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in RECIPES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"--recipes={text!r}: {unknown or 'none'} not in {list(RECIPES)}")
    return names


def summarise_variant(name: str, run_dir: Path, rows: list[dict], resamples: int) -> dict[str, Any]:
    cfg = run_config(run_dir)
    return {
        "run_dir": str(run_dir),
        "recipe": cfg.train.recipe,
        "sampler": cfg.train.sampler,
        "distill_from": cfg.train.distill_from,
        "space": "unfiltered" if name == "no_filter" else "filtered",
        "inherited_vs_finetuned": correlations(rows, "inherited", "test_after", resamples),
        "inherited_vs_test_before": correlations(rows, "inherited", "test_before", resamples),
        "mean_finetune_gain": float(np.mean([r["test_after"] - r["test_before"] for r in rows if not r["repeat"]])),
        "rows": rows,
    }


def supernet_dirs(base: Path, args) -> dict[str, Path]:
    """The run directory of every supernet measured: ``--variants`` then ``--recipes`` (``recipe_<name>``)."""
    specs = {name: VARIANTS[name] for name in VARIANTS if name in args.variants}
    for recipe in args.recipes:
        specs[RECIPE_PREFIX + recipe] = None if trained_with(base, recipe) else recipe_variant(recipe)
    return {name: base if spec is None else prepare_ablation(base, name, spec, runs_root=base.parent, local=args.smoke)
            for name, spec in specs.items()}  # fmt: skip


def main() -> None:
    args = parse_args()
    started, load_start = time.perf_counter(), os.getloadavg()
    base = prepare_base_run(args.run_dir, args.smoke, args.output).resolve()
    torch.set_num_threads(max(os.cpu_count() or 1, 1))
    dirs = supernet_dirs(base, args)
    evaluate = build_evaluator(run_config(base), base, args.eval_images or run_config(base).search.eval_images)
    space, cost = evaluate.space, evaluate.evaluator.supernet.cost
    subnets = choose_subnets(base, evaluate, args)
    print(f"{len(subnets)} subnets ({', '.join(s['name'] for s in subnets)}) on {len(dirs)} supernets", flush=True)
    cache = read_json(args.output / CACHE_FILE) if (args.output / CACHE_FILE).is_file() else {}
    variants = {}
    for name, run_dir in dirs.items():
        rows = measure_variant(run_dir, subnets, args, cache)
        variants[name] = summarise_variant(name, run_dir, rows, args.resamples)
    teacher_search, teacher_test = teacher_accuracies(base, evaluate)
    dense_cost = cost.macs(evaluate.full_rank())
    main_rows = next((variants[n] for n, d in dirs.items() if d == base), next(iter(variants.values())))["rows"]
    cfg = run_config(base)
    out = {
        "benchmark": "ranking_fidelity",
        "date": time.strftime("%Y-%m-%d"),
        "run": str(base),
        "model": cfg.model.name,
        "model_kwargs": cfg.model.kwargs,
        "dataset": cfg.data.name,
        "ratios": list(space.ratios),
        "subnets": len(subnets),
        "recipes": args.recipes,
        "distinct_subnets": sum(not s["repeat"] for s in subnets),
        "finetune": {
            "epochs": args.finetune_epochs,
            "train_images": args.finetune_images,
            "recipe": dataclasses.asdict(cfg.finetune),
        },
        "eval_images": args.eval_images or cfg.search.eval_images,
        "resamples": args.resamples,
        "teacher": {"search_accuracy": teacher_search, "test_accuracy": teacher_test, "macs": dense_cost},
        "variants": variants,
        "filter_score_fidelity": filter_score_fidelity(base, main_rows, args.resamples),
        "gains": gains(main_rows, dense_cost, teacher_search, teacher_test),
        "gain_reference": {
            "inherited": f"search images, teacher {teacher_search:.2f}%",
            "finetuned": f"test split, teacher {teacher_test:.2f}%",
        },
        "wall_seconds": time.perf_counter() - started,
        "loadavg_start": list(load_start),
        "loadavg_end": list(os.getloadavg()),
    }
    print_tables(out)
    print(f"\nwall {out['wall_seconds']:.0f} s; load average {load_start[0]:.2f} -> {os.getloadavg()[0]:.2f}")
    write_result(args.output / "ranking_fidelity.json", out)
    print(f"wrote {args.output / 'ranking_fidelity.json'}")


if __name__ == "__main__":
    main()

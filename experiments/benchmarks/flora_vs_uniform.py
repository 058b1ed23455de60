"""FLORA versus uniform ranks in miniature: extra MAC reduction of the searched front at 0.5 and 1 point drop.

The paper reports up to 33% fewer FLOPs than the best uniform-rank configuration at the same accuracy. Here, on
one trained run (Fashion-MNIST quickstart by default), for each supernet variant:

- ``flora``: the run itself (filtered space, low-rank aware sampling), the paper's recipe;
- ``no_filter``: a supernet trained on the full (unfiltered) space, searched over it (the filtering ablation);
- ``uniform_sampling``: the run's filtered space trained with ``train.sampler=uniform`` (the sampling ablation);

the front of an NSGA-II search (flora-ray's sampler settings and anchor points: the uniform configurations the
space contains and its cheapest one enqueued first; in-process ask/tell as in ``search_efficiency.py``) is compared with every uniform configuration evaluated on the
same supernet with the same images. The target accuracy is the dense teacher's accuracy on those images minus 0.5
or 1 point; reported: the cheapest front point and the cheapest uniform configuration reaching it, and the extra
reduction ``1 - front MACs / uniform MACs`` (``results.gain_over_uniform``). Ablation supernets are trained with
the base run's configuration (``run_config.yaml``) by the ``train`` stage (``pipeline.run_stage``; ``LocalBackend``
with ``--smoke``, else ``RayBackend``) into ``runs/bench-<run>-<variant>`` (about 90 s each for the quickstart
schedule) and reused while the teacher, space and configuration are unchanged.

    .venv/bin/python experiments/benchmarks/flora_vs_uniform.py                           # prepares runs/bench-quickstart if needed
    .venv/bin/python experiments/benchmarks/flora_vs_uniform.py --run-dir runs/quickstart
    .venv/bin/python experiments/benchmarks/flora_vs_uniform.py --smoke --output /tmp/x    # digits, seconds
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import numpy as np
import optuna
import pandas as pd
import torch
from harness import bench_parser, write_result
from harness_runs import (
    CachedEvaluator,
    build_evaluator,
    nsga2_search,
    pareto_points,
    points_hypervolume,
    prepare_ablation,
    prepare_base_run,
    run_config,
    uniform_search,
)

from flora_ray.config import Config
from flora_ray.results import GAIN_DROPS, cheapest_within, gain_over_uniform
from flora_ray.search.plots import pyplot, save_png
from flora_ray.stages.inputs import load_teacher
from flora_ray.storage.run_store import RunStore

DROPS = GAIN_DROPS  # accuracy points below the reference
# variant: (overrides of the base run's training configuration, whether it keeps the base run's trained space)
ABLATIONS = {
    "no_filter": (("train.space_file=null",), False),
    "uniform_sampling": (("train.space_file=null", "train.sampler=uniform"), True),
}


# --- evaluation ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def dense_accuracy(cfg: Config, run_dir: Path, evaluate: CachedEvaluator) -> float:
    """Top-1 accuracy (%) of the run's dense teacher on the evaluator's images."""
    (teacher,) = load_teacher(cfg, RunStore(run_dir))
    teacher.eval()
    ev = evaluate.evaluator
    correct = 0
    for start in range(0, len(ev.labels), ev.batch_size):
        logits = teacher(ev.images[start : start + ev.batch_size])
        correct += (logits.argmax(-1) == ev.labels[start : start + ev.batch_size]).sum().item()
    return 100.0 * correct / len(ev.labels)


def search_variant(run_dir: Path, args, seed: int, evaluate: CachedEvaluator | None = None) -> dict[str, Any]:
    """NSGA-II front, uniform configurations and dense accuracy of one supernet (``evaluate``: its cached
    evaluator, shared by the searches of several seeds)."""
    cfg = run_config(run_dir)
    evaluate = evaluate or build_evaluator(cfg, run_dir, args.eval_images)
    started = time.perf_counter()
    points = nsga2_search(evaluate.space, evaluate, cfg.search, args.trials, seed)
    configs = evaluate.space.uniform_all()
    uniform = pd.DataFrame(uniform_search(evaluate), columns=["macs", "accuracy"])
    uniform.insert(0, "ratio", sorted(configs, reverse=True))
    uniform["in_space"] = [evaluate.space.contains(configs[r]) for r in uniform["ratio"]]
    return {
        "cfg": cfg,
        "space": evaluate.space,
        "points": points,
        "front": pd.DataFrame(sorted(pareto_points(points)), columns=["macs", "accuracy"]),
        "uniform": uniform,
        "full_rank": evaluate(evaluate.full_rank()),
        "dense_accuracy": dense_accuracy(cfg, run_dir, evaluate),
        "seconds": time.perf_counter() - started,
        "distinct": len(evaluate.cache),
    }


def compare(result: dict[str, Any], reference: float, drop: float) -> dict[str, Any]:
    """Cheapest front point and uniform configuration within ``drop`` of ``reference``, and the extra reduction."""
    ours = cheapest_within(result["front"], reference - drop)
    theirs = cheapest_within(result["uniform"], reference - drop)
    dense_macs = result["full_rank"][0]
    return {
        "drop": drop,
        "target_accuracy": reference - drop,
        "front_macs": None if ours is None else float(ours["macs"]),
        "front_accuracy": None if ours is None else float(ours["accuracy"]),
        "uniform_macs": None if theirs is None else float(theirs["macs"]),
        "uniform_accuracy": None if theirs is None else float(theirs["accuracy"]),
        "uniform_ratio": None if theirs is None else float(theirs["ratio"]),
        "front_reduction_vs_dense": None if ours is None else 1 - float(ours["macs"]) / dense_macs,
        "uniform_reduction_vs_dense": None if theirs is None else 1 - float(theirs["macs"]) / dense_macs,
        "extra_reduction_over_uniform": gain_over_uniform(result["front"], result["uniform"], drop, reference),
    }


def summarise(variant: str, run_dir: Path, result: dict[str, Any], ref: tuple[float, float], scale: float):
    """The JSON record of one variant."""
    cfg, space = result["cfg"], result["space"]
    dense = result["dense_accuracy"]
    return {
        "run_dir": str(run_dir),
        "sampler": cfg.train.sampler,
        "candidates_per_block": [len(b.candidates) for b in space.blocks],
        "space_configs": space.num_configs,
        "dense_accuracy": dense,
        "full_rank_macs": result["full_rank"][0],
        "full_rank_accuracy": result["full_rank"][1],
        "trials": len(result["points"]),
        "distinct_configurations": result["distinct"],
        "search_seconds": result["seconds"],
        "front": result["front"].to_dict(orient="records"),
        "uniform": result["uniform"].to_dict(orient="records"),
        "hypervolume": points_hypervolume(list(map(tuple, result["front"].to_numpy())), ref) / scale,
        "versus_dense": [compare(result, dense, drop) for drop in DROPS],
        "versus_full_rank": [compare(result, result["full_rank"][1], drop) for drop in DROPS],
    }


# --- output -------------------------------------------------------------------------------------------------------


def _mmacs(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e6:.3f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def search_all(dirs: dict[str, Path], args) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per variant: the search of the first seed (for the tables) and the spread of the extra reduction over
    uniform ranks across all seeds (mean, standard deviation, min, max per drop, relative to the dense teacher)."""
    results, spreads = {}, {}
    for name, run_dir in dirs.items():
        cfg = run_config(run_dir)
        default = cfg.search.seed if cfg.search.seed is not None else cfg.run.seed
        evaluate = build_evaluator(cfg, run_dir, args.eval_images)
        searches = []
        for seed in args.seeds or [default]:
            result = search_variant(run_dir, args, seed, evaluate)
            searches.append(
                [compare(result, result["dense_accuracy"], d)["extra_reduction_over_uniform"] for d in DROPS]
            )
            results.setdefault(name, result)
            print(
                f"{name} seed {seed}: searched in {result['seconds']:.0f} s, load {os.getloadavg()[0]:.2f}", flush=True
            )
        spreads[name] = {"seeds": args.seeds or [default], "searches": searches, "per_drop": _spread(searches)}
    return results, spreads


def _spread(searches: list[list[float | None]]) -> list[dict[str, Any]]:
    out = []
    for i, drop in enumerate(DROPS):
        values = [s[i] for s in searches if s[i] is not None]
        stats = {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                 "min": min(values), "max": max(values)} if values else {}  # fmt: skip
        out.append({"drop": drop, "reached": len(values), **stats})
    return out


def print_spread(variants: dict[str, dict[str, Any]]) -> None:
    """Mean and spread over the search seeds of the extra reduction over uniform (targets: dense - drop)."""
    print("Extra MAC reduction over the best uniform configuration across search seeds (mean +- sd [min, max]):")
    print("| variant | seeds | " + " | ".join(f"{d:g} pt" for d in DROPS) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in DROPS) + " |")
    for name, v in variants.items():
        cells = [
            f"{100 * e['mean']:.1f}% +- {100 * e['std']:.1f} [{100 * e['min']:.1f}, {100 * e['max']:.1f}]"
            + ("" if e["reached"] == len(v["seeds"]["seeds"]) else f" ({e['reached']} reached)")
            if e["reached"]
            else "not reached"
            for e in v["seeds"]["per_drop"]
        ]
        print(f"| {name} | {len(v['seeds']['seeds'])} | " + " | ".join(cells) + " |")


def print_table(variants: dict[str, dict[str, Any]], key: str = "versus_dense") -> None:
    """One Markdown row per variant and accuracy drop."""
    print(
        "| variant | space (triples/block) | sampler | drop | target acc | front MMACs (acc) | "
        "best uniform MMACs (ratio, acc) | extra reduction over uniform | front saving vs dense | HV |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, v in variants.items():
        for row in v[key]:
            front = (
                f"{_mmacs(row['front_macs'])} ({row['front_accuracy']:.2f})" if row["front_macs"] is not None else "-"
            )
            uniform = (
                f"{_mmacs(row['uniform_macs'])} ({row['uniform_ratio']:g}, {row['uniform_accuracy']:.2f})"
                if row["uniform_macs"] is not None
                else "none reaches it"
            )
            print(
                f"| {name} | {'/'.join(map(str, v['candidates_per_block']))} | {v['sampler']} | {row['drop']:g} | "
                f"{row['target_accuracy']:.2f} | {front} | {uniform} | {_pct(row['extra_reduction_over_uniform'])} | "
                f"{_pct(row['front_reduction_vs_dense'])} | {v['hypervolume']:.4f} |"
            )


def plot(path: Path, variants: dict[str, dict[str, Any]]) -> None:
    """Each variant's front (steps) and uniform configurations (dashed), with the dense accuracy targets."""
    fig, ax = pyplot().subplots(figsize=(6.8, 4.6))
    for i, (name, v) in enumerate(variants.items()):
        front, uniform = pd.DataFrame(v["front"]), pd.DataFrame(v["uniform"]).sort_values("macs")
        ax.step(front["macs"] / 1e6, front["accuracy"], where="post", color=f"C{i}", marker=".", label=f"{name} front")
        ax.plot(uniform["macs"] / 1e6, uniform["accuracy"], color=f"C{i}", marker="s", linestyle="--", alpha=0.6)
    dense = next(iter(variants.values()))["dense_accuracy"]
    for drop in (0.0, *DROPS):
        ax.axhline(dense - drop, color="0.4", linewidth=0.8, linestyle=":")
    ax.set_xlabel("MMACs per image (squares, dashed: uniform ranks)")
    ax.set_ylabel("search-split accuracy (%)")
    ax.set_ylim(bottom=max(0.0, dense - 8))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    save_png(fig, path)


def parse_args():
    parser = bench_parser(
        __doc__,
        smoke={"trials": 16, "eval_images": 200},
        smoke_help="tiny digits runs prepared in-process (under OUTPUT/runs), seconds",
    )
    parser.add_argument("--run-dir", type=Path, help="a trained run (teacher, space.json, supernet.safetensors)")
    parser.add_argument("--trials", type=int, default=200, help="NSGA-II evaluations per variant")
    parser.add_argument("--eval-images", type=int, default=2000, help="search-split images per evaluation")
    parser.add_argument("--seeds", type=int, nargs="+", help="search seeds, one search each (default: the run's)")
    parser.add_argument("--floor-drop", type=float, default=10.0, help="HV floor below the dense accuracy")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override of a prepared run")
    return parser.parse_args()


def prepare_variants(args) -> dict[str, Path]:
    """The base run (given or prepared) and its ablation supernets, by variant name."""
    base = prepare_base_run(args.run_dir, args.smoke, args.output, args.set).resolve()
    runs_root = base.parent  # beside the base run (ranking_fidelity.py puts them there too, and shares them)
    ablations = {
        v: prepare_ablation(base, v, spec, runs_root=runs_root, local=args.smoke) for v, spec in ABLATIONS.items()
    }
    return {"flora": base, **ablations}


def main() -> None:
    args = parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    load_start, started = os.getloadavg(), time.perf_counter()
    dirs = prepare_variants(args)
    prepared = time.perf_counter() - started
    results, spreads = search_all(dirs, args)
    base = results["flora"]
    ref = (base["full_rank"][0], base["dense_accuracy"] - args.floor_drop)
    scale = ref[0] * (100.0 - ref[1])
    variants = {name: summarise(name, dirs[name], r, ref, scale) for name, r in results.items()}
    for name, spread in spreads.items():
        variants[name]["seeds"] = spread
    out = {
        "benchmark": "flora_vs_uniform",
        "date": time.strftime("%Y-%m-%d"),
        "smoke": args.smoke,
        "model": base["cfg"].model.name,
        "model_kwargs": base["cfg"].model.kwargs,
        "dataset": base["cfg"].data.name,
        "ratios": list(base["space"].ratios),
        "eval_images": args.eval_images,
        "trials": args.trials,
        "seeds": args.seeds or "the run's",
        "search": "in-process Optuna ask/tell, same NSGAIISampler settings and Evaluator as flora-ray search",
        "dense_accuracy": base["dense_accuracy"],
        "drops": list(DROPS),
        "hypervolume_reference_point": {"macs": ref[0], "accuracy": ref[1]},
        "hypervolume_unit": "fraction of [0, full-rank MACs] x [reference accuracy, 100]",
        "variants": variants,
        "prepare_seconds": prepared,
        "wall_seconds": time.perf_counter() - started,
        "loadavg_start": list(load_start),
        "loadavg_end": list(os.getloadavg()),
    }
    print(
        f"{out['model']} on {out['dataset']}, ratios {out['ratios']}; dense teacher {out['dense_accuracy']:.2f}% on "
        f"{args.eval_images} search images; {args.trials} NSGA-II trials per variant (in-process ask/tell, "
        f"flora-ray's sampler settings); the paper reports up to 33% extra reduction over uniform ranks"
    )
    print("Targets relative to the dense teacher:")
    print_table(variants)
    print("Targets relative to each supernet's full-rank subnet:")
    print_table(variants, "versus_full_rank")
    if len(next(iter(spreads.values()))["searches"]) > 1:
        print_spread(variants)
    print(f"wall {out['wall_seconds']:.0f} s; load average {load_start[0]:.2f} -> {os.getloadavg()[0]:.2f}")
    write_result(args.output / "flora_vs_uniform.json", out)
    plot(args.output / "flora_vs_uniform.png", variants)
    print(f"wrote {args.output / 'flora_vs_uniform.json'} and flora_vs_uniform.png")


if __name__ == "__main__":
    main()

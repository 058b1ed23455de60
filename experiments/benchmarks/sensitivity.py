"""Per-layer and per-block sensitivity of a run's supernet: does the choice of per-layer ranks matter there?

For each factorised layer: that layer alone at its lowest rank, every other layer at full rank; for each block:
the whole block at its lowest ranks, the rest at full rank; and uniform lowest rank for reference. Each is scored
with the supernet's inherited weights on the run's test split (``--images``: a stratified, seeded subset) and
compared with full rank image by image (paired standard error, ``results.paired_difference``). A per-layer search
can only beat uniform ranks where layers differ: the spread of the per-layer drops is compared with their noise.

    python experiments/benchmarks/sensitivity.py                       # runs/proving_ground (made if missing)
    python experiments/benchmarks/sensitivity.py --run runs/quickstart --config experiments/quickstart.yaml
    python experiments/benchmarks/sensitivity.py --smoke               # a digits run, in seconds (tests)

Writes ``results/sensitivity_<run name>.json`` and prints the table.
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from harness import ROOT, bench_parser, environment, write_result

import flora_ray as fr
from flora_ray.config import load_config
from flora_ray.core.cost import CostModel
from flora_ray.core.space import rank_for_ratio
from flora_ray.data.datasets import build_datasets
from flora_ray.results import paired_difference, unpack_correct
from flora_ray.search.evaluator import Evaluator, search_batch

SMOKE = ["model.name=test_vit", "model.kwargs={patch_size: 2, embed_dim: 32, depth: 2, num_heads: 2, mlp_ratio: 2}",
         "model.ratios=[0.25, 0.5, 1.0]", "data.name=digits", "data.img_size=8", "data.in_chans=1",
         "data.augment=false", "pretrain.epochs=3", "pretrain.lr=0.003", "pretrain.warmup_epochs=0",
         "filter.epochs=1", "filter.eval_images=100", "train.epochs=2", "train.warmup_epochs=0", "train.eval_images=100",
         "search.trials=8", "search.population=4", "search.eval_images=150", "search.concurrency=1",
         "profile.enabled=false", "run.threads_per_worker=1", "run.name=sensitivity-smoke"]  # fmt: skip


def configurations(space: fr.RankSpace) -> list[dict[str, Any]]:
    """Full rank, each layer alone at its lowest rank, each block at its lowest ranks, uniform lowest."""
    full = {layer.fqn: layer.max_rank for layer in space.layers}
    lowest = {layer.fqn: min(layer.rank_choices) for layer in space.layers}
    out = [{"kind": "full", "name": "full rank", "ranks": full}]
    out += [{"kind": "layer", "name": fqn, "block": block.name, "ranks": {**full, fqn: lowest[fqn]}}
            for block in space.blocks for fqn in block.fqns]  # fmt: skip
    out += [{"kind": "block", "name": block.name, "block": block.name,
             "ranks": {**full, **{fqn: lowest[fqn] for fqn in block.fqns}}} for block in space.blocks]  # fmt: skip
    out.append({"kind": "uniform", "name": f"uniform {min(space.ratios):g}", "ranks": lowest})
    return out


def score(evaluator: Evaluator, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each configuration's MACs and accuracy, and its paired drop from the first one (full rank): ``drop`` (points,
    full rank - this one), ``drop_se`` and ``macs_saved``."""
    rows = []
    for item in items:
        metrics = evaluator.evaluate(item["ranks"])
        correct = unpack_correct(metrics["correct"], metrics["eval_images"])
        rows.append({**{k: v for k, v in item.items() if k != "ranks"}, "macs": metrics["macs"],
                     "accuracy": metrics["accuracy"], "correct": correct})  # fmt: skip
    full = rows[0]
    for row in rows:
        diff, se = paired_difference(row["correct"], full["correct"])
        row.update(drop=-diff, drop_se=se, macs_saved=1.0 - row["macs"] / full["macs"])
    return rows


def layer_sensitivity(evaluator: Evaluator) -> dict[str, float]:
    """Each layer's accuracy drop (points) alone at its lowest rank, every other layer at full rank, on the
    evaluator's images: what ``guided_allocations`` orders layers by."""
    items = [c for c in configurations(evaluator.supernet.space) if c["kind"] in ("full", "layer")]
    return {r["name"]: r["drop"] for r in score(evaluator, items) if r["kind"] == "layer"}


def guided_allocations(
    space: fr.RankSpace, drops: Mapping[str, float], cost: CostModel, *, keep_full: int | None = None, step: int = 1
) -> list[dict[str, Any]]:
    """The sensitivity-guided baseline: allocations that lower the least sensitive layers first.

    Layers are ordered by ``drops`` (each layer's accuracy drop alone at its lowest rank; least sensitive first,
    ties in the space's layer order). For each pair of adjacent ratios ``low < mid`` of the space and each ``n``
    from 0 to L: the ``n`` least sensitive layers at ``low`` and the rest at ``mid``; and, where ``mid < 1``, the
    ``keep_full`` most sensitive layers at full rank, the ``n`` (up to ``L - keep_full``) least sensitive at ``low``
    and the rest at ``mid`` (default ``keep_full``: L / 6 rounded, at least 1; 2 of 12 layers gives the issue's
    example, the 4 least sensitive at 1/16, the 2 most at full rank, the rest at 1/8). A configuration reached
    twice is kept once (the first name). ``step``: ``n`` runs in steps of ``step`` (its last value always
    included), for a smaller family. Returns per configuration ``name``, ``low``, ``mid``, ``lowered``,
    ``full`` (layers at full rank, ``mid == 1`` counted), ``ranks`` and ``macs`` (``cost.macs``).
    """
    if set(drops) != set(space.fqns):
        raise ValueError(f"drops name {sorted(drops)}; need exactly the space's layers {list(space.fqns)}")
    position = {fqn: i for i, fqn in enumerate(space.fqns)}
    order = sorted(space.fqns, key=lambda fqn: (drops[fqn], position[fqn]))  # least sensitive first
    n_layers, ratios = len(order), sorted(space.ratios)
    keep_full = max(1, round(n_layers / 6)) if keep_full is None else keep_full
    if not 0 <= keep_full <= n_layers:
        raise ValueError(f"keep_full={keep_full} must be between 0 and the {n_layers} layers")
    if step < 1:
        raise ValueError(f"step={step} must be at least 1")
    out, seen = [], set()
    for low, mid in itertools.pairwise(ratios):
        for full in sorted({0, keep_full if mid < 1 else 0}):
            for lowered in sorted({*range(0, n_layers - full + 1, step), n_layers - full}):
                at = {f: low for f in order[:lowered]} | {f: 1.0 for f in order[n_layers - full :]}
                ranks = {f: rank_for_ratio(at.get(f, mid), space.layer(f).max_rank) for f in space.fqns}
                key = tuple(ranks.values())
                if key in seen:
                    continue
                seen.add(key)
                name = f"{lowered} least sensitive at {low:g}, " + (f"{full} most at 1, " if full else "")
                out.append({"name": f"{name}rest at {mid:g}", "low": low, "mid": mid, "lowered": lowered,
                            "full": n_layers - lowered if mid == 1 else full, "ranks": ranks, "macs": float(cost.macs(ranks))})  # fmt: skip
    return out


def measure(run: fr.Run, images: int, seed: int = 0) -> dict[str, Any]:
    """Every configuration's MACs and test accuracy, and its paired difference to full rank."""
    supernet = run.supernet
    test_images, test_labels = search_batch(build_datasets(run.config.data).test, images, seed)
    evaluator = Evaluator(supernet, test_images, test_labels, "cpu", run.config.search.batch_size)
    started = time.perf_counter()
    rows = score(evaluator, configurations(supernet.space))
    layers = [r for r in rows if r["kind"] == "layer"]
    drops = np.array([r["drop"] for r in layers])
    spread = float(drops.max() - drops.min())
    noise = float(np.median([r["drop_se"] for r in layers]))
    return {
        "run": run.store.uri, "images": len(test_labels), "seconds": time.perf_counter() - started,
        "rows": [{k: v for k, v in r.items() if k != "correct"} for r in rows],
        "layer_spread": spread, "layer_median_se": noise, "spread_in_se": spread / noise if noise else float("inf"),
    }  # fmt: skip


def print_table(out: dict[str, Any]) -> None:
    print(f"sensitivity of {out['run']} on {out['images']} test images ({out['seconds']:.0f} s); drop = full rank - "
          "this configuration, in points, ± paired SE")  # fmt: skip
    print(f"{'configuration':<28} {'kind':<8} {'MACs saved':>10} {'test acc':>9} {'drop':>16}")
    for r in out["rows"]:
        print(f"{r['name']:<28} {r['kind']:<8} {100 * r['macs_saved']:>9.1f}% {r['accuracy']:>8.2f}% "
              f"{r['drop']:>+8.2f} ± {r['drop_se']:.2f}")  # fmt: skip
    print(f"per-layer drops spread over {out['layer_spread']:.2f} points; median paired SE {out['layer_median_se']:.2f}"
          f" ({out['spread_in_se']:.1f} SE)")  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = bench_parser(__doc__, smoke_help="a digits run made in this process (under OUTPUT/runs), in seconds")
    parser.add_argument("--run", help="run directory (default: runs/<config's run.name>)")
    parser.add_argument("--config", default=str(ROOT / "experiments" / "proving_ground.yaml"),
                        help="made with this config when the run has no supernet yet")  # fmt: skip
    parser.add_argument("--images", type=int, default=10_000, help="test images (stratified, seeded subset)")
    args = parser.parse_args(argv)
    if args.smoke:
        run = fr.run({}, SMOKE, backend="local", output=args.output / "runs")
    else:
        name = Path(args.run).name if args.run else load_config(args.config).run.name
        run_dir = Path(args.run) if args.run else ROOT / "runs" / name
        if (run_dir / "supernet.safetensors").is_file():
            run = fr.Run.open(run_dir)
        else:
            run = fr.run(args.config, output=run_dir.parent)
    out = measure(run, args.images)
    out["command"] = " ".join(["python", "experiments/benchmarks/sensitivity.py", *(argv or sys.argv[1:])])
    out["environment"] = environment()
    path = write_result(args.output / f"sensitivity_{run.store.name}.json", out)
    print_table(out)
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()

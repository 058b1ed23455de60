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

import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from harness import ROOT, bench_parser, environment, write_result

import flora_ray as fr
from flora_ray.config import load_config
from flora_ray.data.datasets import build_datasets
from flora_ray.search.evaluator import Evaluator, search_batch
from flora_ray.search.sensitivity import configurations, score

SMOKE = ["model.name=test_vit", "model.kwargs={patch_size: 2, embed_dim: 32, depth: 2, num_heads: 2, mlp_ratio: 2}",
         "model.ratios=[0.25, 0.5, 1.0]", "data.name=digits", "data.img_size=8", "data.in_chans=1",
         "data.augment=false", "pretrain.epochs=3", "pretrain.lr=0.003", "pretrain.warmup_epochs=0",
         "filter.epochs=1", "filter.eval_images=100", "train.epochs=2", "train.warmup_epochs=0", "train.eval_images=100",
         "search.trials=8", "search.population=4", "search.eval_images=150", "search.concurrency=1",
         "profile.enabled=false", "run.threads_per_worker=1", "run.name=sensitivity-smoke"]  # fmt: skip


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

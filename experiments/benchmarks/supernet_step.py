"""Supernet step versus extracted-subnet step at the same ranks (target: ratio <= 1.15).

One training step (forward, cross-entropy, backward, flora-ray's AdamW step) of the supernet with ``set_ranks(config)`` is
timed against the same step of ``extract_subnet(supernet, config)``, for several configurations, as the median of
repeated runs after warm-up. Prints a table and writes ``results/supernet_step.json``.

    .venv/bin/python experiments/benchmarks/supernet_step.py            # full run (a few minutes on 2 CPU cores)
    .venv/bin/python experiments/benchmarks/supernet_step.py --smoke    # seconds
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import flora_ray as fr
from flora_ray.storage.files import write_json
from flora_ray.training.optim import build_optimizer

RESULTS = Path(__file__).resolve().parent / "results"

WORKLOADS = {
    # name: (timm model, kwargs, batch)
    "quickstart-vit": ("test_vit", {"img_size": 32, "patch_size": 4, "in_chans": 1, "num_classes": 10}, 64),
    "deit-tiny-224": ("deit_tiny_patch16_224", {}, 8),
}


def interleaved_step_times(
    models: list[torch.nn.Module], x: torch.Tensor, y: torch.Tensor, steps: int, warmup: int
) -> list[float]:
    """Median seconds of one optimisation step of each model, the models' steps interleaved so that drifts in
    machine speed hit all of them alike. The optimiser is flora-ray's (fused AdamW with its parameter groups)."""
    optimizers = [build_optimizer(m, 1e-4, 0.01) for m in models]
    times: list[list[float]] = [[] for _ in models]
    for m in models:
        m.train()
    for i in range(warmup + steps):
        for model, optimizer, bucket in zip(models, optimizers, times, strict=True):
            start = time.perf_counter()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if i >= warmup:
                bucket.append(time.perf_counter() - start)
    return [statistics.median(bucket) for bucket in times]


def configs_for(space: fr.RankSpace, rng: random.Random) -> dict[str, dict[str, int]]:
    uniform = space.uniform_configs()
    ratios = sorted(uniform)
    out = {
        "largest": space.largest(),
        f"uniform {ratios[len(ratios) // 2]:.2f}": uniform[ratios[len(ratios) // 2]],
        "smallest": space.smallest(),
    }
    for i in range(2):
        out[f"random {i}"] = space.from_block_tuples([rng.choice(b.candidates) for b in space.blocks])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps of the small workload only")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    steps, warmup = (3, 1) if args.smoke else (args.steps, 3)
    workloads = {"quickstart-vit": WORKLOADS["quickstart-vit"]} if args.smoke else WORKLOADS
    rows = []
    for workload, (name, kwargs, batch) in workloads.items():
        supernet = fr.build_supernet(name, model_kwargs=kwargs)
        model = supernet.model
        x = torch.randn(batch, model.patch_embed.proj.in_channels, *model.patch_embed.img_size)
        y = torch.randint(0, model.num_classes, (batch,))
        for label, config in configs_for(supernet.space, random.Random(0)).items():
            supernet.set_ranks(config)
            t_super, t_sub = interleaved_step_times(
                [supernet, fr.extract_subnet(supernet, config)], x, y, steps, warmup
            )
            rows.append(
                {
                    "workload": workload,
                    "config": label,
                    "gmacs_per_image": supernet.cost.macs(config) / 1e9,
                    "supernet_step_ms": 1e3 * t_super,
                    "subnet_step_ms": 1e3 * t_sub,
                    "ratio": t_super / t_sub,
                }
            )
            r = rows[-1]
            print(
                f"{workload:<15} {label:<14} {r['gmacs_per_image']:>7.3f} GMACs  supernet {r['supernet_step_ms']:>8.1f} ms"
                f"  subnet {r['subnet_step_ms']:>8.1f} ms  ratio {r['ratio']:.3f}",
                flush=True,
            )
    worst = max(r["ratio"] for r in rows)
    print(f"worst supernet/subnet step ratio: {worst:.3f} (target <= 1.15)")
    if not args.smoke:
        write_json(
            RESULTS / "supernet_step.json",
            {
                "rows": rows,
                "worst_ratio": worst,
                "steps": steps,
                "threads": args.threads,
                "machine": platform.processor() or platform.machine(),
                "torch": torch.__version__,
                "date": time.strftime("%Y-%m-%d"),
            },
        )


if __name__ == "__main__":
    main()

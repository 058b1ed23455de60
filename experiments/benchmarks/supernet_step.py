"""Supernet step versus extracted-subnet step at the same ranks (target: ratio <= 1.15).

One training step (forward, cross-entropy, backward, flora-ray's AdamW step) of the supernet with ``set_ranks(config)`` is
timed against the same step of ``extract_subnet(supernet, config)``, for several configurations, as the median of
repeated runs after warm-up. Prints a table and writes ``results/supernet_step.json``.

    .venv/bin/python experiments/benchmarks/supernet_step.py            # full run (a few minutes on 2 CPU cores)
    .venv/bin/python experiments/benchmarks/supernet_step.py --smoke    # seconds, writes runs/bench-smoke/
"""

from __future__ import annotations

import random

import torch
from harness import bench_parser, environment, write_result
from harness_workloads import STEP_WORKLOADS, configs_for, interleaved_step_times

import flora_ray as fr


def main() -> None:
    parser = bench_parser(__doc__, smoke={"steps": 3}, smoke_help="a few steps of the small workload only")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    steps, warmup = args.steps, 1 if args.smoke else 3
    workloads = {"quickstart-vit": STEP_WORKLOADS["quickstart-vit"]} if args.smoke else STEP_WORKLOADS
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
    result = {"smoke": args.smoke, "rows": rows, "worst_ratio": worst, "steps": steps, **environment(args.threads)}
    print(f"wrote {write_result(args.output / 'supernet_step.json', result)}")


if __name__ == "__main__":
    main()

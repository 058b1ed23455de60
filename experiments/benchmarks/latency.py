"""Latency: measured CPU latency of exported subnets versus the dense model, against their MAC ratio.

For the quickstart model (Fashion-MNIST geometry), DeiT-Ti and DeiT-S at 224 px, subnets (every uniform ratio that
saves MACs, and random configurations) are exported with ``save_subnet`` and reloaded with ``load_subnet``, as a
user would, and timed against the dense timm model at batch 1 and 32 with ``core.timing.forward_ms`` (threads
pinned, warm-up, median of many forward passes, one pass of each model in turn so that load drifts hit them
alike). Target: latency ratio <= 1.25 x MAC ratio for subnets that save at least 30% of the MACs. Where it
misses, a profile of one forward pass splits the time into matrix products and the rest (norms, softmax, GELU,
reshapes), which do not shrink with the ranks. Weights are random (latency does not depend on them). Prints a
table, writes ``results/latency.json``.

    .venv/bin/python experiments/benchmarks/latency.py            # full run (about 5 minutes on 2 CPU cores)
    .venv/bin/python experiments/benchmarks/latency.py --smoke    # quickstart model only, seconds
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from harness import bench_parser, environment, write_result
from harness_workloads import latency_workloads
from torch import nn
from torch.profiler import ProfilerActivity, profile

import flora_ray as fr
from flora_ray.core.timing import forward_ms

TARGET_RATIO = 1.25  # latency ratio / MAC ratio
TARGET_MIN_SAVING = 0.30  # the target applies to subnets saving at least this share of the MACs
# Ops whose work the MACs count: Linear layers, the patch-embedding convolution, attention (timm's fused
# scaled_dot_product_attention on CPU, or the bmm products of unfused attention).
MATMUL_OPS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm", "aten::mkldnn_convolution", "aten::_convolution")


def is_matmul(op: str) -> bool:
    return op in MATMUL_OPS or "scaled_dot_product" in op


def subnet_configs(space: fr.RankSpace, n_random: int, cost: fr.CostModel) -> dict[str, dict]:
    """Uniform configurations that save MACs (the full-rank one is charged dense) and random ones."""
    configs = {
        f"uniform {ratio:.2f}": config
        for ratio, config in space.uniform_configs().items()
        if cost.macs(config) < cost.dense_macs
    }
    rng = random.Random(0)
    for i in range(n_random):
        configs[f"random {i}"] = space.from_block_tuples([rng.choice(b.candidates) for b in space.blocks])
    return configs


def interleaved_latency_ms(models: dict[str, nn.Module], x: torch.Tensor, budget_s: float, min_runs: int) -> dict:
    """Median (and fastest) latency of each model, timed one forward pass at a time in turn (A, B, C, A, B, C, ...)
    with ``forward_ms`` so that load changes on a shared machine hit every model alike, after one untimed pass
    each; as many rounds as fit in ``budget_s`` (at least ``min_runs``, at most 50)."""
    first = {name: forward_ms(m, x, runs=1, warmup=0) for name, m in models.items()}  # warm-up and estimate
    rounds = max(min_runs, min(50, int(budget_s * 1e3 / sum(first.values()))))
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            times[name].append(forward_ms(model, x, runs=1, warmup=0))
    return {name: {"ms": statistics.median(v), "min_ms": min(v), "runs": rounds} for name, v in times.items()}


@torch.no_grad()
def time_split_ms(model: nn.Module, x: torch.Tensor, passes: int = 3) -> dict:
    """Self CPU time of one forward pass in matrix products (what MACs count) and in everything else (norms, GELU,
    copies, adds), with the largest of the latter: of ``passes`` profiled passes after a warm-up one, the fastest
    (the least disturbed by other processes)."""
    model.eval()
    model(x)
    splits = []
    for _ in range(passes):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(x)
        self_ms = {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}
        matmul = sum(ms for op, ms in self_ms.items() if is_matmul(op))
        other = {op: ms for op, ms in self_ms.items() if not is_matmul(op)}
        top = dict(sorted(other.items(), key=lambda item: -item[1])[:4])
        splits.append({"matmul_ms": matmul, "other_ms": sum(other.values()), "other_top_ms": top})
    return min(splits, key=lambda split: split["matmul_ms"] + split["other_ms"])


def export_and_load(supernet: fr.Supernet, config: dict[str, int], directory: Path) -> nn.Module:
    """The subnet as a user gets it: exported to disk and loaded back."""
    fr.save_subnet(supernet, config, directory)
    return fr.load_subnet(directory)


def measure_workload(label: str, name: str, kwargs: dict, ratios, args) -> list[dict]:
    """One row per (subnet, batch size), plus the dense model's latency in each row."""
    dense = fr.create_model(name, **kwargs).eval()
    supernet = fr.build_supernet(name, model_kwargs=kwargs, ratios=ratios)
    cost = supernet.cost
    configs = subnet_configs(supernet.space, args.random, cost)
    with tempfile.TemporaryDirectory() as tmp:
        models = {"dense": dense}
        for i, (config_label, config) in enumerate(configs.items()):
            models[config_label] = export_and_load(supernet, config, Path(tmp) / str(i))
    height, width = dense.patch_embed.img_size
    rows = []
    for batch in args.batches:
        x = torch.randn(batch, dense.patch_embed.proj.in_channels, height, width)
        timed = interleaved_latency_ms(models, x, args.budget, args.min_runs)
        for config_label, config in configs.items():
            mac_ratio = cost.macs(config) / cost.dense_macs
            latency_ratio = timed[config_label]["ms"] / timed["dense"]["ms"]
            rows.append(
                {
                    "workload": label,
                    "config": config_label,
                    "batch": batch,
                    "gmacs_per_image": cost.macs(config) / 1e9,
                    "dense_gmacs_per_image": cost.dense_macs / 1e9,
                    "mac_ratio": mac_ratio,
                    "subnet_ms": timed[config_label]["ms"],
                    "dense_ms": timed["dense"]["ms"],
                    "runs": timed[config_label]["runs"],
                    "latency_ratio": latency_ratio,
                    "latency_over_mac_ratio": latency_ratio / mac_ratio,
                    # The fastest pass of each is the least disturbed by other processes on a shared machine.
                    "subnet_min_ms": timed[config_label]["min_ms"],
                    "dense_min_ms": timed["dense"]["min_ms"],
                    "min_latency_over_mac_ratio": timed[config_label]["min_ms"] / timed["dense"]["min_ms"] / mac_ratio,
                    "target_applies": 1 - mac_ratio >= TARGET_MIN_SAVING,
                    "target_met": latency_ratio / mac_ratio <= TARGET_RATIO,
                }
            )
            print_row(rows[-1])
    return rows


def split_rows(label: str, name: str, kwargs: dict, ratios, batches: list[int]) -> list[dict]:
    """Matrix-product versus other time of the dense model and the smallest uniform subnet at each batch size."""
    supernet = fr.build_supernet(name, model_kwargs=kwargs, ratios=ratios)
    smallest_ratio = min(supernet.space.uniform_configs())
    config = supernet.space.uniform_configs()[smallest_ratio]
    dense = fr.create_model(name, **kwargs)
    subnet = fr.extract_subnet(supernet, config)
    height, width = dense.patch_embed.img_size
    rows = []
    for batch in batches:
        x = torch.randn(batch, dense.patch_embed.proj.in_channels, height, width)
        for config_label, model, macs in (
            ("dense", dense, supernet.cost.dense_macs),
            (f"uniform {smallest_ratio:.2f}", subnet, supernet.cost.macs(config)),
        ):
            split = time_split_ms(model, x)
            total = split["matmul_ms"] + split["other_ms"]
            rows.append(
                {
                    "workload": label,
                    "config": config_label,
                    "batch": batch,
                    "mac_ratio": macs / supernet.cost.dense_macs,
                    **split,
                    "matmul_share": split["matmul_ms"] / total,
                    "matmul_gmacs_per_s": macs * batch / 1e9 / (split["matmul_ms"] / 1e3),
                }
            )
            print_split(rows[-1])
    return rows


def print_split(r: dict) -> None:
    top = ", ".join(f"{op.removeprefix('aten::')} {ms:.1f}" for op, ms in r["other_top_ms"].items())
    print(
        f"  profile {r['workload']:<15} {r['config']:<13} batch {r['batch']:>2}: matrix products "
        f"{r['matmul_ms']:8.1f} ms ({r['matmul_gmacs_per_s']:.1f} GMAC/s), other {r['other_ms']:7.1f} ms "
        f"({100 * (1 - r['matmul_share']):.0f}%; {top})",
        flush=True,
    )


def print_row(r: dict) -> None:
    print(
        f"{r['workload']:<15} {r['config']:<13} batch {r['batch']:>2}  MAC ratio {r['mac_ratio']:.3f}  "
        f"subnet {r['subnet_ms']:9.2f} ms  dense {r['dense_ms']:9.2f} ms  latency ratio {r['latency_ratio']:.3f}  "
        f"latency/MAC {r['latency_over_mac_ratio']:.3f} (fastest passes {r['min_latency_over_mac_ratio']:.3f})"
        f"{'' if r['target_applies'] else '  (saves < 30%)'}",
        flush=True,
    )


def summarize(rows: list[dict]) -> dict:
    """The target verdict over the rows it applies to, per workload and batch size."""
    applies = [r for r in rows if r["target_applies"]]
    groups: dict[str, list[float]] = {}
    for r in applies:
        groups.setdefault(f"{r['workload']} batch {r['batch']}", []).append(r["latency_over_mac_ratio"])
    return {
        "target": f"latency ratio <= {TARGET_RATIO} x MAC ratio where MACs saved >= {100 * TARGET_MIN_SAVING:.0f}%",
        "rows_target_applies": len(applies),
        "rows_target_met": sum(r["target_met"] for r in applies),
        "worst_latency_over_mac_ratio": max((r["latency_over_mac_ratio"] for r in applies), default=None),
        "worst_by_group": {k: max(v) for k, v in groups.items()},
        "worst_min_latency_over_mac_ratio": max((r["min_latency_over_mac_ratio"] for r in applies), default=None),
    }


def main() -> None:
    parser = bench_parser(
        __doc__, smoke={"random": 1, "min_runs": 3, "budget": 1.0}, smoke_help="quickstart model, small budget, seconds"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (pinned)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--random", type=int, default=2, help="random configurations per model")
    parser.add_argument("--min-runs", type=int, default=5, help="timed passes per model at least")
    parser.add_argument("--budget", type=float, default=30.0, help="timing seconds per workload and batch size")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    env_before = environment(args.threads)
    started = time.perf_counter()
    rows, splits = [], []
    for label, (name, kwargs, ratios) in latency_workloads(args.smoke).items():
        rows += measure_workload(label, name, kwargs, ratios, args)
        splits += split_rows(label, name, kwargs, ratios, args.batches)
    summary = {**summarize(rows), "seconds": time.perf_counter() - started}
    print(
        f"target {summary['target']}: met by {summary['rows_target_met']} of {summary['rows_target_applies']} "
        f"rows; worst latency/MAC ratio {summary['worst_latency_over_mac_ratio']}"
    )
    for group, worst in summary["worst_by_group"].items():
        print(f"  {group:<28} worst latency/MAC {worst:.3f}")
    result = {
        "smoke": args.smoke,
        "rows": rows,
        "profile": splits,
        "summary": summary,
        "batches": args.batches,
        "min_runs": args.min_runs,
        "budget_s": args.budget,
        **environment(args.threads),
        "loadavg_before": env_before["loadavg"],
    }
    print(f"wrote {write_result(args.output / 'latency.json', result)}")


if __name__ == "__main__":
    main()

"""Cost parity: analytic MACs versus torch.utils.flop_counter on extracted subnets, and versus published dense costs.

For DeiT-Ti/S/B and Swin-T/S/B at 224 px, the dense timm model and subnets extracted from its SVD supernet (every
uniform ratio of the space and random configurations) are run once under ``FlopCounterMode``; the analytic count
(``supernet.cost.macs``) must equal the counted one (flops / 2) in total and layer by layer (target: zero
difference), and the analytic dense cost must be within 1% of the published figure. Counting runs on the ``meta``
device (shapes only, no arithmetic); a cross-check counts the dense model and one random subnet of every model
again with real CPU tensors. Weights are random (cost does not depend on them). Prints a table, writes
``results/cost_parity.json``.

    .venv/bin/python experiments/benchmarks/cost_parity.py            # full run (about 2 minutes on 2 CPU cores)
    .venv/bin/python experiments/benchmarks/cost_parity.py --smoke    # tiny models, seconds
"""

from __future__ import annotations

import os

os.environ["TIMM_FUSED_ATTN"] = "0"  # FlopCounterMode does not see fused CPU attention; must precede timm's import

import random
import time

import torch
from harness import bench_parser, environment, write_result
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import flora_ray as fr
from flora_ray.core.cost import CostModel, build_cost_model

# name: (timm model, kwargs, published dense GMACs)
MODELS = {
    "DeiT-Ti": ("deit_tiny_patch16_224", {}, 1.3),
    "DeiT-S": ("deit_small_patch16_224", {}, 4.6),
    "DeiT-B": ("deit_base_patch16_224", {}, 17.6),
    "Swin-T": ("swin_tiny_patch4_window7_224", {}, 4.5),
    "Swin-S": ("swin_small_patch4_window7_224", {}, 8.7),
    "Swin-B": ("swin_base_patch4_window7_224", {}, 15.4),
}
# Smoke mode: small models of both families (the Swin one pads its windows), counted with real tensors too.
SMOKE_MODELS = {
    "test_vit-64": ("test_vit", {"img_size": 64}, None),
    "swin-mini-72": (
        "swin_tiny_patch4_window7_224",
        {"img_size": 72, "embed_dim": 32, "depths": (2, 2), "num_heads": (2, 4), "window_size": 4},
        None,
    ),
}


def counted_macs(model: nn.Module, x: torch.Tensor) -> tuple[int, dict[str, int]]:
    """Total MACs (flops / 2) of one forward pass under FlopCounterMode, and MACs per module FQN."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    root = type(model).__name__
    per_module = {
        name.removeprefix(f"{root}."): sum(ops.values()) // 2
        for name, ops in counter.get_flop_counts().items()
        if name.startswith(f"{root}.")
    }
    return counter.get_total_flops() // 2, per_module


def compare(model: nn.Module, cost: CostModel, ranks: dict[str, int], device: str) -> dict:
    """Analytic versus counted MACs (total, per Linear layer, the rest) and parameters of one model."""
    height, width = model.patch_embed.img_size
    x = torch.randn(1, model.patch_embed.proj.in_channels, height, width, device=device)
    total, per_module = counted_macs(model, x)
    layer_diffs = [per_module.get(fqn, 0) - cost.layer_macs(fqn, ranks.get(fqn)) for fqn in cost.sites]
    counted_linear = sum(per_module.get(fqn, 0) for fqn in cost.sites)
    analytic = cost.macs(ranks)
    return {
        "analytic_macs": analytic,
        "counted_macs": total,
        "diff_macs": total - analytic,
        "max_abs_layer_diff_macs": max(abs(d) for d in layer_diffs),
        "other_diff_macs": (total - counted_linear) - cost.other_macs,
        "analytic_params": cost.params(ranks),
        "counted_params": sum(p.numel() for p in model.parameters()),
    }


def configs_for(space: fr.RankSpace, n_random: int, rng: random.Random) -> dict[str, dict[str, int]]:
    """Every uniform configuration of the space plus ``n_random`` random ones from its block candidates."""
    configs = {f"uniform {ratio:.3f}": config for ratio, config in space.uniform_configs().items()}
    for i in range(n_random):
        configs[f"random {i}"] = space.from_block_tuples([rng.choice(b.candidates) for b in space.blocks])
    return configs


def parity_rows(label: str, name: str, kwargs: dict, device: str, n_random: int) -> list[dict]:
    """Dense model and extracted subnets of one model on ``device``, one row each."""
    dense = fr.create_model(name, device=device, **kwargs)
    rows = [
        {"model": label, "device": device, "config": "dense", **compare(dense, build_cost_model(dense), {}, device)}
    ]
    supernet = fr.build_supernet(name, model_kwargs=kwargs, device=device)
    for config_label, config in configs_for(supernet.space, n_random, random.Random(0)).items():
        subnet = fr.extract_subnet(supernet, config)
        rows.append(
            {"model": label, "device": device, "config": config_label, **compare(subnet, supernet.cost, config, device)}
        )
    return rows


def cross_check_rows(label: str, name: str, kwargs: dict) -> list[dict]:
    """The dense model and the first random subnet counted with real CPU tensors."""
    dense = fr.create_model(name, **kwargs)
    rows = [{"model": label, "device": "cpu", "config": "dense", **compare(dense, build_cost_model(dense), {}, "cpu")}]
    supernet = fr.build_supernet(name, model_kwargs=kwargs)
    config = configs_for(supernet.space, 1, random.Random(0))["random 0"]
    subnet = fr.extract_subnet(supernet, config)
    rows.append(
        {"model": label, "device": "cpu", "config": "random 0", **compare(subnet, supernet.cost, config, "cpu")}
    )
    return rows


def published_rows(models: dict) -> list[dict]:
    """Analytic dense GMACs (meta device) against the published figure of each model."""
    rows = []
    for label, (name, kwargs, published) in models.items():
        gmacs = build_cost_model(fr.create_model(name, device="meta", **kwargs)).dense_macs / 1e9
        rel = (gmacs - published) / published
        rows.append(
            {
                "model": label,
                "analytic_gmacs": gmacs,
                "published_gmacs": published,
                "rel_diff": rel,
                "within_1pct": abs(rel) <= 0.01,
                # The published figures carry one decimal: agreement at that precision.
                "within_published_rounding": round(gmacs, 1) == published,
            }
        )
    return rows


def print_tables(rows: list[dict], published: list[dict]) -> None:
    print(
        f"{'model':<13} {'device':<5} {'config':<14} {'analytic GMACs':>14} {'counted GMACs':>14} {'diff':>6} "
        f"{'max layer diff':>14} {'params diff':>11}"
    )
    for r in rows:
        print(
            f"{r['model']:<13} {r['device']:<5} {r['config']:<14} {r['analytic_macs'] / 1e9:>14.6f} "
            f"{r['counted_macs'] / 1e9:>14.6f} {r['diff_macs']:>6d} {r['max_abs_layer_diff_macs']:>14d} "
            f"{r['counted_params'] - r['analytic_params']:>11d}",
            flush=True,
        )
    print(f"\n{'model':<8} {'analytic GMACs':>14} {'published':>9} {'difference':>10}  within 1%  within rounding")
    for p in published:
        print(
            f"{p['model']:<8} {p['analytic_gmacs']:>14.3f} {p['published_gmacs']:>9.1f} {100 * p['rel_diff']:>9.2f}%"
            f"  {p['within_1pct']!s:<9}  {p['within_published_rounding']}"
        )


def main() -> None:
    parser = bench_parser(__doc__, smoke={"random": 2}, smoke_help="tiny models only (meta and real tensors), seconds")
    parser.add_argument("--random", type=int, default=3, help="random configurations per model")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (counting does not need more)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    loadavg_before = list(os.getloadavg())
    started = time.perf_counter()
    models = SMOKE_MODELS if args.smoke else MODELS
    rows = []
    for label, (name, kwargs, _) in models.items():
        rows += parity_rows(label, name, kwargs, "meta", args.random)
    for label, (name, kwargs, _) in models.items():
        rows += cross_check_rows(label, name, kwargs)
    published = published_rows(MODELS)
    print_tables(rows, published)
    summary = {
        "configs_counted": len(rows),
        "max_abs_diff_macs": max(abs(r["diff_macs"]) for r in rows),
        "max_abs_layer_diff_macs": max(r["max_abs_layer_diff_macs"] for r in rows),
        "max_abs_params_diff": max(abs(r["counted_params"] - r["analytic_params"]) for r in rows),
        "max_abs_published_rel_diff": max(abs(p["rel_diff"]) for p in published),
        "published_within_1pct": [p["model"] for p in published if p["within_1pct"]],
        "published_missed_1pct": [p["model"] for p in published if not p["within_1pct"]],
        "seconds": time.perf_counter() - started,
    }
    print(
        f"\n{summary['configs_counted']} counted models: max |analytic - counted| = {summary['max_abs_diff_macs']} MACs "
        f"(per layer {summary['max_abs_layer_diff_macs']}); published dense within 1%: "
        f"{', '.join(summary['published_within_1pct'])}; missed: {', '.join(summary['published_missed_1pct']) or 'none'}"
    )
    result = {
        "smoke": args.smoke,
        "rows": rows,
        "published": published,
        "summary": summary,
        **environment(),
        "loadavg_before": loadavg_before,
    }
    print(f"wrote {write_result(args.output / 'cost_parity.json', result)}")


if __name__ == "__main__":
    main()

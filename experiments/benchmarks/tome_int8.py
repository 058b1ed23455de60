"""Token merging and int8 against the fp32 FLORA export: MACs and measured CPU latency of DeiT-Ti, orthogonally.

For DeiT-Ti at 224 px (random weights: neither MACs nor latency depend on them) the dense model and the uniform
ratio-0.5 FLORA subnet are built with ToMe at ``r`` in ``R_VALUES`` (``model.tome_r``; the ToMe paper's r = 8 and
13), exported as ``flora-ray export`` does, and timed fp32 and int8 (``--format int8``: ``core.quantize``) with the
export's timer (``core.timing.forward_ms``: a median), one thread, at batch 1 and 8, in ``ROUNDS`` interleaved
rounds of which the fastest median is kept (on a shared core, the round least disturbed by other work). MACs come
from the cost model
(``build_cost_model``, FlopCounterMode-exact with token merging). Prints a table, writes ``results/tome_int8.json``.

    .venv/bin/python experiments/benchmarks/tome_int8.py            # DeiT-Ti (about 3 minutes on one core)
    .venv/bin/python experiments/benchmarks/tome_int8.py --smoke    # test_vit at 64 px, seconds
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from harness import bench_parser, environment, write_result
from torch import nn

import flora_ray as fr
from flora_ray.core.cost import build_cost_model
from flora_ray.core.quantize import save_int8
from flora_ray.core.timing import forward_ms

MODEL, KWARGS, R_VALUES, BATCHES = "deit_tiny_patch16_224", {}, (0, 8, 13), (1, 8)
ROUNDS, RUNS = 4, 6
SMOKE = ("test_vit", {"img_size": 64}, (0, 2), (1, 2))


def build(name: str, kwargs: dict, r: int, tmp: str) -> dict[tuple, tuple[nn.Module, int]]:
    """``(r, form, precision) -> (model, MACs)``: the dense model and its ratio-0.5 subnet, fp32 and int8."""
    torch.manual_seed(0)
    supernet = fr.build_supernet(name, model_kwargs=kwargs, tome_r=r).eval()
    ranks = supernet.space.uniform_configs()[0.5]
    fr.save_subnet(supernet, ranks, Path(tmp, f"r{r}"))
    subnet, dense = fr.load_subnet(Path(tmp, f"r{r}")), supernet.spec.create().eval()
    macs = {"dense": build_cost_model(dense).dense_macs, "subnet": supernet.cost.macs(ranks)}
    models = {}
    for form, model in (("dense", dense), ("subnet", subnet)):
        models[r, form, "fp32"] = (model, macs[form])
        models[r, form, "int8"] = (save_int8(model, Path(tmp, f"r{r}", f"{form}.int8.safetensors")), macs[form])
    return models


def measure(models: dict, img_size: tuple[int, int], batches: tuple[int, ...], rounds: int, runs: int) -> list[dict]:
    """One row per model and batch; every model is timed once per round, all rounds interleaved, so that load
    from other work on the core falls on every model alike; the fastest round's median is kept."""
    rows = []
    for batch in batches:
        x = torch.randn(batch, 3, *img_size)
        timed = dict.fromkeys(models, float("inf"))
        for _ in range(rounds):
            for key, (model, _) in models.items():
                timed[key] = min(timed[key], forward_ms(model, x, runs=runs, warmup=2))
        rows += [{"tome_r": r, "form": form, "precision": precision, "batch": batch, "macs": models[r, form,
                  precision][1], "ms": ms} for (r, form, precision), ms in timed.items()]  # fmt: skip
    return rows


def main() -> None:
    parser = bench_parser(__doc__, smoke_help="test_vit at 64 px: seconds")
    args = parser.parse_args()
    torch.set_num_threads(1)
    name, kwargs, r_values, batches = SMOKE if args.smoke else (MODEL, KWARGS, R_VALUES, BATCHES)
    rounds, runs = (1, 3) if args.smoke else (ROUNDS, RUNS)
    with tempfile.TemporaryDirectory() as tmp:
        models = {key: value for r in r_values for key, value in build(name, kwargs, r, tmp).items()}
        img_size = next(iter(models.values()))[0].patch_embed.img_size
        rows = measure(models, img_size, batches, rounds, runs)
    base = {(row["form"], row["batch"]): row["ms"] for row in rows if row["tome_r"] == 0 and row["precision"] == "fp32"}
    print(f"{name}, 1 thread: median ms per forward (speed-up over the same form, fp32, no merging)")
    for row in rows:
        row["speedup"] = base[row["form"], row["batch"]] / row["ms"]
        print(f"  r={row['tome_r']:>2} {row['form']:>6} {row['precision']} batch {row['batch']}: "
              f"{row['macs'] / 1e6:8.1f} MMACs {row['ms']:8.2f} ms  x{row['speedup']:.2f}")  # fmt: skip
    result = {**environment(1), "smoke": args.smoke, "model": name, "rounds": rounds, "runs": runs, "rows": rows}
    print(f"wrote {write_result(args.output / 'tome_int8.json', result)}")


if __name__ == "__main__":
    main()

"""Latency predictor: the latency table's prediction against the measured latency of exported subnets.

For the quickstart model (Fashion-MNIST geometry), DeiT-Ti and DeiT-S at 224 px, at batch 1 and a larger batch,
on this CPU: the latency table is measured in this process with ``stages.profile.profile_task`` (the items
``flora-ray profile`` measures: each layer form, the rest of the model, and the calibration models: dense, every
uniform and 4 random configurations of seed 0), and ``core.latency.LatencyModel`` is built from it (sum of the
layers plus the rest, calibrated by an offset or an affine map, whichever has the lower leave-one-out error).
The validation set is every uniform configuration plus ``--random`` random ones of another seed (held out from
the calibration), each exported with ``save_subnet`` and reloaded with ``load_subnet`` as a user would, and timed
with ``core.timing.time_ms`` (the table's own timing routine, same threads and ``min_run_time``).

Timing on a shared machine: ``--rounds`` rounds, each timing every validation subnet (every other round in reverse
order), the first ``--table-rounds`` of them preceded by a measurement of the whole table, so that a slow spell
hits the table and the validation alike; an item's or subnet's latency is the ``--statistic`` of its rounds
(default ``min``: the least disturbed round; ``--table-rounds 1 --statistic median`` is one profile, as
``flora-ray profile`` measures it). Weights are random (latency does not depend on them).

Per setting: MAPE and worst absolute % error of the prediction, Kendall tau between predicted and measured, the
same for the uncalibrated sum, the calibration's kind and leave-one-out error, the spread of measured latencies,
and the noise: how much a subnet's rounds differ, the Kendall tau of one round against another (the most a
predictor can reach when the spread is within noise), how much a table item's rounds differ, and the validation
timing of the uniform subnets over the table's own row of them (drift). Targets: MAPE <= 5% and tau >= 0.9.
Prints a table, writes ``results/latency_predictor.json``.

    .venv/bin/python experiments/benchmarks/latency_predictor.py          # full run (about 30 minutes, 1 core)
    .venv/bin/python experiments/benchmarks/latency_predictor.py --smoke  # quickstart model, batch 1 and 4
"""

from __future__ import annotations

import math
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from harness import bench_parser, environment, write_result
from harness_workloads import latency_workloads
from scipy.stats import kendalltau
from torch import nn

import flora_ray as fr
from flora_ray.core.latency import LatencyModel, calibration_configs, profile_items
from flora_ray.core.timing import time_ms, torch_threads
from flora_ray.stages.profile import model_input, profile_task

TARGET_MAPE = 0.05
TARGET_TAU = 0.9
VALIDATION_SEED = 1  # calibration_configs draws its random configurations with seed 0
STATISTICS = {"median": statistics.median, "min": min}
RESOLVED_GAP = 0.05  # pairs of subnets whose measured latencies differ by more than this share: see resolved_tau


def validation_configs(space: fr.RankSpace, n_random: int, seed: int) -> dict[str, dict[str, int]]:
    """Every uniform configuration and ``n_random`` seeded random ones (label: ranks)."""
    configs = {f"uniform {ratio:.3g}": ranks for ratio, ranks in space.uniform_all().items()}
    rng = random.Random(seed)
    for i in range(n_random):
        configs[f"random {i}"] = space.from_block_tuples([rng.choice(b.candidates) for b in space.blocks])
    return configs


def export_and_load(supernet: fr.Supernet, configs: dict[str, dict], directory: Path) -> dict[str, nn.Module]:
    """Each configuration as a user gets it: exported with ``save_subnet``, loaded back with ``load_subnet``."""
    models = {}
    for i, (label, ranks) in enumerate(configs.items()):
        fr.save_subnet(supernet, ranks, directory / str(i))
        models[label] = fr.load_subnet(directory / str(i)).eval()
    return models


@torch.no_grad()
def time_round(models: dict[str, nn.Module], x: torch.Tensor, args, reverse: bool) -> dict[str, tuple[float, float]]:
    """``(ms, iqr ms)`` of each model by ``time_ms``, one model after the other (in reverse order if asked)."""
    out = {}
    with torch_threads(args.threads):
        for label in reversed(models) if reverse else models:
            model = models[label]
            out[label] = time_ms(lambda model=model: model(x), args.threads, args.min_run_time)[:2]
    return out


def measure_setting(supernet: fr.Supernet, models: dict, batch: int, args) -> tuple[list[dict], dict, dict]:
    """``args.rounds`` rounds, each timing every validation model (every other round in reverse order), the first
    ``args.table_rounds`` of them preceded by a measurement of the whole latency table (``profile_task``), so that
    a slow spell of the machine hits the table and the validation alike. Returns the table (each item's ``ms``
    combined over its rounds by ``args.statistic``), the device and the validation timings."""
    space, cost = supernet.space, supernet.cost
    items = profile_items(space, cost, calibration_configs(space))
    settings = {"device": "cpu", "dtype": "float32", "threads": args.threads, "min_run_time": args.min_run_time}
    x = model_input(next(iter(models.values())), supernet.spec, batch, torch.device("cpu"), torch.float32)
    tables, runs, device = [], {label: [] for label in models}, {}
    for r in range(args.rounds):
        if r < args.table_rounds:
            rows, device = profile_task(supernet.spec.to_dict(), space.to_dict(), items, batch, settings)
            tables.append(rows)
        for label, timing in time_round(models, x, args, reverse=r % 2 == 1).items():
            runs[label].append(timing)
    combine = STATISTICS[args.statistic]
    table = [
        {**rows[0], "ms": combine(r["ms"] for r in rows), "rounds_ms": [r["ms"] for r in rows],
         "iqr_ms": statistics.median(r["iqr_ms"] for r in rows)}
        for rows in zip(*tables, strict=True)
    ]  # fmt: skip
    measured = {
        label: {"ms": combine(ms for ms, _ in v), "rounds_ms": [ms for ms, _ in v],
                "iqr_rel": statistics.median(iqr / ms for ms, iqr in v)}
        for label, v in runs.items()
    }  # fmt: skip
    return table, device, measured


def errors(predicted: np.ndarray, measured: np.ndarray) -> dict[str, float]:
    """MAPE, worst absolute % error, mean signed % error and Kendall tau of ``predicted`` against ``measured``."""
    rel = (predicted - measured) / measured
    tau = kendalltau(predicted, measured).statistic if len(measured) > 1 else float("nan")
    return {
        "mape": float(np.mean(np.abs(rel))),
        "max_abs_pct_error": float(100 * np.max(np.abs(rel))),
        "mean_signed_pct_error": float(100 * np.mean(rel)),
        "kendall_tau": float(tau),
    }


def resolved_tau(predicted: np.ndarray, measured: np.ndarray, min_gap: float = RESOLVED_GAP) -> dict[str, float]:
    """Kendall tau (concordant minus discordant over all, no ties) over the pairs of subnets whose measured
    latencies differ by more than ``min_gap`` (relative): how well the prediction ranks what the measurement can
    tell apart."""
    concordant = discordant = 0
    for i in range(len(measured)):
        for j in range(i + 1, len(measured)):
            if abs(measured[i] - measured[j]) > min_gap * min(measured[i], measured[j]):
                same = np.sign(predicted[i] - predicted[j]) == np.sign(measured[i] - measured[j])
                concordant, discordant = concordant + same, discordant + (not same)
    pairs = concordant + discordant
    tau = (concordant - discordant) / pairs if pairs else math.nan
    return {"min_gap": min_gap, "pairs": int(pairs), "all_pairs": len(measured) * (len(measured) - 1) // 2, "tau": tau}


def noise(measured: dict[str, dict]) -> dict[str, float]:
    """How repeatable the measurement is: the relative difference of a model's rounds (median over models), the
    median relative IQR of the blocks, and Kendall tau of the first round against the second."""
    rounds = [v["rounds_ms"] for v in measured.values()]
    out = {"median_iqr_rel": float(statistics.median(v["iqr_rel"] for v in measured.values()))}
    if len(rounds[0]) >= 2:
        out["median_round_diff_rel"] = float(
            statistics.median((max(r) - min(r)) / statistics.median(r) for r in rounds)
        )
        out["round_vs_round_tau"] = float(kendalltau([r[0] for r in rounds], [r[1] for r in rounds]).statistic)
    return out


def table_noise(table: list[dict]) -> float:
    """How much an item's measurements differ between table rounds: the median over items of (max - min) /
    median (NaN with one table round)."""
    spreads = [(max(r["rounds_ms"]) - min(r["rounds_ms"])) / statistics.median(r["rounds_ms"]) for r in table]
    return float(statistics.median(spreads)) if len(table[0]["rounds_ms"]) > 1 else math.nan


def hindsight_affine(raw: np.ndarray, measured: np.ndarray) -> dict[str, float]:
    """The best affine map of the raw sum fitted on the validation set itself: what any scale-and-offset
    calibration of this sum could reach at most (a bound, not a prediction)."""
    scale, offset = np.polyfit(raw, measured, 1) if np.ptp(raw) > 0 else (1.0, float(np.median(measured - raw)))
    return {"scale": float(scale), "offset_ms": float(offset), **errors(scale * raw + offset, measured)}


def evaluate(predictor: LatencyModel, configs: dict, measured: dict, calibration: dict) -> tuple[dict, list[dict]]:
    """The setting's summary and one row per validation subnet."""
    labels = list(configs)
    meas = np.array([measured[label]["ms"] for label in labels])
    raw = np.array([predictor.raw_ms(configs[label]) for label in labels])
    pred = np.array([predictor.predict(configs[label]) for label in labels])
    held = np.array([label.startswith("random") for label in labels])
    calibration_labels = {json_key(ranks) for ranks in calibration.values()}
    summary = {
        "subnets": len(labels),
        "random_subnets": int(held.sum()),
        "random_also_in_calibration": sum(
            json_key(configs[lb]) in calibration_labels for lb in labels if lb.startswith("random")
        ),
        **errors(pred, meas),
        "held_out": errors(pred[held], meas[held]) if held.sum() > 1 else {},
        "raw": errors(raw, meas),
        "resolved": resolved_tau(pred, meas),
        "hindsight_affine": hindsight_affine(raw, meas),
        "calibration": calibration_summary(predictor),
        "measured_min_ms": float(meas.min()),
        "measured_max_ms": float(meas.max()),
        "spread_rel": float(meas.max() / meas.min() - 1),
        "noise": noise(measured),
        "validation_over_table": drift(predictor, calibration, configs, measured),
    }
    subnets = [
        {"config": label, "measured_ms": float(m), "rounds_ms": measured[label]["rounds_ms"],
         "iqr_rel": measured[label]["iqr_rel"], "raw_ms": float(r), "predicted_ms": float(p),
         "pct_error": float(100 * (p - m) / m)}
        for label, m, r, p in zip(labels, meas, raw, pred, strict=True)
    ]  # fmt: skip
    return summary, subnets


def drift(predictor: LatencyModel, calibration: dict, configs: dict, measured: dict) -> dict[str, float]:
    """Measured latency of the configurations in both sets (the uniform ones) in the validation timing over the
    table's ``model`` row of the same configuration: the machine's drift between the two measurements plus any
    difference of the exported subnet from the profile's stand-in (same forms, random weights)."""
    table_ms = {p["label"]: p["measured_ms"] for p in predictor.fit.get("points", [])}
    by_key = {json_key(ranks): table_ms[label] for label, ranks in calibration.items() if label in table_ms}
    ratios = [measured[lb]["ms"] / by_key[json_key(r)] for lb, r in configs.items() if json_key(r) in by_key]
    if not ratios:
        return {}
    return {"configs": len(ratios), "median": float(np.median(ratios)), "min": min(ratios), "max": max(ratios)}


def json_key(ranks: dict[str, int]) -> tuple:
    return tuple(sorted(ranks.items()))


def calibration_summary(predictor: LatencyModel) -> dict:
    fit = predictor.fit
    kind = fit.get("kind", "none")
    return {
        "kind": kind,
        "scale": predictor.scale,
        "offset_ms": predictor.offset,
        "leave_one_out_mape": fit.get("leave_one_out_mape", {}),
        "chosen_leave_one_out_mape": fit.get("leave_one_out_mape", {}).get(kind, float("nan")),
        "fit_mape": fit.get("mape", float("nan")),
        "points": fit.get("points", []),
    }


def run_workload(label: str, name: str, kwargs: dict, ratios, batches: list[int], args) -> tuple[list, list, list]:
    """Every batch size of one model: the table, the predictor, the validation timings and their comparison."""
    supernet = fr.build_supernet(name, model_kwargs=kwargs, ratios=ratios)
    configs = validation_configs(supernet.space, args.random, args.seed)
    calibration = calibration_configs(supernet.space)
    rows, subnets, table = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        models = export_and_load(supernet, configs, Path(tmp))
        for batch in args.batches[label]:
            started = time.perf_counter()
            table_rows, device, measured = measure_setting(supernet, models, batch, args)
            predictor = LatencyModel.from_table(pd.DataFrame(table_rows), supernet.space, supernet.cost, batch, device)
            summary, per_subnet = evaluate(predictor, configs, measured, calibration)
            row = {
                "workload": label,
                "model": name,
                "batch": batch,
                **summary,
                "mape_target_met": summary["mape"] <= TARGET_MAPE,
                "tau_target_met": summary["kendall_tau"] >= TARGET_TAU,
                "device": device,
                "table_noise_rel": table_noise(table_rows),
                "seconds": time.perf_counter() - started,
                "loadavg": list(os.getloadavg()),
            }
            rows.append(row)
            subnets += [{"workload": label, "batch": batch, **s} for s in per_subnet]
            table += [{"workload": label, **r} for r in table_rows]
            print_row(row)
    return rows, subnets, table


def print_header() -> None:
    print(
        f"{'model':<15} {'batch':>5} {'n':>3}  {'MAPE %':>6} {'max %':>6} {'tau':>5}  {'raw MAPE %':>10} "
        f"{'raw tau':>7}  {'calib (LOO %)':<17} {'measured ms':>19} {'spread':>7} {'noise %':>7} "
        f"{'tau r/r':>7} {'tbl %':>6} {'drift':>6} {'tau>5%':>6}  targets",
        flush=True,
    )


def print_row(r: dict) -> None:
    calib = r["calibration"]
    met = f"MAPE {'yes' if r['mape_target_met'] else 'NO'}, tau {'yes' if r['tau_target_met'] else 'NO'}"
    span = f"{r['measured_min_ms']:.3g}..{r['measured_max_ms']:.3g}"
    print(
        f"{r['workload']:<15} {r['batch']:>5} {r['subnets']:>3}  {100 * r['mape']:6.2f} {r['max_abs_pct_error']:6.2f} "
        f"{r['kendall_tau']:5.3f}  {100 * r['raw']['mape']:10.2f} {r['raw']['kendall_tau']:7.3f}  "
        f"{calib['kind']:<7} ({100 * calib['chosen_leave_one_out_mape']:5.2f})   {span:>19} "
        f"{100 * r['spread_rel']:6.0f}% {100 * r['noise'].get('median_round_diff_rel', math.nan):7.2f} "
        f"{r['noise'].get('round_vs_round_tau', math.nan):7.3f} {100 * r['table_noise_rel']:6.2f} "
        f"{r['validation_over_table'].get('median', math.nan):6.3f} {r['resolved']['tau']:6.3f}  {met}",
        flush=True,
    )


def summarize(rows: list[dict], seconds: float) -> dict:
    return {
        "targets": f"MAPE <= {100 * TARGET_MAPE:g}% and Kendall tau >= {TARGET_TAU} at every setting",
        "settings": len(rows),
        "mape_met": sum(r["mape_target_met"] for r in rows),
        "tau_met": sum(r["tau_target_met"] for r in rows),
        "all_met": all(r["mape_target_met"] and r["tau_target_met"] for r in rows),
        "worst_mape": max(r["mape"] for r in rows),
        "worst_tau": min(r["kendall_tau"] for r in rows),
        "seconds": seconds,
    }


def parse_args():
    parser = bench_parser(
        __doc__,
        smoke={"min_run_time": 0.02, "random": 6, "rounds": 2, "table_rounds": 2, "quickstart_batches": [1, 4]},
        smoke_help="quickstart model, batch 1 and 4, 6 subnets, seconds",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the table and the timings")
    parser.add_argument("--min-run-time", type=float, default=0.2, help="seconds per time_ms measurement")
    parser.add_argument("--random", type=int, default=30, help="random validation subnets per model")
    parser.add_argument("--seed", type=int, default=VALIDATION_SEED, help="seed of the random validation subnets")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds over the validation subnets")
    parser.add_argument(
        "--table-rounds", type=int, default=3, help="rounds that measure the latency table first (<= --rounds)"
    )
    parser.add_argument(
        "--statistic", choices=sorted(STATISTICS), default="min", help="how an item's or subnet's rounds combine"
    )
    parser.add_argument("--quickstart-batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--deit-batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--only", nargs="+", help="workload labels to run (default: all)")
    args = parser.parse_args()
    if not 1 <= args.table_rounds <= args.rounds:
        parser.error(f"--table-rounds must be between 1 and --rounds ({args.rounds})")
    args.batches = {"quickstart-vit": args.quickstart_batches}
    args.batches.update({"deit-tiny-224": args.deit_batches, "deit-small-224": args.deit_batches})
    return args


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    env_before = environment(args.threads)
    started = time.perf_counter()
    rows, subnets, table = [], [], []
    print_header()
    for label, (name, kwargs, ratios) in latency_workloads(args.smoke).items():
        if args.only and label not in args.only:
            continue
        r, s, t = run_workload(label, name, kwargs, ratios, args.batches[label], args)
        rows, subnets, table = rows + r, subnets + s, table + t
    summary = summarize(rows, time.perf_counter() - started)
    print(
        f"targets ({summary['targets']}): MAPE met at {summary['mape_met']} of {summary['settings']} settings, tau "
        f"at {summary['tau_met']}; worst MAPE {100 * summary['worst_mape']:.2f}%, worst tau "
        f"{summary['worst_tau']:.3f}; {summary['seconds']:.0f} s"
    )
    result = {
        "smoke": args.smoke,
        "settings": {k: v for k, v in vars(args).items() if k not in ("output", "smoke")},
        "rows": rows,
        "subnets": subnets,
        "table": table,
        "summary": summary,
        **environment(args.threads),
        "loadavg_before": env_before["loadavg"],
    }
    print(f"wrote {write_result(args.output / 'latency_predictor.json', result)}")


if __name__ == "__main__":
    main()

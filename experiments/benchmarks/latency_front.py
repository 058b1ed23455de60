"""Latency front: a latency-searched front against a MAC-searched one and uniform ranks, measured after export.

On one trained supernet (the quickstart's by default, prepared by ``harness_runs.prepare_base_run``), the latency
table is profiled (``stages.profile.profile_stage``: ``--batch-sizes``, ``--threads`` threads, ``--min-run-time``)
and the flora-ray search (``stages.search.search_stage`` on the in-process ``LocalBackend``: the same NSGA-II
sampler, anchors and evaluator as ``flora-ray search``) runs from the same supernet once with
``search.objectives=[macs]`` and once per batch size with ``search.objectives=[latency_ms]`` at that batch
(``profile.batch``), each in its own run directory ``runs/bench-<run>-latfront-<axis>`` (teacher, space and
supernet copied from the base run, the latency table copied from the first; reused while the supernet and the
configuration are unchanged). Trials, population, seed and search images are the base run's unless given.

Every front point of every search, every uniform configuration and the dense model are exported
(``save_subnet`` with the supernet's weights, reloaded with ``load_subnet``) and timed at every profiled batch with
``core.timing.time_ms`` (the table's own routine, same threads and ``min_run_time``) in ``--rounds`` rounds over
the whole list, each round in a freshly shuffled order (seeded), so that a drift of the machine's speed spreads
over all models instead of hitting those timed last; a model's latency is the median of its rounds. Accuracy is the
search-split accuracy the search recorded (same images for every point), the dense accuracy the search summary's.
With one thread every timing is repeated right away on the thread's CPU time (``time.thread_time``, the same
blocked median): on a shared machine the wall clock also counts the time the thread waits for a core, the CPU time
does not (cache and memory-bandwidth contention still count), so ``cpu_ms`` is the steadier of the two there; the
table itself is on the wall clock. Two checks of the noise are recorded: the full-rank export against the dense
model (the same layers) and how much a model's rounds differ.

For each batch and each drop (0.5 and 1 point below dense): the cheapest measured latency reaching the target on
the latency front, on the MAC front and among the uniform configurations, and the extra reduction of the latency
front over the other two; also how far the table's prediction is from the measurement on the front points.
``--quiet-load L --quiet-wait S`` waits (up to S seconds) for a 1-minute load average below L before the profile
and before the measurement. Prints the tables, writes ``results/latency_front.json``.

    .venv/bin/python experiments/benchmarks/latency_front.py                      # prepares runs/bench-quickstart
    .venv/bin/python experiments/benchmarks/latency_front.py --batch-sizes 1 32 --quiet-load 1.0 --quiet-wait 1200
    .venv/bin/python experiments/benchmarks/latency_front.py --smoke --output /tmp/x   # digits, under a minute
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import optuna
import pandas as pd
import torch
from harness import ROOT, bench_parser, environment, write_result
from harness_runs import SOURCE_FILE, config_at, config_file, prepare_base_run
from scipy.stats import kendalltau
from torch import nn

from flora_ray.backends.local import LocalBackend
from flora_ray.config import Config, config_to_dict
from flora_ray.core.cost import build_cost_model
from flora_ray.core.latency import LatencyModel
from flora_ray.core.models import ModelSpec
from flora_ray.core.subnet import load_subnet, save_subnet
from flora_ray.core.timing import BLOCKS, MIN_BLOCKS, time_ms, torch_threads
from flora_ray.results import cheapest_within
from flora_ray.search.evaluator import supernet_from_numpy
from flora_ray.stages.inputs import full_space
from flora_ray.stages.profile import model_input, profile_stage, read_table
from flora_ray.stages.search import search_stage
from flora_ray.storage.files import read_json, sha256_file, write_json
from flora_ray.storage.run_store import ARTEFACTS, RunStore

DROPS = (0.5, 1.0)
MACS = "macs"
SMOKE = {"trials": 12, "eval_images": 200, "min_run_time": 0.01, "rounds": 2, "batch_sizes": [1, 4]}


def latency_name(batch: int) -> str:
    return f"latency_b{batch}"


# --- runs ---------------------------------------------------------------------------------------------------------


def search_configs(base: Path, args) -> dict[str, Config]:
    """Per search (``macs`` and ``latency_b<batch>`` for each batch size): its configuration, pointed at its own
    run directory beside the base run's (``runs_root``)."""
    common = [
        f"profile.batch_sizes=[{', '.join(map(str, args.batch_sizes))}]",
        "profile.enabled=true",
        "profile.device=cpu",
        f"profile.threads={args.threads}",
        f"profile.min_run_time={args.min_run_time}",
    ]
    for key in ("trials", "population", "eval_images", "seed"):
        if getattr(args, key) is not None:
            common.append(f"search.{key}={getattr(args, key)}")
    searches = {MACS: (MACS, args.batch_sizes[0])}
    searches.update({latency_name(b): ("latency_ms", b) for b in args.batch_sizes})
    prefix = f"bench-{base.name.removeprefix('bench-')}-latfront"
    return {
        name: config_at(
            config_file(base),
            args.runs_root / f"{prefix}-{name.replace('_', '')}",
            [*common, f"search.objectives=[{axis}]", f"profile.batch={batch}"],
        )
        for name, (axis, batch) in searches.items()
    }


def source_record(base: Path, cfg: Config) -> dict[str, Any]:
    """What a search directory's results depend on: the supernet's bytes and the configuration."""
    record = {"supernet_sha256": sha256_file(base / ARTEFACTS.supernet), "config": config_to_dict(cfg)}
    return json.loads(json.dumps(record))  # as it reads back from the file (tuples become lists)


def reusable(base: Path, cfgs: dict[str, Config]) -> bool:
    """Whether every search directory holds a finished search of this supernet and configuration."""
    for cfg in cfgs.values():
        run_dir = cfg.run.run_dir
        marker, summary = run_dir / SOURCE_FILE, run_dir / ARTEFACTS.search_summary
        if not (marker.is_file() and summary.is_file() and (run_dir / ARTEFACTS.latency_table).is_file()):
            return False
        if read_json(marker) != source_record(base, cfg):
            return False
    return True


def seed_run_dir(base: Path, run_dir: Path) -> None:
    """A fresh search directory with the base run's teacher, space and supernet (no configuration yet: the
    stages record this search's own)."""
    if run_dir.exists():
        assert run_dir.name.startswith("bench-"), run_dir  # only ever delete this benchmark's own runs
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    for name in (ARTEFACTS.teacher, ARTEFACTS.space, ARTEFACTS.supernet):
        if (base / name).is_file():
            shutil.copyfile(base / name, run_dir / name)


def wait_for_quiet(limit: float | None, max_wait: float, phase: str) -> dict[str, Any]:
    """Sleep (in 30 s steps, at most ``max_wait`` s) until the 1-minute load average is below ``limit``."""
    started, load = time.perf_counter(), os.getloadavg()
    while limit is not None and load[0] >= limit and time.perf_counter() - started < max_wait:
        print(f"{phase}: load {load[0]:.2f} >= {limit}: waiting", flush=True)
        time.sleep(min(30.0, max(1.0, max_wait - (time.perf_counter() - started))))
        load = os.getloadavg()
    waited = time.perf_counter() - started
    quiet = limit is None or load[0] < limit
    return {"phase": phase, "waited_s": waited, "loadavg": list(load), "quiet": quiet, "limit": limit}


def profile_and_search(base: Path, cfgs: dict[str, Config], args) -> dict[str, Any]:
    """Profile the latency table once (into the first latency search's directory), copy it to every search
    directory, then run every search; returns the phases' timings and loads."""
    for cfg in cfgs.values():
        seed_run_dir(base, cfg.run.run_dir)
    first = cfgs[latency_name(args.batch_sizes[0])]
    quiet = wait_for_quiet(args.quiet_load, args.quiet_wait, "profile")
    started = time.perf_counter()
    profile = profile_stage(first, LocalBackend())
    record = {"profile_quiet": quiet, "profile_seconds": time.perf_counter() - started, "profile": profile}
    record["profile_loadavg_end"] = list(os.getloadavg())
    table = first.run.run_dir / ARTEFACTS.latency_table
    for cfg in cfgs.values():
        if cfg is not first:
            shutil.copyfile(table, cfg.run.run_dir / ARTEFACTS.latency_table)
    record["search_seconds"] = {}
    for name, cfg in cfgs.items():
        started = time.perf_counter()
        torch.set_num_threads(max(cfg.run.threads_per_worker, 1))
        summary = search_stage(cfg, LocalBackend())
        record["search_seconds"][name] = time.perf_counter() - started
        print(f"search {name}: {summary['complete']} trials, front {summary['front_size']}, "
              f"{record['search_seconds'][name]:.0f} s, load {os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip
        write_json(cfg.run.run_dir / SOURCE_FILE, source_record(base, cfg))
    return record


# --- export and measurement ---------------------------------------------------------------------------------------


def config_key(ranks: str | dict) -> str:
    """One configuration, however its ranks were written."""
    ranks = json.loads(ranks) if isinstance(ranks, str) else ranks
    return json.dumps(dict(sorted(ranks.items())))


def search_frames(cfgs: dict[str, Config]) -> tuple[dict[str, pd.DataFrame], pd.DataFrame, float]:
    """Every search's front, the uniform baseline and the dense accuracy (the searches must agree on both)."""
    fronts, uniforms, dense = {}, [], []
    for name, cfg in cfgs.items():
        store = RunStore(cfg.run.run_dir)
        fronts[name] = store.read_parquet(ARTEFACTS.pareto).reset_index(drop=True)
        uniforms.append(store.read_parquet(ARTEFACTS.uniform).drop(columns=["trial", "generation"]))
        dense.append(float(store.read_json(ARTEFACTS.search_summary)["dense_accuracy"]))
    assert len(set(dense)) == 1, f"the searches scored the dense model differently: {dense}"
    accuracies = {tuple(u["accuracy"]) for u in uniforms}
    assert len(accuracies) == 1, "the searches scored the uniform configurations differently"
    return fronts, uniforms[0].sort_values("ratio").reset_index(drop=True), dense[0]


def export_and_load(
    base: Path, cfg: Config, configs: dict[str, dict[str, int]], directory: Path
) -> dict[str, nn.Module]:
    """Each configuration as a user gets it: exported with ``save_subnet`` from the supernet, reloaded with
    ``load_subnet``; ``{}`` (the dense model) is the teacher. The supernet holds every rank of every layer, so it
    is given the full space: uniform configurations the filter dropped are exported too."""
    tensors, header = RunStore(base).read_checkpoint(ARTEFACTS.supernet)
    supernet = supernet_from_numpy(header, {k: v.numpy() for k, v in tensors.items()})
    space = full_space(cfg)
    space.check_compatible(supernet.space, source="the supernet's space")
    supernet.space = space
    models = {}
    for i, (key, ranks) in enumerate(configs.items()):
        if not ranks:
            teacher, _ = RunStore(base).read_checkpoint(ARTEFACTS.teacher)
            dense = ModelSpec.from_dict(header["model"]).create()
            dense.load_state_dict(teacher, strict=True)
            models[key] = dense.eval()
            continue
        save_subnet(supernet, ranks, directory / str(i))
        models[key] = load_subnet(directory / str(i)).eval()
    return models


def cpu_time_ms(run, min_run_time: float) -> float:
    """``time_ms``'s blocked median, on the calling thread's CPU time (``time.thread_time``) instead of the wall
    clock: time the thread waits while other processes run is not counted (one intra-op thread only)."""
    from torch.utils import benchmark

    timer = benchmark.Timer(stmt="run()", globals={"run": run}, num_threads=1, timer=time.thread_time)
    per_call = max(timer.timeit(1).median, 1e-6)
    blocks = max(MIN_BLOCKS, min(BLOCKS, round(min_run_time / per_call)))
    number = max(1, round(min_run_time / blocks / per_call))
    timer.timeit(max(1, number * blocks // 4))
    return 1e3 * statistics.median(timer.timeit(number).median for _ in range(blocks))


@torch.no_grad()
def measure(models: dict[str, nn.Module], x: torch.Tensor, args, seed: int) -> dict[str, dict[str, Any]]:
    """Per model: ``time_ms`` (and, with one thread, ``cpu_time_ms`` right after it) in each of ``args.rounds``
    rounds over all models, each round in a new seeded random order; ``ms`` is the median over the rounds."""
    wall: dict[str, list[float]] = {key: [] for key in models}
    cpu: dict[str, list[float]] = {key: [] for key in models}
    rng = random.Random(seed)
    with torch_threads(args.threads):
        for _ in range(args.rounds):
            order = list(models)
            rng.shuffle(order)
            for key in order:
                run = lambda model=models[key]: model(x)  # noqa: E731
                wall[key].append(time_ms(run, args.threads, args.min_run_time).median_ms)
                cpu[key].append(cpu_time_ms(run, args.min_run_time) if args.threads == 1 else math.nan)
    return {
        key: {"ms": statistics.median(wall[key]), "rounds_ms": wall[key], "cpu_ms": statistics.median(cpu[key]),
              "cpu_rounds_ms": cpu[key]}
        for key in models
    }  # fmt: skip


def measure_all(base: Path, cfg: Config, configs: dict[str, dict[str, int]], args) -> dict[int, dict[str, Any]]:
    """Measured latency of every configuration at every batch size."""
    header = RunStore(base).read_checkpoint_header(ARTEFACTS.supernet)
    spec = ModelSpec.from_dict(header["model"])
    out = {}
    with tempfile.TemporaryDirectory(prefix="latency-front-") as tmp:
        models = export_and_load(base, cfg, configs, Path(tmp))
        for i, batch in enumerate(args.batch_sizes):
            started = time.perf_counter()
            x = model_input(next(iter(models.values())), spec, batch, torch.device("cpu"), torch.float32)
            out[batch] = measure(models, x, args, seed=i)
            print(f"measured {len(models)} models at batch {batch} in {time.perf_counter() - started:.0f} s, "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip
    return out


def predictors(cfg: Config) -> dict[int, LatencyModel]:
    """The table's predictor at every profiled batch, over the full space (every uniform configuration)."""
    table, device = read_table(RunStore(cfg.run.run_dir))
    spec = ModelSpec.from_dict(RunStore(cfg.run.run_dir).read_checkpoint_header(ARTEFACTS.supernet)["model"])
    cost, space = build_cost_model(spec.create(device="meta")), full_space(cfg)
    return {b: LatencyModel.from_table(table, space, cost, b, device) for b in cfg.profile.batch_sizes}


def add_latency(frame: pd.DataFrame, measured: dict, models: dict[int, LatencyModel]) -> pd.DataFrame:
    """``measured_ms_b<batch>`` (wall clock) and ``cpu_ms_b<batch>`` (thread CPU time), each round's in
    ``*_rounds_ms_b<batch>``, and ``predicted_ms_b<batch>`` columns of ``frame`` (one row per configuration)."""
    frame = frame.copy()
    for batch, by_key in measured.items():
        frame[f"measured_ms_b{batch}"] = [by_key[config_key(r)]["ms"] for r in frame["ranks"]]
        frame[f"measured_rounds_ms_b{batch}"] = [by_key[config_key(r)]["rounds_ms"] for r in frame["ranks"]]
        frame[f"cpu_ms_b{batch}"] = [by_key[config_key(r)]["cpu_ms"] for r in frame["ranks"]]
        frame[f"cpu_rounds_ms_b{batch}"] = [by_key[config_key(r)]["cpu_rounds_ms"] for r in frame["ranks"]]
        frame[f"predicted_ms_b{batch}"] = [models[batch].predict(json.loads(r)) for r in frame["ranks"]]
    return frame


# --- comparison ---------------------------------------------------------------------------------------------------


def pick(frame: pd.DataFrame, target: float, column: str, label: str) -> dict[str, Any]:
    """The configuration of ``frame`` with the lowest ``column`` among those reaching ``target`` accuracy."""
    row = cheapest_within(frame, target, column)
    if row is None:
        return {"ms": None, "accuracy": None, "macs": None, label: None}
    return {"ms": float(row[column]), "accuracy": float(row["accuracy"]), "macs": float(row["macs"]),
            label: float(row[label]) if label == "ratio" else int(row[label])}  # fmt: skip


def reduction(ours: float | None, theirs: float | None) -> float | None:
    return None if ours is None or theirs is None else 1.0 - ours / theirs


def compare(fronts: dict, uniform: pd.DataFrame, dense: float, batch: int, kind: str) -> list[dict[str, Any]]:
    """Per drop: the cheapest (``kind``: measured or predicted latency at ``batch``) latency-front, MAC-front and
    uniform configuration reaching the target accuracy, and the latency front's extra reduction over the others."""
    column = f"{kind}_ms_b{batch}"
    rows = []
    for drop in DROPS:
        target = dense - drop
        lat = pick(fronts[latency_name(batch)], target, column, "trial")
        mac = pick(fronts[MACS], target, column, "trial")
        uni = pick(uniform, target, column, "ratio")
        rows.append({
            "drop": drop, "target_accuracy": target, "latency_front": lat, "mac_front": mac, "uniform": uni,
            "latency_front_vs_uniform": reduction(lat["ms"], uni["ms"]),
            "latency_front_vs_mac_front": reduction(lat["ms"], mac["ms"]),
            "mac_front_vs_uniform": reduction(mac["ms"], uni["ms"]),
        })  # fmt: skip
    return rows


def prediction_error(frame: pd.DataFrame, batch: int, kind: str = "measured") -> dict[str, Any]:
    """How the table's prediction at ``batch`` compares with the measured (``kind``: ``measured`` on the wall clock,
    ``cpu``: thread CPU time) latency of ``frame``'s configurations."""
    measured, predicted = frame[f"{kind}_ms_b{batch}"], frame[f"predicted_ms_b{batch}"]
    rel = 100 * (predicted / measured - 1)
    tau = kendalltau(predicted, measured).statistic if len(frame) > 1 else math.nan
    return {
        "points": len(frame),
        "mape_pct": float(rel.abs().mean()),
        "max_abs_error_pct": float(rel.abs().max()),
        "mean_signed_error_pct": float(rel.mean()),
        "kendall_tau": None if math.isnan(tau) else float(tau),
        "measured_ms_range": [float(measured.min()), float(measured.max())],
    }


# --- output -------------------------------------------------------------------------------------------------------


def _ms(side: dict[str, Any], label: str) -> str:
    if side["ms"] is None:
        return "none reaches it"
    which = f"ratio {side['ratio']:g}" if label == "ratio" else f"#{side['trial']}"
    return f"{side['ms']:.3f} ({which}, {side['accuracy']:.2f}%, {side['macs'] / 1e6:.2f} MMACs)"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


CLOCKS = {"measured": ("wall clock, time_ms", ""), "cpu": ("thread CPU time", "cpu_")}


def print_comparison(out: dict[str, Any], kind: str) -> None:
    """The picks and extra reductions at every batch and drop, on one clock (``kind``), as a Markdown table."""
    title, prefix = CLOCKS[kind]
    print(f"\nMeasured latency ({title}), ms per batch:")
    print("| batch | drop | target acc | latency front ms | MAC front ms | best uniform ms | dense ms | "
          "latency front vs uniform | vs MAC front | MAC front vs uniform |")  # fmt: skip
    print("| ---: | ---: | ---: | --- | --- | --- | ---: | ---: | ---: | ---: |")
    for batch, rows in out[f"comparison_{kind}"].items():
        dense = out["dense_ms"][batch][f"{prefix}measured"]
        for r in rows:
            print(f"| {batch} | {r['drop']:g} | {r['target_accuracy']:.2f} | {_ms(r['latency_front'], 'trial')} | "
                  f"{_ms(r['mac_front'], 'trial')} | {_ms(r['uniform'], 'ratio')} | {dense:.3f} | "
                  f"{_pct(r['latency_front_vs_uniform'])} | {_pct(r['latency_front_vs_mac_front'])} | "
                  f"{_pct(r['mac_front_vs_uniform'])} |")  # fmt: skip
    for batch, d in out["dense_ms"].items():
        print(f"batch {batch}: full-rank export (same layers as dense) {d[f'{prefix}full_rank_vs_dense_pct']:+.1f}% "
              f"against dense; a model's rounds differ by a median {d[f'{prefix}round_spread_pct']:.1f}%")  # fmt: skip


def print_errors(errors: dict[str, Any], title: str) -> None:
    print(f"\nPredicted against measured latency ({title}):")
    print("| batch | points | MAPE | worst | mean signed | Kendall tau | measured ms |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | --- |")
    for batch, by_set in errors.items():
        for name, e in by_set.items():
            tau = "-" if e["kendall_tau"] is None else f"{e['kendall_tau']:.2f}"
            low, high = e["measured_ms_range"]
            print(f"| {batch} | {name} ({e['points']}) | {e['mape_pct']:.1f}% | {e['max_abs_error_pct']:.1f}% | "
                  f"{e['mean_signed_error_pct']:+.1f}% | {tau} | {low:.3f}-{high:.3f} |")  # fmt: skip


def print_tables(out: dict[str, Any]) -> None:
    """The comparisons (each clock, then the prediction) and the prediction errors, as Markdown tables."""
    print(f"\ndense accuracy {out['dense_accuracy']:.2f}% on {out['search']['eval_images']} search images")
    for kind in CLOCKS:
        if f"comparison_{kind}" in out:
            print_comparison(out, kind)
    print("\nThe same picks by predicted latency (what the search saw):")
    print("| batch | drop | latency front vs uniform | vs MAC front | MAC front vs uniform |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for batch, rows in out["comparison_predicted"].items():
        for r in rows:
            print(f"| {batch} | {r['drop']:g} | {_pct(r['latency_front_vs_uniform'])} | "
                  f"{_pct(r['latency_front_vs_mac_front'])} | {_pct(r['mac_front_vs_uniform'])} |")  # fmt: skip
    print_errors(out["prediction_error"], CLOCKS["measured"][0])
    if "prediction_error_cpu" in out:
        print_errors(out["prediction_error_cpu"], CLOCKS["cpu"][0])


def parse_args():
    parser = bench_parser(
        __doc__, smoke=SMOKE, smoke_help="a tiny digits run prepared in-process (under OUTPUT/runs), under a minute"
    )
    parser.add_argument("--run-dir", type=Path, help="a trained run (teacher, space.json, supernet.safetensors)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1], help="profiled, searched and measured")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the profile and the measurement")
    parser.add_argument("--min-run-time", type=float, default=0.2, help="seconds per timing (profile, measurement)")
    parser.add_argument("--rounds", type=int, default=3, help="measurement rounds over all models")
    parser.add_argument("--trials", type=int, help="search trials (default: the run's)")
    parser.add_argument("--population", type=int, help="NSGA-II population (default: the run's)")
    parser.add_argument("--eval-images", type=int, help="search images per subnet (default: the run's)")
    parser.add_argument("--seed", type=int, help="search seed (default: the run's)")
    parser.add_argument("--quiet-load", type=float, help="wait for a 1-minute load below this before timing")
    parser.add_argument("--quiet-wait", type=float, default=1200.0, help="longest wait for --quiet-load (s)")
    parser.add_argument("--fresh", action="store_true", help="profile and search again even if results exist")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override of a prepared run")
    args = parser.parse_args()
    args.runs_root = args.output / "runs" if args.smoke else ROOT / "runs"
    return args


def searches(base: Path, args) -> tuple[dict[str, Config], dict[str, Any]]:
    """The search configurations, profiled and searched now unless finished results of them exist."""
    cfgs = search_configs(base, args)
    if not args.fresh and reusable(base, cfgs):
        print(f"reusing the searches in {', '.join(str(c.run.run_dir) for c in cfgs.values())}", flush=True)
        return cfgs, {"reused": True}
    return cfgs, {"reused": False, **profile_and_search(base, cfgs, args)}


def measured_frames(base: Path, cfgs: dict[str, Config], args) -> tuple[dict, pd.DataFrame, float, dict]:
    """Every front and the uniform baseline with measured and predicted latency columns, the dense accuracy and
    the dense model's latency."""
    fronts, uniform, dense_accuracy = search_frames(cfgs)
    configs = {config_key({}): {}}
    for frame in (uniform, *fronts.values()):
        configs.update({config_key(r): json.loads(r) for r in frame["ranks"]})
    measured = measure_all(base, cfgs[MACS], configs, args)
    models = predictors(next(iter(cfgs.values())))
    fronts = {name: add_latency(front, measured, models) for name, front in fronts.items()}
    uniform = add_latency(uniform, measured, models)
    full_rank = config_key(uniform.loc[uniform["ratio"].idxmax(), "ranks"])
    dense = {b: reference_latency(measured[b], models[b], full_rank) for b in measured}
    return fronts, uniform, dense_accuracy, dense


def reference_latency(measured: dict[str, dict], model: LatencyModel, full_rank: str) -> dict[str, Any]:
    """The dense model's measured (wall clock; ``cpu_``: thread CPU time) and predicted latency, and two signs of
    the measurement's noise: the full-rank export (the same layers as the dense model) against the dense model,
    and how much the rounds of a model differ ((max - min) / median, median over every measured model)."""
    out: dict[str, Any] = {"predicted": model.dense_ms}
    dense = measured[config_key({})]
    for clock in ("", "cpu_"):
        ms, rounds = f"{clock}ms", f"{clock}rounds_ms"
        spreads = [100 * (max(v[rounds]) - min(v[rounds])) / v[ms] for v in measured.values()]
        out.update({
            f"{clock}measured": dense[ms],
            f"{clock}rounds_ms": dense[rounds],
            f"{clock}full_rank_measured": measured[full_rank][ms],
            f"{clock}full_rank_vs_dense_pct": 100 * (measured[full_rank][ms] / dense[ms] - 1),
            f"{clock}round_spread_pct": statistics.median(spreads),
        })  # fmt: skip
    return out


def records(frame: pd.DataFrame, first: str) -> list[dict[str, Any]]:
    """JSON rows: ``first`` (trial or ratio), accuracy, costs, ranks and the latency columns."""
    columns = [first, "accuracy", "macs", "params", "latency_ms", "ranks"]
    columns += [c for c in frame.columns if c.startswith(("measured_", "cpu_", "predicted_ms_"))]
    return json.loads(frame[columns].to_json(orient="records"))


def comparisons(fronts: dict, uniform: pd.DataFrame, dense_accuracy: float, args) -> dict[str, Any]:
    """``comparison_<kind>`` (per batch and drop) for the wall clock (``measured``), the thread CPU time (``cpu``,
    one thread only) and the prediction, and the prediction's errors against each clock (``prediction_error``,
    ``prediction_error_cpu``)."""
    kinds = ("measured", "cpu", "predicted") if args.threads == 1 else ("measured", "predicted")
    out: dict[str, Any] = {
        f"comparison_{kind}": {str(b): compare(fronts, uniform, dense_accuracy, b, kind) for b in args.batch_sizes}
        for kind in kinds
    }
    for kind in kinds[:-1]:
        out["prediction_error" if kind == "measured" else f"prediction_error_{kind}"] = {
            str(b): {
                **{name: prediction_error(f, b, kind) for name, f in fronts.items()},
                "uniform (calibration points)": prediction_error(uniform, b, kind),
            }
            for b in args.batch_sizes
        }
    return out


def summarise(base: Path, cfgs: dict[str, Config], frames: tuple, args) -> dict[str, Any]:
    """The JSON record's figures: fronts, uniform, comparisons and prediction errors per batch."""
    fronts, uniform, dense_accuracy, dense = frames
    cfg = cfgs[MACS]
    header = RunStore(base).read_checkpoint_header(ARTEFACTS.supernet)
    searched = {name: RunStore(c.run.run_dir).read_json(ARTEFACTS.search_summary) for name, c in cfgs.items()}
    return {
        "model": cfg.model.name,
        "model_kwargs": cfg.model.kwargs,
        "dataset": cfg.data.name,
        "ratios": list(cfg.model.ratios),
        "candidates_per_block": [len(b["candidates"]) for b in header["space"]["blocks"]],
        "search": {
            "trials": cfg.search.trials,
            "population": cfg.search.population,
            "eval_images": cfg.search.eval_images,
            "seed": cfg.search.seed if cfg.search.seed is not None else cfg.run.seed,
            "backend": "LocalBackend (stages.search.search_stage, in-process)",
        },
        "dense_accuracy": dense_accuracy,
        "dense_ms": {str(b): v for b, v in dense.items()},
        **comparisons(fronts, uniform, dense_accuracy, args),
        "searches": {
            name: {
                "run_dir": str(c.run.run_dir),
                "objectives": list(c.search.objectives),
                "latency_batch": c.profile.search_batch,
                "front": records(fronts[name], "trial"),
                **{k: searched[name][k] for k in ("complete", "front_size", "hypervolume", "seconds")},
            }
            for name, c in cfgs.items()
        },
        "uniform": records(uniform, "ratio"),
    }


def main() -> None:
    args = parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    env_start, started = environment(args.threads), time.perf_counter()
    base = prepare_base_run(args.run_dir, args.smoke, args.output, args.set).resolve()
    prepared = time.perf_counter() - started
    cfgs, phases = searches(base, args)
    searched = time.perf_counter()
    quiet = wait_for_quiet(args.quiet_load, args.quiet_wait, "measurement")
    measure_start = time.perf_counter()
    frames = measured_frames(base, cfgs, args)
    out = {
        "benchmark": "latency_front",
        "smoke": args.smoke,
        "environment": env_start,
        "base_run": str(base),
        "supernet_sha256": sha256_file(base / ARTEFACTS.supernet),
        "profile": {
            "batch_sizes": args.batch_sizes,
            "threads": args.threads,
            "min_run_time": args.min_run_time,
            "device": read_table(RunStore(cfgs[MACS].run.run_dir))[1],
        },
        "measurement": {
            "routine": "core.timing.time_ms (wall clock) on exported (save_subnet/load_subnet) subnets, float32, "
            "CPU; with one thread also the same blocked median on time.thread_time (cpu_ms) right after it",
            "rounds": args.rounds,
            "order": "a new seeded random order every round; a model's ms: median of rounds",
            "threads": args.threads,
            "min_run_time": args.min_run_time,
            "quiet": quiet,
            "loadavg_end": list(os.getloadavg()),
            "seconds": time.perf_counter() - measure_start,
        },
        "drops": list(DROPS),
        **summarise(base, cfgs, frames, args),
        "phases": {
            "prepare_seconds": prepared,
            "profile_and_search_seconds": searched - started - prepared,
            **phases,
        },
        "wall_seconds": time.perf_counter() - started,
        "loadavg_end": list(os.getloadavg()),
    }
    print_tables(out)
    print(f"wall {out['wall_seconds']:.0f} s; load average {env_start['loadavg'][0]:.2f} -> "
          f"{out['loadavg_end'][0]:.2f} (measurement at {quiet['loadavg'][0]:.2f})")  # fmt: skip
    write_result(args.output / "latency_front.json", out)
    print(f"wrote {args.output / 'latency_front.json'}")


if __name__ == "__main__":
    main()

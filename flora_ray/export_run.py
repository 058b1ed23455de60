"""``flora-ray export``: pick a searched subnet, export it, and measure its test accuracy and CPU latency.

The subnet is chosen by trial number or as the most accurate front point within a MAC budget, extracted from the
run's supernet with ``export.save_subnet``, reloaded from disk (as a user would), scored on the test split and
timed on CPU against the dense model. The figures go into ``export.json`` next to the exported files.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flora_ray.config import load_config
from flora_ray.core.subnet import load_subnet, package_versions, save_subnet
from flora_ray.core.supernet import load_supernet
from flora_ray.data.datasets import build_datasets
from flora_ray.results import best_under, load_front, load_trials
from flora_ray.storage.files import write_json
from flora_ray.training.trainer import SUPERNET_FILE, accuracy, resolve_model_spec, teacher_source


@torch.no_grad()
def cpu_latency_ms(model: nn.Module, x: torch.Tensor, runs: int = 30, warmup: int = 5) -> float:
    """Median wall time (ms) of one forward pass of ``x`` on CPU."""
    model = model.eval().cpu()
    times = []
    for i in range(warmup + runs):
        start = time.perf_counter()
        model(x)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def choose_trial(run_dir: Path, trial: int | None, max_macs: float | None):
    """The trials.parquet row of ``trial``, or the best front point with ``macs <= max_macs``."""
    if (trial is None) == (max_macs is None):
        raise ValueError("give exactly one of --trial N or --max-macs M")
    if trial is not None:
        trials = load_trials(run_dir)
        rows = trials[(trials["trial"] == trial) & (trials["state"] == "COMPLETE")]
        if rows.empty:
            raise ValueError(f"trial {trial} is not a completed trial of {str(run_dir)!r} (0..{trials['trial'].max()})")
        return rows.iloc[0]
    row = best_under(load_front(run_dir), max_macs)
    if row is None:
        front = load_front(run_dir)
        raise ValueError(f"no front point has macs <= {max_macs:.4g}; the cheapest needs {front['macs'].min():.4g}")
    return row


def export_from_run(
    run_dir: str | os.PathLike,
    trial: int | None = None,
    max_macs: float | None = None,
    output: str | os.PathLike | None = None,
    threads: int = 1,
) -> dict[str, Any]:
    """Export one searched subnet of a run; returns (and writes to ``export.json``) its figures."""
    run_dir = Path(run_dir)
    config_file = run_dir / "search_config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"{str(config_file)!r} does not exist: run `flora-ray search` for this run first")
    cfg = load_config(config_file)
    row = choose_trial(run_dir, trial, max_macs)
    ranks = json.loads(row["ranks"])
    supernet = load_supernet(run_dir / SUPERNET_FILE)
    out = Path(output) if output else run_dir / "export" / f"trial_{int(row['trial'])}"
    save_subnet(supernet, ranks, out, trial=int(row["trial"]), search_accuracy=float(row["accuracy"]))
    model = load_subnet(out)
    splits = build_datasets(cfg.data)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # accuracy only; latency is on CPU
    test_acc = accuracy(model.to(device), splits.test, device)
    dense = resolve_model_spec(cfg).create(pretrained=teacher_source(cfg, run_dir))
    dense_test_acc = accuracy(dense.to(device), splits.test, device)
    x = torch.stack([splits.test[i][0] for i in range(32)])
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    latency = {
        "subnet_batch1_ms": cpu_latency_ms(model, x[:1]),
        "dense_batch1_ms": cpu_latency_ms(dense, x[:1]),
        "subnet_batch32_ms": cpu_latency_ms(model, x),
        "dense_batch32_ms": cpu_latency_ms(dense, x),
    }
    torch.set_num_threads(previous_threads)
    report = {
        "trial": int(row["trial"]),
        "directory": str(out),
        "macs": supernet.cost.macs(ranks),
        "dense_macs": supernet.cost.dense_macs,
        "params": supernet.cost.params(ranks),
        "search_accuracy": float(row["accuracy"]),
        "test_accuracy": test_acc,
        "dense_test_accuracy": dense_test_acc,
        "latency": latency,
        "threads": threads,
        "versions": package_versions(),
    }
    write_json(out / "export.json", report)
    return report

"""``flora-ray export``: pick a searched subnet, export it, and measure its test accuracy and CPU latency.

The subnet is chosen by trial number or as the most accurate front point within a MAC budget. ``export_task`` (a
task with one search trial's resources, on a worker node of a cluster) extracts it from the run's supernet with
``core.subnet.save_subnet``, reloads it from disk (as a user would), scores it and the dense model on the test
split and times both on CPU; the driver, which loads no weights, writes the files it returns and ``export.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flora_ray.backends.base import Backend
from flora_ray.backends.local import LocalBackend
from flora_ray.config import Config
from flora_ray.core.cost import build_cost_model
from flora_ray.core.latency import LatencyModel
from flora_ray.core.models import ModelSpec
from flora_ray.core.quantize import SCHEME
from flora_ray.core.space import RankSpace
from flora_ray.core.subnet import load_subnet, package_versions, save_subnet
from flora_ray.core.timing import forward_ms, time_ms, torch_threads
from flora_ray.data.datasets import build_datasets, norm_stats
from flora_ray.data.listing import run_listing
from flora_ray.errors import MissingInput
from flora_ray.records import CpuLatency, ExportReport, Int8Figures, Int8Latency
from flora_ray.results import cost_axis, knee_point, load_front
from flora_ray.stages.formats import CARD_FILE, CONFIG_FILE, check_formats, hf_config, model_card, write_formats
from flora_ray.stages.inputs import load_teacher, open_run, working_dir
from flora_ray.stages.profile import (
    DTYPES,
    device_description,
    model_input,
    profile_resources,
    profile_settings,
    read_table,
)
from flora_ray.stages.runs import budget_of, calibrate_subnet, load_run_config, run_supernet, select_trial
from flora_ray.stages.search import trial_resources
from flora_ray.storage.files import write_bytes, write_json
from flora_ray.storage.run_store import ARTEFACTS, RunStore
from flora_ray.training.tasks import accuracy
from flora_ray.training.worker import run_device

EXPORT_FILE = "export.json"  # an export's figures (``records.ExportReport``), in its folder


def latency(model: nn.Module, dense: nn.Module, x: torch.Tensor, threads: int) -> dict[str, float]:
    """CPU latency of the subnet and the dense model at batch 1 and at the batch of ``x``, with ``threads``."""
    with torch_threads(threads):
        return CpuLatency(
            subnet_batch1_ms=forward_ms(model, x[:1]),
            dense_batch1_ms=forward_ms(dense, x[:1]),
            subnet_batch32_ms=forward_ms(model, x),
            dense_batch32_ms=forward_ms(dense, x),
        ).to_dict()


def export_bundles(cfg: Config) -> list[dict[str, float]]:
    """What the stage asks Ray for (``flora-ray plan``): one task with a search trial's resources."""
    return [trial_resources(cfg)]


def export_work(cfg: Config, *, workload: Any) -> float:
    """The stage's MACs for ``flora-ray plan``, as the plan has always counted them: two passes of the dense model
    over ``search.eval_images`` (the subnet's and the dense model's test-split passes)."""
    return 2 * cfg.search.eval_images * workload.dense_macs


def export_task(
    run_uri: str, row: dict[str, Any], threads: int, formats: tuple[str, ...] = ("safetensors",), evaluate: bool = True
) -> tuple[dict[str, bytes], dict[str, Any]]:
    """The export's compute, as one task with a trial's resources: extract the subnet of ``row`` (``trial``,
    ``ranks``, ``accuracy``) from the run's supernet, reload it from the written files as a user would, write and
    check the other ``formats``; with ``evaluate``, score it and the dense model on the test split and time both on
    CPU. Returns the exported files' bytes and the figures."""
    import tempfile

    store = RunStore(run_uri)
    cfg = load_run_config(store)
    ranks = json.loads(row["ranks"])
    supernet = run_supernet(store)
    recalibrated = calibrate_subnet(supernet, ranks, cfg)
    splits = build_datasets(cfg.data, listing=run_listing(cfg)) if evaluate else None
    figures: dict[str, Any] = {
        "trial": int(row["trial"]),
        "macs": supernet.cost.macs(ranks),
        "dense_macs": supernet.cost.dense_macs,
        "params": supernet.cost.params(ranks),
        "search_accuracy": float(row["accuracy"]),
        "bn_recalibration_images": cfg.search.bn_recalibration_images if recalibrated else 0,
        "versions": package_versions(),
    }
    with tempfile.TemporaryDirectory(prefix="flora-export-") as tmp:
        save_subnet(supernet, ranks, tmp, trial=int(row["trial"]), search_accuracy=float(row["accuracy"]))
        model = load_subnet(tmp)
        x = _check_batch(model, supernet.spec, splits)
        figures["formats"] = write_formats(model, x, Path(tmp), formats)
        files = {path.name: path.read_bytes() for path in sorted(Path(tmp).iterdir()) if path.is_file()}
        int8 = load_subnet(tmp, int8=True) if "int8" in formats and evaluate else None
    if not evaluate:
        return files, {**figures, "evaluated": False}
    device = run_device(cfg, "search.gpus_per_trial")  # accuracy; latency is on CPU
    (dense,) = load_teacher(cfg, store)
    figures.update({
        "evaluated": True,
        "test_accuracy": accuracy(model.to(device), splits.test, device),
        "dense_test_accuracy": accuracy(dense.to(device), splits.test, device),
        "latency": latency(model.cpu(), dense.cpu(), x, threads),
        "threads": threads,
        "device": str(device),
    })  # fmt: skip
    if int8 is not None:
        figures["int8"] = int8_figures(int8, model.cpu(), splits.test, x, threads, figures["test_accuracy"])
    return files, figures


def int8_figures(
    int8: nn.Module, fp32: nn.Module, test, x: torch.Tensor, threads: int, fp32_accuracy: float
) -> dict[str, Any]:
    """The int8 subnet (``--format int8``) against the fp32 one: test accuracy (on CPU, where int8 runs) and CPU
    latency, both models timed with the same batches, threads and timer (``core.timing.forward_ms``)."""
    int8_accuracy = accuracy(int8, test, torch.device("cpu"))
    with torch_threads(threads):
        timed = Int8Latency(
            int8_batch1_ms=forward_ms(int8, x[:1]),
            fp32_batch1_ms=forward_ms(fp32, x[:1]),
            int8_batch32_ms=forward_ms(int8, x),
            fp32_batch32_ms=forward_ms(fp32, x),
        )
    return Int8Figures(
        scheme=SCHEME,
        test_accuracy=int8_accuracy,
        fp32_test_accuracy=fp32_accuracy,
        accuracy_drop=fp32_accuracy - int8_accuracy,
        latency=timed,
        speedup_batch1=timed.fp32_batch1_ms / timed.int8_batch1_ms,
        speedup_batch32=timed.fp32_batch32_ms / timed.int8_batch32_ms,
        threads=threads,
    ).to_dict()


def _check_batch(model: nn.Module, spec: ModelSpec, splits) -> torch.Tensor:
    """The batch the formats are checked on and the latency measured with: up to 32 test images, or (without
    evaluation, no data loaded) 8 seeded random inputs of the model's shape."""
    if splits is not None:
        return torch.stack([splits.test[i][0] for i in range(min(32, len(splits.test)))])
    generator = torch.Generator().manual_seed(0)
    shape = model_input(model, spec, 1, torch.device("cpu"), torch.float32).shape[1:]
    return torch.randn(8, *shape, generator=generator)


@torch.no_grad()
def target_latency_task(files: dict[str, bytes], batches: list[int], settings: dict[str, Any]) -> dict[str, Any]:
    """The exported subnet (from its files, as a user loads it) and the dense model timed on this node, the way
    ``flora-ray profile`` times its table (``core.timing.time_ms``), at each batch size."""
    import tempfile

    device, dtype = torch.device(settings["device"]), DTYPES[settings["dtype"]]
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "profile.device=cuda but this node has no CUDA device: ask for a GPU node in profile.resources"
        )
    with tempfile.TemporaryDirectory(prefix="flora-latency-") as tmp:
        for name, data in files.items():
            Path(tmp, name).write_bytes(data)
        subnet = load_subnet(tmp, device=device).to(dtype).eval()
        spec = ModelSpec.from_dict(json.loads(files["subnet.json"])["model"])
    dense = spec.create(device=device).to(dtype).eval()
    threads, min_run_time = settings["threads"], settings["min_run_time"]
    with torch_threads(threads):
        measured = {}
        for batch in batches:
            x = model_input(dense, spec, batch, device, dtype)
            measured[str(batch)] = {
                "measured_ms": time_ms(lambda x=x: subnet(x), threads, min_run_time).median_ms,
                "dense_measured_ms": time_ms(lambda x=x: dense(x), threads, min_run_time).median_ms,
            }
    return {"device": device_description(device, settings["dtype"], settings["threads"]), "batches": measured}


def target_latency(store: RunStore, cfg: Config, ranks: dict[str, int], files: dict[str, bytes], backend: Backend):
    """Measured (on a node of the target kind: ``profile.resources``) against predicted latency of the export and
    the dense model at every profiled batch size; ``None`` when the run has no latency table."""
    table, device = read_table(store)
    if table is None:
        return None
    header = store.read_checkpoint_header(ARTEFACTS.supernet)
    space = RankSpace.from_dict(header["space"], source="supernet header")
    cost = build_cost_model(ModelSpec.from_dict(header["model"]).create(device="meta"))
    batches = sorted({int(b) for b in table["batch"].unique()})
    result = backend.call(target_latency_task, files, batches, profile_settings(cfg),
                          resources=profile_resources(cfg), retries=cfg.run.max_failures)  # fmt: skip
    for batch, figures in result["batches"].items():
        model = LatencyModel.from_table(table, space, cost, int(batch), device)
        figures["predicted_ms"], figures["dense_predicted_ms"] = model.predict(ranks), model.dense_ms
        figures["error_pct"] = 100 * (figures["predicted_ms"] / figures["measured_ms"] - 1)
    result["table_device"] = device
    return result


def check_export(
    run: str | os.PathLike | RunStore,
    *,
    trial: int | None = None,
    max_macs: float | None = None,
    max_latency_ms: float | None = None,
    knee: bool = False,
    formats: tuple[str, ...] = ("safetensors",),
):
    """``(store, config, trial row)`` of an export request, or the error that names what is wrong (the run, the
    choice of trial, an unknown or not installed format)."""
    check_formats(formats)
    store = run if isinstance(run, RunStore) else RunStore(run)
    if not store.is_file(ARTEFACTS.trials):
        raise MissingInput(f"{store.location(ARTEFACTS.trials)!r} does not exist: run `flora-ray search` first")
    budget = budget_of(max_macs=max_macs, max_latency_ms=max_latency_ms)
    return store, load_run_config(store), select_trial(store, trial=trial, budget=budget, knee=knee)


def export_from_run(
    run: str | os.PathLike | RunStore,
    *,
    trial: int | None = None,
    max_macs: float | None = None,
    max_latency_ms: float | None = None,
    knee: bool = False,
    output: str | os.PathLike | None = None,
    threads: int = 1,
    backend: Backend | None = None,
    formats: tuple[str, ...] = ("safetensors",),
    evaluate: bool = True,
) -> dict[str, Any]:
    """Export one searched subnet of a run (a trial, the most accurate front point within a budget, or the
    front's knee); returns (and writes to ``export.json``) its figures.

    The extraction, the other ``formats`` and every inference pass run in ``export_task`` on ``backend``
    (default: in this process), with one search trial's resources; this process only picks the trial and writes
    the files, ``config.json`` and the model card. With a latency table (and ``evaluate``), the export is also
    timed on a node of the target kind (``target_latency``), next to the prediction.
    """
    formats = check_formats(formats)
    store, cfg, row = check_export(
        run, trial=trial, max_macs=max_macs, max_latency_ms=max_latency_ms, knee=knee, formats=formats
    )
    backend = backend or LocalBackend()
    task_row = {"trial": int(row["trial"]), "ranks": row["ranks"], "accuracy": float(row["accuracy"])}
    files, figures = backend.call(export_task, store.uri, task_row, threads, formats, evaluate,
                                  resources=trial_resources(cfg), retries=cfg.run.max_failures)  # fmt: skip
    if evaluate:
        figures["target_latency"] = target_latency(store, cfg, json.loads(row["ranks"]), files, backend)
    name = ARTEFACTS.export_dir(figures["trial"])
    # Into the run; a run on object storage gets the files through a local working copy.
    out = Path(output) if output else store.local_path(name) if store.is_local else working_dir(cfg) / name
    for file_name, data in files.items():
        write_bytes(out / file_name, data)
    where = str(out) if output or store.is_local else store.location(name)
    report = ExportReport.from_dict({**figures, "directory": where}, source="the export's figures")
    spec = json.loads(files["subnet.json"])
    write_json(out / CONFIG_FILE, hf_config(spec, data_geometry(cfg)))
    write_bytes(out / CARD_FILE, model_card(spec, report, card_context(store, cfg, report)).encode())
    write_json(out / EXPORT_FILE, report.to_dict())
    if not output and not store.is_local:
        for path in sorted(p for p in out.iterdir() if p.is_file()):
            store.write_bytes(f"{name}/{path.name}", path.read_bytes())
    return report.to_dict()


def data_geometry(cfg: Config) -> dict[str, Any]:
    """What a user needs to feed the exported model: image side, channels, normalisation."""
    mean, std = norm_stats(cfg.data)
    return {"img_size": cfg.data.img_size, "in_chans": cfg.data.in_chans, "mean": mean, "std": std}


def card_context(store: RunStore, cfg: Config, report: ExportReport) -> dict[str, Any]:
    """The model card's facts about the run: data, base model, seed, target device, where the trial sits on
    the front."""
    front = load_front(store)
    axis = cost_axis(front)
    ordered = front.sort_values(axis).reset_index(drop=True)
    at = ordered.index[ordered["trial"] == report.trial].tolist()
    knee = int(knee_point(front, axis)["trial"]) if len(front) else None
    if at:
        position = f"point {at[0] + 1} of {len(ordered)} by {axis}" + (" (the knee)" if knee == report.trial else "")
    else:
        position = f"not on the front of {len(ordered)} points (a dominated trial)"
    pretrained = cfg.model.pretrained
    base = f"timm `{cfg.model.name}` " + (
        "pretrained weights"
        if pretrained is True
        else f"weights `{pretrained}`"
        if pretrained
        else "trained by `flora-ray pretrain`"
    )
    device = (
        report.target_latency.device.get("name", "the target device") if report.target_latency else "the target device"
    )
    return {"dataset": cfg.data.name, "run": store.uri, "seed": cfg.run.seed, "base_model": base,
            "target_device": device, "front_position": position}  # fmt: skip


def export_stage(cfg: Config, backend: Backend | None = None) -> dict[str, Any]:
    """Export the knee point of the run's front (the compute as a task on ``backend``)."""
    store = open_run(cfg)
    if load_front(store).empty:
        raise RuntimeError("the search produced no feasible subnet to export (every trial failed or broke the budget)")
    return export_from_run(store, knee=True, backend=backend)

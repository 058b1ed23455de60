"""``flora-ray profile``: the run's latency table, measured on a node of the target kind.

The driver lists the items the run's (full) space needs (``core.latency.profile_items``), skips those the table
already holds (a re-run resumes), and measures the rest in ``profile_task`` calls, a chunk at a time, each a task
that asks for ``profile.resources`` (so that on a cluster it lands on the kind of node the model will be deployed
on). After every chunk the table is written (atomically) into the run with the device's description in its
metadata. Timing: ``torch.utils.benchmark.Timer.blocked_autorange`` (warm-up, blocks of runs, CUDA synchronised),
``profile.threads`` intra-op threads, ``profile.dtype``, random weights (latency does not depend on them).
"""

from __future__ import annotations

import copy
import json
import logging
import platform
import time
from collections.abc import Callable, Mapping
from typing import Any

import pandas as pd
import torch
from torch import nn

from flora_ray.backends.base import Backend
from flora_ray.config import Config
from flora_ray.core.cost import build_cost_model
from flora_ray.core.families import family_of
from flora_ray.core.latency import (
    LatencyModel,
    calibration_configs,
    describe_item,
    empty_table,
    missing_items,
    profile_items,
)
from flora_ray.core.lowrank import build_static_layer, low_rank_is_cheaper
from flora_ray.core.models import ModelSpec
from flora_ray.core.space import RankSpace
from flora_ray.core.surgery import swap_modules
from flora_ray.core.timing import time_ms, torch_threads
from flora_ray.errors import InputError, MissingInput
from flora_ray.results import LATENCY_DEVICE_KEY, load_latency_table
from flora_ray.search.objectives import resolve_bounds
from flora_ray.stages.inputs import full_space, open_run, provenance, resolve_model_spec
from flora_ray.storage.run_store import ARTEFACTS, RunStore

logger = logging.getLogger(__name__)

DEVICE_KEY = LATENCY_DEVICE_KEY
CHUNK = 12  # items per profile task: a table is written (and progress logged) after each
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def profile_resources(cfg: Config) -> dict[str, float]:
    """What the profile task (and export's latency measurement) asks for: ``profile.resources``, by default
    ``profile.threads`` CPUs and, for ``cuda``, one accelerator."""
    if cfg.profile.resources:
        return dict(cfg.profile.resources)
    resources = {"CPU": float(cfg.profile.threads)}
    if cfg.profile.device == "cuda":
        resources[cfg.scaling.accelerator] = 1.0
    return resources


def profile_bundles(cfg: Config) -> list[dict[str, float]]:
    """What the stage asks Ray for (``flora-ray plan``): one profile task; nothing when profiling is off."""
    return [profile_resources(cfg)] if cfg.profile.enabled else []


def profile_skipped(cfg: Config, *, workload: Any) -> str | None:
    """Why the stage will have nothing to do (``flora-ray plan``)."""
    return None if cfg.profile.enabled else "profile.enabled is false"


def profile_time(cfg: Config, *, workload: Any) -> tuple[float, str]:
    """The plan's wall time of the stage and its source: every item of ``workload`` (``plan.Workload``) timed at every
    batch size for ``profile.min_run_time``, half as much again for set-up. Not a MAC count: timing is the workload."""
    sizes = len(cfg.profile.batch_sizes)
    seconds = workload.profile_items * sizes * cfg.profile.min_run_time * 1.5
    return seconds, f"{workload.profile_items} items x {sizes} batch sizes x profile.min_run_time"


def describe_profile(summary: Mapping[str, Any], *, seconds: float) -> str:
    """What ``flora-ray profile`` prints: the table's size and device, per batch size the dense latency and the
    calibration (``profile_summary``)."""
    device = summary["device"]
    lines = [f"profile: done in {seconds:.0f} s, {summary['rows']} rows on {device.get('name')} "
             f"({device.get('dtype')}, {device.get('threads')} thread(s))"]  # fmt: skip
    for batch, b in summary["batches"].items():
        lines.append(
            f"  batch {batch}: dense {b['dense_ms']:.3f} ms predicted (rest {b['rest_ms']:.3f} ms); calibration "
            f"x{b['scale']:.3f} {b['offset_ms']:+.3f} ms, error {100 * (b['calibration_mape'] or 0):.1f}% on the "
            "measured uniform models"
        )
    return "\n".join(lines)


def profile_settings(cfg: Config) -> dict[str, Any]:
    return {
        "device": cfg.profile.device,
        "dtype": cfg.profile.dtype,
        "threads": cfg.profile.threads,
        "min_run_time": cfg.profile.min_run_time,
    }


def device_description(device: torch.device, dtype: str, threads: int) -> dict[str, Any]:
    """What the latency was measured on: CPU model or GPU name, torch version, threads, dtype."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
    return {"device": device.type, "name": name, "cpu": cpu, "torch": torch.__version__, "threads": threads,
            "dtype": dtype}  # fmt: skip


class ZeroCostLinear(nn.Module):
    """Stands in for a factorised Linear when the rest of the model is timed: returns a tensor of the output's
    shape, made once per input shape, so that everything downstream runs on realistic values at no Linear cost."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features
        self.outputs: dict[tuple, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (*x.shape[:-1], self.out_features)
        out = self.outputs.get(shape)
        if out is None:
            out = self.outputs[shape] = torch.randn(shape, device=x.device, dtype=x.dtype)
        return out


def static_model(dense: nn.Module, ranks: Mapping[str, int]) -> nn.Module:
    """A copy of ``dense`` with each layer of ``ranks`` in the form an exported subnet runs it (random weights)."""
    model = copy.deepcopy(dense)

    def replace(linear: nn.Module, fqn: str) -> nn.Module:
        if not low_rank_is_cheaper(linear.in_features, linear.out_features, ranks[fqn]):
            return linear
        layer = build_static_layer(linear.in_features, linear.out_features, ranks[fqn], linear.bias is not None)
        return layer.to(device=linear.weight.device, dtype=linear.weight.dtype)

    swap_modules(model, lambda m, fqn: fqn in ranks and isinstance(m, nn.Linear), replace)
    return model.eval()


def model_input(model: nn.Module, spec: ModelSpec, batch: int, device: torch.device, dtype) -> torch.Tensor:
    height, width = family_of(model).img_size(model)
    return torch.randn(batch, int(spec.kwargs.get("in_chans", 3)), height, width, device=device, dtype=dtype)


def block_inputs(model: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, tuple[tuple, dict]]:
    """The positional and keyword inputs each block ``names`` receives in one forward pass of ``x``."""
    seen: dict[str, tuple[tuple, dict]] = {}
    hooks = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda m, args, kwargs, name=name: seen.setdefault(name, (args, kwargs)), with_kwargs=True
        )
        for name in names
    ]
    try:
        model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def item_runner(item: dict, dense: nn.Module, stubbed: nn.Module, x: torch.Tensor, inputs: dict) -> Callable[[], Any]:
    """A no-argument callable running one table item once."""
    if item["kind"] == "linear":
        rank = item["rank"] if item["form"] == "lowrank" else None
        size = (item["in_features"], item["out_features"])
        layer = build_static_layer(*size, rank, item["bias"]) if rank else nn.Linear(*size, bias=item["bias"])
        layer = layer.to(device=x.device, dtype=x.dtype).eval()
        rows = torch.randn(x.shape[0], item["tokens"], item["in_features"], device=x.device, dtype=x.dtype)
        return lambda: layer(rows)
    if item["kind"] == "rest" and item["scope"] == "model":
        return lambda: stubbed(x)
    if item["kind"] == "rest":
        block, (args, kwargs) = stubbed.get_submodule(item["scope"]), inputs[item["scope"]]
        return lambda: block(*args, **kwargs)
    model = static_model(dense, json.loads(item["ranks"]))
    return lambda: model(x)


@torch.no_grad()
def profile_task(
    spec_dict: dict, space_dict: dict, items: list[dict], batch: int, settings: dict
) -> tuple[list[dict], dict]:
    """Measure ``items`` at ``batch`` on this node; returns the table rows and the device description."""
    device = torch.device(settings["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "profile.device=cuda but this node has no CUDA device: ask for a GPU node in profile.resources"
        )
    dtype = DTYPES[settings["dtype"]]
    with torch_threads(settings["threads"]):
        spec = ModelSpec.from_dict(spec_dict)
        targets = RankSpace.from_dict(space_dict).fqns
        dense = spec.create(device=device).to(dtype).eval()
        stubbed = copy.deepcopy(dense)
        swap_modules(stubbed, lambda m, fqn: fqn in targets, lambda m, fqn: ZeroCostLinear(m.out_features))
        x = model_input(dense, spec, batch, device, dtype)
        scopes = [i["scope"] for i in items if i["kind"] == "rest" and i["scope"] != "model"]
        inputs = block_inputs(stubbed, x, scopes) if scopes else {}
        rows = []
        for item in items:
            ms, iqr, n = time_ms(
                item_runner(item, dense, stubbed, x, inputs), settings["threads"], settings["min_run_time"]
            )
            rows.append({**item, "batch": batch, "ms": ms, "iqr_ms": iqr, "measurements": n})
        return rows, device_description(device, settings["dtype"], settings["threads"])


def read_table(store: RunStore) -> tuple[pd.DataFrame | None, dict[str, Any]]:
    """The run's latency table and its device description (``None, {}`` before any profile)."""
    if not store.is_file(ARTEFACTS.latency_table):
        return None, {}
    return load_latency_table(store)


def check_same_device(stored: Mapping[str, Any], measured: Mapping[str, Any], where: str) -> None:
    keys = ("device", "name", "dtype", "threads")
    if stored and any(stored.get(k) != measured.get(k) for k in keys):
        before = ", ".join(f"{k}={stored.get(k)}" for k in keys)
        now = ", ".join(f"{k}={measured.get(k)}" for k in keys)
        raise InputError(
            f"{where} was measured on {before}; this profile ran on {now}: profile on the same kind of node "
            "(profile.resources) or remove the table to measure it again"
        )


def profile_stage(cfg: Config, backend: Backend) -> dict[str, Any]:
    """Measure every missing item of the run's latency table; returns a summary with the dense latency."""
    if not cfg.profile.enabled:
        return {"skipped": "profile.enabled is false"}
    store = open_run(cfg)
    spec = resolve_model_spec(cfg)
    space = full_space(cfg)
    cost = build_cost_model(spec.create(device="meta"))
    items = profile_items(space, cost, calibration_configs(space))
    table, device = read_table(store)
    table = empty_table() if table is None else table
    todo = {batch: missing_items(table, items, batch) for batch in cfg.profile.batch_sizes}
    total, done, started = sum(len(v) for v in todo.values()), 0, time.perf_counter()
    logger.info("profile: %d items x %d batch sizes, %d to measure", len(items), len(todo), total)
    for batch, pending in todo.items():
        for start in range(0, len(pending), CHUNK):
            chunk = pending[start : start + CHUNK]
            rows, measured_on = backend.call(
                profile_task, spec.to_dict(), space.to_dict(), chunk, batch, profile_settings(cfg),
                resources=profile_resources(cfg), retries=cfg.run.max_failures,
            )  # fmt: skip
            check_same_device(device, measured_on, store.location(ARTEFACTS.latency_table))
            device = measured_on
            table = pd.concat([table, pd.DataFrame(rows)], ignore_index=True) if len(table) else pd.DataFrame(rows)
            store.write_parquet(ARTEFACTS.latency_table, table, provenance(cfg, latency_device=json.dumps(device)))
            done += len(chunk)
            last = rows[-1]
            logger.info("profile: %d/%d measured (batch %d: %s %.3f ms), %.0f s", done, total, batch,
                        describe_item(last), last["ms"], time.perf_counter() - started)  # fmt: skip
    summary = profile_summary(cfg, table, device, space, cost)
    if cfg.search.uses_latency:  # a latency budget no configuration meets: say so now, before any training
        resolve_bounds(cfg.search, space, cost, LatencyModel.from_table(table, space, cost, cfg.profile.search_batch))
    return summary


def profile_summary(cfg: Config, table: pd.DataFrame, device: dict, space: RankSpace, cost) -> dict[str, Any]:
    """Per batch size: the measured dense latency and how well the calibrated sum predicts the measured models."""
    batches = {}
    for batch in cfg.profile.batch_sizes:
        model = LatencyModel.from_table(table, space, cost, batch, device)
        batches[str(batch)] = {
            "dense_ms": model.dense_ms,
            "rest_ms": model.rest_ms,
            "scale": model.scale,
            "offset_ms": model.offset,
            "calibration_mape": model.fit.get("mape"),
        }
    return {"device": device, "rows": len(table), "batches": batches}


def missing_table(store: RunStore) -> MissingInput:
    return MissingInput(
        f"the search uses latency but {store.location(ARTEFACTS.latency_table)!r} does not exist: run "
        "`flora-ray profile CONFIG` first"
    )


def run_latency_model(cfg: Config, store: RunStore, space: RankSpace, cost) -> LatencyModel | None:
    """The run's latency predictor at ``profile.batch`` for ``space`` (``None`` without a table); raises when the
    search needs latency and the run has no table."""
    table, device = read_table(store)
    if table is None:
        if cfg.search.uses_latency:
            raise missing_table(store)
        return None
    return LatencyModel.from_table(table, space, cost, cfg.profile.search_batch, device)

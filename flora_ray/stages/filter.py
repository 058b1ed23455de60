"""The filter stage: one task per block on the backend, each block's result kept as soon as it finishes.

The dense teacher's weights go to the workers once (numpy arrays, zero-copy in Ray's object store); each task
builds the block's local supernet from them and runs ``search.filtering.filter_block`` (training through the one
``Trainer``, then scoring). Finished blocks are stored under ``filter/`` so an interrupted run resumes there; at the
end the kept tuples become the run's ``space.json`` and every candidate's score ``filter_scores.parquet``, with why it
was kept (``kept_for``: the full-rank tuple, the score ranking, or for reach: ``filter.cost_floor``,
``filter.cost_bins``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import pyarrow as pa
import torch

from flora_ray.backends.base import Backend, TaskMap
from flora_ray.config import Config, build_dataclass, config_to_dict
from flora_ray.core.cost import build_cost_model
from flora_ray.core.space import RankSpace
from flora_ray.data.datasets import build_datasets, eval_subset
from flora_ray.data.listing import run_listing
from flora_ray.errors import InputError
from flora_ray.search.evaluator import batchnorm_calibration
from flora_ray.search.filtering import (
    as_numpy_state,
    cost_floor_macs,
    filter_block,
    floor_thresholds,
    kept_space,
    select,
)
from flora_ray.stages.inputs import (
    factorize_model,
    full_space,
    load_teacher,
    open_run,
    provenance,
    resolve_model_spec,
)
from flora_ray.stages.preflight import preflight
from flora_ray.storage.run_store import ARTEFACTS, RunStore
from flora_ray.training.worker import Feed, loader_workers, run_device, setup_worker

logger = logging.getLogger(__name__)

SCORES_SCHEMA = pa.schema(
    [
        ("block", pa.string()),
        ("block_index", pa.int32()),
        ("candidate", pa.int32()),
        ("ranks", pa.list_(pa.int32())),
        ("ranks_by_fqn", pa.string()),
        ("macs", pa.int64()),
        ("accuracy", pa.float64()),
        ("score", pa.float64()),
        ("kept", pa.bool_()),
        ("kept_for", pa.string()),  # full_rank, score, floor or coverage (the last two for reach); null if dropped
        ("mode", pa.string()),
    ]
)
REACH = ("floor", "coverage", "uniform")


def filter_task(shared: tuple[dict[str, Any], dict[str, Any]], block_index: int) -> dict[str, Any]:
    """Filter one block: ``shared`` is ``(config dict, teacher state as numpy arrays)``."""
    config, teacher_state = shared
    cfg: Config = build_dataclass(Config, config, "")
    setup_worker(cfg.run.threads_per_worker, cfg.run.seed + block_index)
    device = run_device(cfg, "scaling.use_gpu")
    subset = None if cfg.filter.subset >= 1 else cfg.filter.subset
    splits = build_datasets(replace(cfg.data, train_subset=subset), pixels=("train",), listing=run_listing(cfg))
    search = eval_subset(splits.search, cfg.filter.eval_images, cfg.data.seed)  # stratified, as the search's
    spec = resolve_model_spec(cfg)
    state = {k: torch.from_numpy(v.copy()) for k, v in teacher_state.items()}
    teacher, dense = spec.create(device="cpu"), spec.create(device="cpu")
    teacher.load_state_dict(state)
    dense.load_state_dict(state)
    supernet = factorize_model(cfg, dense)
    teacher.requires_grad_(False)
    workers = loader_workers(cfg.data.workers, cfg.filter.cpus_per_task)
    feed = Feed(workers, splits.preprocess, cfg.data.augment)
    calibration = batchnorm_calibration(cfg, supernet.model, workers)  # None without BatchNorm: nothing loaded
    return filter_block(
        supernet.to(device), teacher.eval().to(device), block_index, splits.train, search, cfg.filter,
        cfg.run.seed, device, feed, calibration,
    )  # fmt: skip


def task_resources(cfg: Config) -> dict[str, float]:
    """What one block's task asks for: ``filter.cpus_per_task`` CPUs and, with ``scaling.use_gpu``, one
    accelerator (``GPU`` or the custom resource)."""
    resources = {"CPU": cfg.filter.cpus_per_task}
    if cfg.scaling.use_gpu:
        resources[cfg.scaling.accelerator] = 1
    return resources


def filter_bundles(cfg: Config) -> list[dict[str, float]]:
    """What the stage asks Ray for at once (``flora-ray plan``): ``filter.concurrency`` block tasks when local
    supernets are trained, one scoring task with ``zero_training``."""
    return [task_resources(cfg)] * (cfg.filter.concurrency if cfg.filter.mode == "local_supernet" else 1)


def filter_work(cfg: Config, *, workload: Any) -> float:
    """The stage's MACs for ``flora-ray plan`` (``workload``: a ``plan.Workload``): per block, every candidate scored on
    ``filter.eval_images`` and, with local supernets, ``filter.epochs`` over ``filter.subset`` of the training data
    (forward + backward + the teacher's forward: 4 forward passes)."""
    scoring = workload.candidates * cfg.filter.eval_images * workload.dense_macs  # every triple scored, per block
    if cfg.filter.mode != "local_supernet":
        return scoring * workload.blocks
    per_block = cfg.filter.epochs * cfg.filter.subset * workload.train_images * 4 * workload.dense_macs
    return (per_block + scoring) * workload.blocks


def filter_parallel(cfg: Config, *, workload: Any, cluster: bool) -> float:
    """Blocks filtered at once (``flora-ray plan``)."""
    return min(cfg.filter.concurrency, workload.blocks) if cfg.filter.mode == "local_supernet" else 1


def describe_filter(summary: Mapping[str, Any], *, seconds: float) -> str:
    """What ``flora-ray filter`` prints: candidates kept per block, the space before and after, the files."""
    return (
        f"filter: done in {seconds:.0f} s; kept {summary['kept_per_block']} of "
        f"{summary['candidates_per_block'][0]} candidates per block; space {summary['configs_before']:.3g} -> "
        f"{summary['configs_after']:.3g} configurations\n  {summary['space']}\n  {summary['scores']}"
    )


def filter_stage(cfg: Config, backend: Backend) -> dict[str, Any]:
    """Filter every unfinished block on ``backend``; returns a summary (kept counts, seconds, output names)."""
    store = open_run(cfg)
    preflight(cfg, "filter", store)
    space = full_space(cfg)
    done = finished_blocks(store, space)
    todo = [i for i in range(len(space.blocks)) if i not in done]
    started = time.perf_counter()
    if todo:
        (teacher,) = load_teacher(cfg, store)
        shared = (config_to_dict(cfg), as_numpy_state(teacher.state_dict()))
        del teacher
        results = backend.map(
            TaskMap(filter_task, shared, todo, task_resources(cfg), cfg.filter.concurrency, cfg.run.max_failures)
        )
        for finished, (index, result) in enumerate(results, start=1):
            store.write_json(ARTEFACTS.filter_block(index), result)
            done[index] = result
            eta = (time.perf_counter() - started) / finished * (len(todo) - finished)
            logger.info(
                "filter: block %s done in %.1f s (%d/%d blocks, ETA %.0f s)",
                result["block"], result["seconds"], len(done), len(space.blocks), eta,
            )  # fmt: skip
    return write_filter_outputs(cfg, store, space, done, time.perf_counter() - started)


def finished_blocks(store: RunStore, space: RankSpace) -> dict[int, dict[str, Any]]:
    """The blocks whose results are already in the store (checked against the space)."""
    done = {}
    for i, block in enumerate(space.blocks):
        name = ARTEFACTS.filter_block(i)
        if not store.is_file(name):
            continue
        result = store.read_json(name, "filter block result")
        rows = result.get("rows", []) if isinstance(result, dict) else []
        if result.get("block") != block.name or [tuple(r["ranks"]) for r in rows] != list(block.candidates):
            raise InputError(
                f"{store.location(name)!r} does not belong to this model's space (block {block.name}); "
                "delete the run's filter/ directory or use another run name"
            )
        done[i] = result
    return done


def write_filter_outputs(
    cfg: Config, store: RunStore, space: RankSpace, done: dict[int, dict[str, Any]], seconds: float
) -> dict[str, Any]:
    """Apply the keep rule to every block; write ``space.json`` and ``filter_scores.parquet``; summarise."""
    full = space.largest()
    floor = run_cost_floor(cfg, space)
    blocks = [done[i]["rows"] for i in range(len(space.blocks))]
    full_macs = next(r["macs"] for r in blocks[0] if tuple(r["ranks"]) == tuple(full[f] for f in space.blocks[0].fqns))
    thresholds = floor_thresholds(blocks, full_macs, floor)
    uniform = list(space.uniform_all().values()) if cfg.filter.keep_uniform else []
    rows = []
    for block, block_rows, threshold in zip(space.blocks, blocks, thresholds, strict=True):
        full_tuple = tuple(full[f] for f in block.fqns)
        tuples = [tuple(config[f] for f in block.fqns) for config in uniform]
        select(block_rows, full_tuple, cfg.filter.keep_fraction, cfg.filter.score, threshold, cfg.filter.cost_bins,
               tuples)  # fmt: skip
        for row in block_rows:
            row["ranks_by_fqn"] = json.dumps(dict(zip(block.fqns, row["ranks"], strict=True)))
            row["mode"] = cfg.filter.mode
        rows.extend(block_rows)
    filtered = kept_space(space, rows)
    store.write_json(ARTEFACTS.space, filtered.to_dict())
    table = pa.Table.from_pylist(rows, schema=SCORES_SCHEMA)
    store.write_parquet(ARTEFACTS.filter_scores, table, provenance(cfg, mode=cfg.filter.mode))
    before, after = space.num_configs, filtered.num_configs
    kept_per_block = [len(b.candidates) for b in filtered.blocks]
    reach = [sum(r["kept_for"] in REACH for r in block_rows) for block_rows in blocks]
    cheapest = full_macs - sum(full_macs - min(r["macs"] for r in b if r["kept"]) for b in blocks)
    logger.info(
        "filter: kept %s of %d candidates per block (%s for reach); space %.3g -> %.3g configurations; cheapest "
        "%.4g MACs (floor %s)",
        kept_per_block, len(space.blocks[0].candidates), reach, before, after, cheapest, floor,
    )  # fmt: skip
    return {
        "space": store.location(ARTEFACTS.space),
        "scores": store.location(ARTEFACTS.filter_scores),
        "kept_per_block": kept_per_block,
        "kept_for_reach_per_block": reach,
        "candidates_per_block": [len(b.candidates) for b in space.blocks],
        "configs_before": before,
        "configs_after": after,
        "cost_floor_macs": floor,
        "cheapest_macs": cheapest,
        "seconds": seconds,
        "block_seconds": [done[i]["seconds"] for i in sorted(done)],
    }


def run_cost_floor(cfg: Config, space: RankSpace) -> float | None:
    """``filter.cost_floor`` of the run in MACs per image (checked against the full space)."""
    if cfg.filter.cost_floor is None:
        return None
    cost = build_cost_model(resolve_model_spec(cfg).create(device="meta"))
    return cost_floor_macs(cfg.filter.cost_floor, space, cost)

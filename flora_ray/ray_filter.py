"""Ray glue for filtering: one Ray task per block, outputs written atomically, finished blocks skipped.

``run_filter(cfg)`` puts the dense teacher's weights in the object store once (numpy arrays), runs
``filtering.filter_block`` for every unfinished block with at most ``filter.concurrency`` tasks in flight, saves
each block's rows to ``filter/block_NNN.json`` as soon as it finishes (so an interrupted run resumes there), and
finally writes ``space.json`` and ``filter_scores.parquet`` into the run directory.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from flora_ray.config import Config, config_to_dict, dump_config
from flora_ray.search.filtering import as_numpy_state, filter_block, kept_space, select
from flora_ray.storage.files import read_json, write_json, write_parquet, write_text
from flora_ray.training.trainer import SPACE_FILE, full_space, provenance, resolve_model_spec, teacher_source

logger = logging.getLogger(__name__)

SCORES_FILE = "filter_scores.parquet"
BLOCKS_DIR = "filter"


def _build(cfg: Config, teacher_state: dict[str, Any], device: torch.device):
    from flora_ray.core.supernet import build_supernet

    spec = resolve_model_spec(cfg)
    state = {k: torch.from_numpy(v.copy()) for k, v in teacher_state.items()}
    teacher = spec.create(device="cpu")
    teacher.load_state_dict(state)
    dense = spec.create(device="cpu")
    dense.load_state_dict(state)
    supernet = build_supernet(
        dense,
        model_name=spec.name,
        model_kwargs=spec.kwargs,
        ratios=cfg.model.ratios,
        include_proj=cfg.model.include_proj,
        targets=cfg.model.targets,
        sv_placement=cfg.model.sv_placement,
    )
    teacher.requires_grad_(False)
    return supernet.to(device), teacher.eval().to(device)


def _filter_task(config: dict[str, Any], teacher_state: dict[str, Any], block_index: int) -> dict[str, Any]:
    from dataclasses import replace

    from flora_ray.config import build_dataclass
    from flora_ray.data.datasets import build_datasets

    cfg: Config = build_dataclass(Config, config, "")
    if cfg.run.threads_per_worker:
        torch.set_num_threads(cfg.run.threads_per_worker)
    torch.manual_seed(cfg.run.seed + block_index)
    on_gpu = cfg.scaling.use_gpu and cfg.scaling.accelerator == "GPU"  # a custom accelerator: CPU torch
    device = torch.device("cuda" if on_gpu and torch.cuda.is_available() else "cpu")
    subset = None if cfg.filter.subset >= 1 else cfg.filter.subset
    splits = build_datasets(replace(cfg.data, train_subset=subset))
    supernet, teacher = _build(cfg, teacher_state, device)
    return filter_block(supernet, teacher, block_index, splits.train, splits.search, cfg.filter, cfg.run.seed, device)


def run_filter(cfg: Config) -> dict[str, Any]:
    """Filter every block on Ray; returns a summary (blocks, kept counts, seconds, output paths)."""
    import ray

    run_dir = cfg.run.run_dir.resolve()
    blocks_dir = run_dir / BLOCKS_DIR
    blocks_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / "filter_config.yaml", dump_config(cfg))
    spec = resolve_model_spec(cfg)
    space = full_space(cfg)
    done = _finished_blocks(blocks_dir, space)
    todo = [i for i in range(len(space.blocks)) if i not in done]
    started = time.perf_counter()
    if todo:
        teacher = spec.create(pretrained=teacher_source(cfg, run_dir))  # any source: run teacher, file, hub cache
        teacher_ref = ray.put(as_numpy_state(teacher.state_dict()))
        del teacher
        options: dict[str, Any] = {"num_cpus": cfg.filter.cpus_per_task}
        if cfg.scaling.use_gpu:
            if cfg.scaling.accelerator == "GPU":
                options["num_gpus"] = 1
            else:
                options["resources"] = {cfg.scaling.accelerator: 1}
        task = ray.remote(_filter_task).options(**options)
        config = config_to_dict(cfg)
        pending: dict[Any, int] = {}
        queue = list(todo)
        while queue or pending:
            while queue and len(pending) < cfg.filter.concurrency:
                index = queue.pop(0)
                pending[task.remote(config, teacher_ref, index)] = index
            ready, _ = ray.wait(list(pending), num_returns=1)
            index = pending.pop(ready[0])
            result = ray.get(ready[0])
            write_json(blocks_dir / f"block_{index:03d}.json", result)
            done[index] = result
            elapsed = time.perf_counter() - started
            finished = len(todo) - len(queue) - len(pending)
            eta = elapsed / finished * (len(todo) - finished)
            logger.info(
                "filter: block %s done in %.1f s (%d/%d blocks, ETA %.0f s)",
                result["block"],
                result["seconds"],
                len(done),
                len(space.blocks),
                eta,
            )
    return _write_outputs(cfg, run_dir, space, done, time.perf_counter() - started)


def _finished_blocks(blocks_dir: Path, space) -> dict[int, dict[str, Any]]:
    done = {}
    for i, block in enumerate(space.blocks):
        path = blocks_dir / f"block_{i:03d}.json"
        if not path.is_file():
            continue
        result = read_json(path, "filter block result")
        rows = result.get("rows", []) if isinstance(result, dict) else []
        if result.get("block") != block.name or [tuple(r["ranks"]) for r in rows] != list(block.candidates):
            raise ValueError(
                f"{str(path)!r} does not belong to this model's space (block {block.name}); "
                "delete the run's filter/ directory or use another run name"
            )
        done[i] = result
    return done


def _write_outputs(
    cfg: Config, run_dir: Path, space, done: dict[int, dict[str, Any]], seconds: float
) -> dict[str, Any]:
    full = space.largest()
    rows = []
    for i, block in enumerate(space.blocks):
        block_rows = select(
            done[i]["rows"], tuple(full[f] for f in block.fqns), cfg.filter.keep_fraction, cfg.filter.score
        )
        for row in block_rows:
            row["ranks_by_fqn"] = json.dumps(dict(zip(block.fqns, row["ranks"], strict=True)))
            row["mode"] = cfg.filter.mode
        rows.extend(block_rows)
    filtered = kept_space(space, rows)
    filtered.save(run_dir / SPACE_FILE)
    table = pa.Table.from_pylist(
        rows,
        schema=pa.schema(
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
                ("mode", pa.string()),
            ]
        ),
    )
    write_parquet(run_dir / SCORES_FILE, table, provenance(cfg, mode=cfg.filter.mode))
    before, after = space.num_configs, filtered.num_configs
    kept_per_block = [len(b.candidates) for b in filtered.blocks]
    logger.info(
        "filter: kept %s of %d candidates per block; space %.3g -> %.3g configurations",
        kept_per_block,
        len(space.blocks[0].candidates),
        before,
        after,
    )
    return {
        "space": str(run_dir / SPACE_FILE),
        "scores": str(run_dir / SCORES_FILE),
        "kept_per_block": kept_per_block,
        "candidates_per_block": [len(b.candidates) for b in space.blocks],
        "configs_before": before,
        "configs_after": after,
        "seconds": seconds,
        "block_seconds": [done[i]["seconds"] for i in sorted(done)],
    }

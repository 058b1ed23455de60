"""Low-rank aware candidate filtering, one block at a time (docs/design.md, section 3).

For block i, a *local supernet* varies only block i's rank tuple (uniform sampling) while every other block stays
at full rank; it is trained from the inherited (SVD) weights by distillation on a seeded subset of the training
data. Every candidate tuple of block i is then scored on the search split. Candidates share everything before
block i, so that prefix runs once and its output is cached; each candidate only runs blocks i.. onwards.

``filter_block`` does one block and returns plain rows; ``select`` applies the keep rule: the faithful score
ranking, then (improvements) the reach rules that keep a configured cost floor reachable (``cost_floor_macs``,
``floor_thresholds``) and each block's cost range covered (``coverage``). The fan-out over blocks and the output
files live in ``stages.filter``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from flora_ray.config import UNIFORM_MIN, FilterConfig, parse_budget
from flora_ray.core.batchnorm import (
    BatchNormCalibration,
    batchnorm_state,
    has_batchnorm,
    load_batchnorm_state,
)
from flora_ray.core.cost import CostModel
from flora_ray.core.families import family_of
from flora_ray.core.space import RankSpace
from flora_ray.core.supernet import Supernet
from flora_ray.errors import InputError
from flora_ray.training.callbacks import Progress
from flora_ray.training.sampling import BlockwiseSampler
from flora_ray.training.tasks import SupernetTask
from flora_ray.training.trainer import LocalSession, Trainer
from flora_ray.training.worker import Feed, distributed_loader

logger = logging.getLogger(__name__)

Forward = Callable[[torch.Tensor], torch.Tensor]
PLAIN_FEED = Feed()  # no loader processes, batches are model inputs


def local_space(space: RankSpace, block_index: int) -> RankSpace:
    """The space of local supernet ``block_index``: that block's candidates, every other block at full rank."""
    full = space.largest()
    kept = {}
    for i, block in enumerate(space.blocks):
        if i != block_index:
            kept[block.name] = [tuple(full[f] for f in block.fqns)]
    return space.restrict(kept)


def split_forward(model: nn.Module, block_name: str) -> tuple[Forward, Forward]:
    """``(prefix, suffix)`` with ``suffix(prefix(x)) == model(x)``; ``prefix`` stops just before ``block_name``.

    The split comes from the model's registered family (``families.family_of``; built in: timm ViT/DeiT,
    ``blocks.i``, and Swin, ``layers.s.blocks.j``). Other models, and block names the family cannot split at,
    get an identity prefix and the full forward as suffix (correct, without the caching).
    """
    family = family_of(model)
    if family is not None and family.split_forward is not None:
        split = family.split_forward(model, block_name)
        if split is not None:
            return split
    return (lambda x: x), model


def train_local_supernet(
    supernet: Supernet,
    teacher: nn.Module,
    block_index: int,
    dataset,
    cfg: FilterConfig,
    seed: int,
    device: torch.device,
    feed: Feed = PLAIN_FEED,
) -> list[float]:
    """Distil local supernet ``block_index`` for ``cfg.epochs`` epochs with the one ``Trainer``; returns the mean
    loss of each epoch. Batches are shuffled per epoch from ``seed`` and fed as ``feed`` says; subnets drawn per
    step as in supernet training."""
    sampler = BlockwiseSampler(local_space(supernet.space, block_index), "uniform")
    loader, epoch_sampler = distributed_loader(
        dataset, cfg.batch_size, 1, 0, seed, "filter", feed.workers, device, random_items=feed.random_items
    )
    task = SupernetTask(supernet, teacher, sampler, seed, temperature=cfg.temperature)
    name = f"filter {supernet.space.blocks[block_index].name}"
    trainer = Trainer(
        task, cfg, LocalSession(device=str(device)), loader, name, [Progress(cfg.log_every)], train_sampler=epoch_sampler,
        evaluate=False, prepare=feed.prepare,
    )  # fmt: skip
    history = trainer.fit()
    supernet.eval()
    return [epoch["loss"] for epoch in history]


@torch.no_grad()
def score_candidates(
    supernet: Supernet,
    block_index: int,
    dataset,
    device: torch.device,
    batch_size: int = 500,
    calibration: BatchNormCalibration | None = None,
) -> list[float]:
    """Top-1 accuracy (%) of every candidate of block ``block_index`` (others at full rank) on ``dataset``.

    Batch by batch: the shared prefix (everything before the block) runs once per batch, then every candidate runs
    the rest on it; memory stays at one batch's activations whatever the number of images. With a ``calibration``,
    every candidate is scored with its own BatchNorm statistics (``candidate_batchnorm_states``), and the
    supernet's own statistics are put back afterwards.
    """
    space = supernet.space
    block = space.blocks[block_index]
    prefix, suffix = split_forward(supernet.model, block.name)
    supernet.eval()
    base = space.largest()
    configs = [{**base, **dict(zip(block.fqns, candidate, strict=True))} for candidate in block.candidates]
    shared = batchnorm_state(supernet.model)  # {} without BatchNorm
    states = candidate_batchnorm_states(supernet, [base, *configs], calibration)
    correct, total = [0] * len(configs), 0
    try:
        for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            supernet.set_ranks(base)
            if states:
                load_batchnorm_state(supernet.model, states[0])
            hidden, y = prefix(x.to(device)), y.to(device)
            for index, config in enumerate(configs):
                supernet.set_ranks(config)
                if states:
                    load_batchnorm_state(supernet.model, states[index + 1])
                correct[index] += (suffix(hidden).argmax(-1) == y).sum().item()
            total += len(y)
    finally:
        if states:  # the supernet keeps its own statistics
            load_batchnorm_state(supernet.model, shared)
    return [100.0 * c / max(total, 1) for c in correct]


def candidate_batchnorm_states(
    supernet: Supernet, configs: list[dict[str, int]], calibration: BatchNormCalibration | None
) -> list[dict[str, torch.Tensor]]:
    """The BatchNorm statistics of each of ``configs`` recalibrated on ``calibration`` (``[]`` without one, or
    when the model has no BatchNorm). Every configuration shares the full-rank prefix before the scored block, so
    the prefix's statistics are the same in each, and the cached prefix output stays valid for all of them."""
    if calibration is None or not has_batchnorm(supernet.model):
        return []
    states = []
    for config in configs:
        supernet.set_ranks(config)
        calibration(supernet.model)
        states.append(batchnorm_state(supernet.model))
    return states


def filter_block(
    supernet: Supernet,
    teacher: nn.Module,
    block_index: int,
    train_subset,
    search,
    cfg: FilterConfig,
    seed: int,
    device: torch.device,
    feed: Feed = PLAIN_FEED,
    calibration: BatchNormCalibration | None = None,
) -> dict[str, Any]:
    """Train (unless zero-training) and score one block on all of ``search``; returns ``{"block", "rows",
    "seconds", "losses"}``; ``feed``: how the local supernet's training is fed; ``calibration``: each candidate's
    BatchNorm statistics (``score_candidates``)."""
    started = time.perf_counter()
    losses = []
    if cfg.mode == "local_supernet":
        losses = train_local_supernet(
            supernet, teacher, block_index, train_subset, cfg, seed + block_index, device, feed
        )
    accuracies = score_candidates(supernet, block_index, search, device, calibration=calibration)
    block = supernet.space.blocks[block_index]
    base = supernet.space.largest()
    rows = []
    for index, (candidate, acc) in enumerate(zip(block.candidates, accuracies, strict=True)):
        ranks = {**base, **dict(zip(block.fqns, candidate, strict=True))}
        rows.append(
            {
                "block": block.name,
                "block_index": block_index,
                "candidate": index,
                "ranks": list(candidate),
                "macs": supernet.cost.macs(ranks),
                "accuracy": acc,
            }
        )
    return {"block": block.name, "rows": rows, "seconds": time.perf_counter() - started, "losses": losses}


def score_rows(rows: list[dict[str, Any]], full: tuple[int, ...], score: str) -> None:
    """Add ``score`` (lower is better) to one block's rows, as ``select`` describes."""
    reference = next((r for r in rows if tuple(r["ranks"]) == full), None)
    if reference is None:
        raise ValueError(f"block {rows[0]['block']!r} has no full-rank candidate {list(full)}")
    for row in rows:
        if score == "accuracy":
            row["score"] = -row["accuracy"]
            continue
        saved = (reference["macs"] - row["macs"]) / reference["macs"]
        drop = reference["accuracy"] - row["accuracy"]
        if row is reference:
            row["score"] = -math.inf
        elif saved <= 0:
            row["score"] = math.inf
        else:
            row["score"] = drop / saved if drop > 0 else drop * saved


def select(
    rows: list[dict[str, Any]],
    full: tuple[int, ...],
    keep_fraction: float,
    score: str,
    floor_macs: float | None = None,
    cost_bins: int = 0,
    uniform: Sequence[tuple[int, ...]] = (),
) -> list[dict[str, Any]]:
    """Add ``score`` (lower is better), ``kept`` and ``kept_for`` to one block's rows.

    ``flops_aware``: accuracy lost per fraction of the network's MACs saved, relative to the full-rank tuple
    (a tuple that saves nothing scores +inf); ties go to the cheaper tuple. A tuple that loses nothing (or gains)
    scores ``-gain * saved`` <= 0 instead: ahead of every lossy tuple, and the more it saves the better (the plain
    ratio would rank a small saving above a large one at the same gain). ``accuracy``: minus the accuracy.
    ``ceil(keep_fraction * n)`` tuples are kept, the full-rank tuple always among them (``kept_for``:
    ``full_rank``, ``score``). Then, for reach (improvements, ``filter.cost_floor`` and ``filter.cost_bins``):
    unless a kept row costs at most ``floor_macs`` (the block's share of the cost floor, in the rows' unit: the
    network's MACs with this block at the tuple), the best-scoring row that does is kept (``floor``); and the
    best-scoring row of each of ``cost_bins`` equal bins of the block's MAC range is kept (``coverage``), so that
    score noise cannot drop a whole stretch of the cost range; and the block's ``uniform`` tuples are kept
    (``uniform``: every uniform configuration stays searchable). Rows not kept have ``kept_for`` ``None``.
    """
    score_rows(rows, full, score)
    n_keep = max(1, math.ceil(keep_fraction * len(rows)))
    order = sorted(rows, key=lambda r: (tuple(r["ranks"]) != full, r["score"], r["macs"], r["candidate"]))
    reasons: dict[int, str] = {id(order[0]): "full_rank", **{id(r): "score" for r in order[1:n_keep]}}
    if floor_macs is not None and not any(r["macs"] <= floor_macs for r in order[:n_keep]):
        cheap = [r for r in order if r["macs"] <= floor_macs]
        if not cheap:
            raise InputError(
                f"block {rows[0]['block']!r}: no candidate costs at most {floor_macs:.6g} MACs (its share of "
                "filter.cost_floor)"
            )
        reasons.setdefault(id(cheap[0]), "floor")
    for best in coverage(order, cost_bins):
        reasons.setdefault(id(best), "coverage")
    for row in order:
        if tuple(row["ranks"]) in set(uniform):
            reasons.setdefault(id(row), "uniform")
    for row in rows:
        row["kept_for"] = reasons.get(id(row))
        row["kept"] = row["kept_for"] is not None
    return rows


def coverage(order: list[dict[str, Any]], bins: int) -> list[dict[str, Any]]:
    """The first row (in ``order``: best score first) of each of ``bins`` equal bins of the rows' MAC range."""
    if bins <= 0 or not order:
        return []
    low, high = min(r["macs"] for r in order), max(r["macs"] for r in order)
    best: dict[int, dict[str, Any]] = {}
    for row in order:
        index = 0 if high == low else min(int((row["macs"] - low) / (high - low) * bins), bins - 1)
        best.setdefault(index, row)
    return [best[i] for i in sorted(best)]


def floor_thresholds(blocks: list[list[dict[str, Any]]], full_macs: float, floor: float | None) -> list[float | None]:
    """Each block's share of a cost floor, in the rows' unit (the network's MACs with that block at a tuple and
    the others at full rank): the floor's saving ``full_macs - floor`` shared in proportion to each block's
    largest possible saving. A configuration of one kept tuple per block at or below its share costs at most
    ``floor`` (costs are sums over layers). ``None`` per block without a floor; raises when no configuration
    reaches the floor."""
    if floor is None:
        return [None] * len(blocks)
    cheapest = [min(r["macs"] for r in rows) for rows in blocks]
    needed, possible = full_macs - floor, sum(full_macs - c for c in cheapest)
    if needed <= 0:  # the full-rank configuration is already at or below the floor
        return [float(full_macs)] * len(blocks)
    if needed > possible:
        raise InputError(
            f"filter.cost_floor={floor:.6g} MACs is below the cheapest configuration of the space "
            f"({full_macs - possible:.6g} MACs)"
        )
    share = needed / possible
    return [max(float(c), full_macs - share * (full_macs - c)) for c in cheapest]


def cost_floor_macs(value: float | str | None, space: RankSpace, cost: CostModel) -> float | None:
    """``filter.cost_floor`` in MACs per image (``uniform_min``: the cheapest uniform configuration's, a share:
    of the dense model's); raises when it is below the cheapest configuration of ``space``."""
    if value is None:
        return None
    if value == UNIFORM_MIN:
        floor = float(min(cost.macs(config) for config in space.uniform_all().values()))
    else:
        amount, relative = parse_budget(value)
        floor = amount * cost.dense_macs if relative else amount
    cheapest = float(cost.macs(space.smallest()))
    if floor < cheapest:
        raise InputError(
            f"filter.cost_floor={value!r} ({floor:.4g} MACs) is below the cheapest configuration of the space "
            f"({cheapest:.4g} MACs; dense {cost.dense_macs:.4g}): raise it, or use {UNIFORM_MIN!r}"
        )
    return floor


def kept_space(space: RankSpace, rows: list[dict[str, Any]]) -> RankSpace:
    """The filtered space: per block, the kept tuples in their original order."""
    kept: dict[str, list[tuple[int, ...]]] = {}
    for row in sorted(rows, key=lambda r: (r["block_index"], r["candidate"])):
        if row["kept"]:
            kept.setdefault(row["block"], []).append(tuple(row["ranks"]))
    missing = [b.name for b in space.blocks if b.name not in kept]
    if missing:
        raise ValueError(f"filter results lack block {missing[0]!r}")
    return space.restrict(kept)


def as_numpy_state(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """A state dict as numpy arrays (for Ray's object store, zero-copy on the same node)."""
    return {k: v.detach().cpu().numpy() for k, v in state.items()}

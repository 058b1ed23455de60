"""Search building blocks without Ray: genes, subnet evaluation with inherited weights, the evaluator cache.

A gene is one categorical parameter per block, named by the block (``blocks.3``), whose value indexes that
block's kept candidate tuples, so that any crossover of two configurations stays inside the filtered space.

An ``Evaluator`` holds one supernet and a fixed batch of search-split images. ``cached_evaluator`` keeps one per
process and key, so an evaluator actor that Ray Tune reuses across trials builds its supernet once: from numpy
weights (Ray's object store) on the ``meta`` device, loaded with ``assign=True`` (no copy, no initialisation).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from flora_ray.core.batchnorm import BatchNormCalibration, has_batchnorm
from flora_ray.core.models import ModelSpec
from flora_ray.core.space import RankConfig, RankSpace
from flora_ray.core.supernet import Supernet, elastic_skeleton
from flora_ray.results import binomial_se, pack_correct

logger = logging.getLogger(__name__)


def genes_to_config(space: RankSpace, genes: Mapping[str, Any]) -> RankConfig:
    """The rank configuration of one gene per block (an index into the block's candidates)."""
    tuples = []
    for block in space.blocks:
        if block.name not in genes:
            raise ValueError(f"no gene for block {block.name!r}")
        index = int(genes[block.name])
        if not 0 <= index < len(block.candidates):
            raise ValueError(f"gene {block.name}={index} is out of range 0..{len(block.candidates) - 1}")
        tuples.append(block.candidates[index])
    return space.from_block_tuples(tuples)


def config_to_genes(space: RankSpace, config: Mapping[str, int]) -> dict[str, int]:
    """The genes of a configuration of the space."""
    config = space.validate(config)
    return {
        block.name: block.candidates.index(cand)
        for block, cand in zip(space.blocks, space.block_tuples(config), strict=True)
    }


def uniform_points(space: RankSpace) -> dict[float, dict[str, int]]:
    """Genes of every uniform configuration the space contains, by ratio."""
    return {ratio: config_to_genes(space, config) for ratio, config in space.uniform_configs().items()}


def anchor_points(space: RankSpace) -> list[dict[str, int]]:
    """Genes the search evaluates first: every uniform configuration the space contains (the baseline, on the same
    footing as the searched subnets), then the space's cheapest configuration, so that the first generation spans
    the whole cost range (NSGA-II crossover and mutation then explore between the ends)."""
    points = list(uniform_points(space).values())
    cheapest = config_to_genes(space, space.smallest())
    return points if cheapest in points else [*points, cheapest]


def module_from_numpy(build: Callable[[str], torch.nn.Module], state: Mapping[str, np.ndarray]) -> torch.nn.Module:
    """``build(device)`` on ``meta`` loaded with ``assign=True`` from numpy weights (no copy); built on the CPU and
    loaded by copy instead when non-persistent buffers (Swin's relative position index, attention masks, LeViT's
    attention-bias indices), which no state dict holds, would stay on ``meta``."""
    with warnings.catch_warnings():  # object-store arrays are read-only; evaluation never writes to them
        warnings.simplefilter("ignore", UserWarning)
        tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}
    model = build("meta")
    model.load_state_dict(tensors, strict=True, assign=True)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        model = build("cpu")
        model.load_state_dict(tensors, strict=True)
    return model


def supernet_from_numpy(
    header: Mapping[str, Any], state: Mapping[str, np.ndarray], device: torch.device | str = "cpu"
) -> Supernet:
    """A supernet from a checkpoint header and numpy weights (see ``module_from_numpy``)."""
    spec = ModelSpec.from_dict(header["model"])
    space = RankSpace.from_dict(header["space"], source="supernet header")
    model = module_from_numpy(lambda where: elastic_skeleton(spec, space.fqns, where, source="supernet header"), state)
    return Supernet(model.to(device).eval(), space, spec, header.get("sv_placement", "faithful"))


class Evaluator:
    """Accuracy of subnets with inherited supernet weights on a fixed set of search images.

    ``images`` may be uint8 pixels (one shared read-only copy per node from Ray's object store), turned into model
    inputs batch by batch on the device by ``preprocess``; float images are used as they are. With a
    ``calibration``, each subnet's BatchNorm statistics are recalibrated on its training images before it is
    scored (``core.batchnorm``); ``None`` (the default, and always for models without BatchNorm): the supernet's.
    """

    def __init__(
        self,
        supernet: Supernet,
        images: torch.Tensor,
        labels: torch.Tensor,
        device: torch.device | str = "cpu",
        batch_size: int = 500,
        preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
        calibration: BatchNormCalibration | None = None,
    ) -> None:
        self.supernet = supernet.eval()
        self.calibration = calibration
        self.device = torch.device(device)
        self.images = images
        self.labels = labels
        self.batch_size = batch_size
        self.preprocess = preprocess

    @torch.no_grad()
    def model_correct(self, model: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray:
        """Whether ``model`` (on this evaluator's device) gets each image right, in image order."""
        correct = []
        for start in range(0, len(self.labels), self.batch_size):
            x = self.images[start : start + self.batch_size].to(self.device, non_blocking=True)
            y = self.labels[start : start + self.batch_size].to(self.device, non_blocking=True)
            if self.preprocess is not None:
                x = self.preprocess(x)
            correct.append((model(x).argmax(-1) == y).cpu())
        return torch.cat(correct).numpy()

    def model_accuracy(self, model: Callable[[torch.Tensor], torch.Tensor]) -> float:
        """Top-1 accuracy (%) of ``model`` (on this evaluator's device) on the images."""
        return 100.0 * float(self.model_correct(model).mean())

    def accuracy(self, config: Mapping[str, int]) -> float:
        """Top-1 accuracy (%) of the subnet ``config``."""
        self.supernet.set_ranks(config, within_candidates=False)
        if self.calibration is not None:
            self.calibration(self.supernet.model)
        return self.model_accuracy(self.supernet)

    def model_metrics(self, model: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, Any]:
        """``accuracy`` (%), its binomial standard error ``accuracy_se`` (points), ``eval_images`` and ``correct``
        (per-image correctness, ``results.pack_correct``: the same images for every subnet, so any two can be
        compared paired)."""
        correct = self.model_correct(model)
        accuracy = 100.0 * float(correct.mean())
        return {
            "accuracy": accuracy,
            "accuracy_se": binomial_se(accuracy, len(correct)),
            "eval_images": len(correct),
            "correct": pack_correct(correct),
        }

    def evaluate(self, config: Mapping[str, int]) -> dict[str, Any]:
        """``model_metrics``, ``macs``, ``params`` and ``eval_seconds`` of the subnet ``config`` (its BatchNorm
        statistics recalibrated first, as in ``accuracy``, when the evaluator has a ``calibration``)."""
        config = self.supernet.space.validate(config, complete=False)
        if len(config) != len(self.supernet.space.fqns):
            raise ValueError(f"configuration has {len(config)} of {len(self.supernet.space.fqns)} layers")
        started = time.perf_counter()
        self.supernet.set_ranks(config, within_candidates=False)
        if self.calibration is not None:
            self.calibration(self.supernet.model)
        metrics = self.model_metrics(self.supernet)
        return {
            **metrics,
            "macs": float(self.supernet.cost.macs(config)),
            "params": float(self.supernet.cost.params(config)),
            "eval_seconds": time.perf_counter() - started,
        }


def build_evaluator(
    header: Mapping[str, Any],
    weights: Mapping[str, np.ndarray],
    config: Mapping[str, Any],
    images: np.ndarray,
    labels: np.ndarray,
) -> Evaluator:
    """An evaluator from a supernet checkpoint (header and numpy weights), a run configuration (a plain dict) and
    the search images (uint8 pixels from ``search_images``, used in place: no copy)."""
    from flora_ray.config import Config, build_dataclass
    from flora_ray.data.datasets import preprocess_for
    from flora_ray.training.worker import loader_workers, run_device, setup_worker

    cfg: Config = build_dataclass(Config, config, "")
    setup_worker(cfg.run.threads_per_worker)
    device = run_device(cfg, "search.gpus_per_trial")
    supernet = supernet_from_numpy(header, weights, device)
    with warnings.catch_warnings():  # object-store arrays are read-only; evaluation never writes to them
        warnings.simplefilter("ignore", UserWarning)
        pixels, targets = torch.from_numpy(images), torch.from_numpy(labels)
    calibration = batchnorm_calibration(
        cfg, supernet.model, loader_workers(cfg.data.workers, cfg.search.cpus_per_trial)
    )
    return Evaluator(
        supernet, pixels, targets, device, cfg.search.batch_size, preprocess_for(cfg.data), calibration=calibration
    )


def batchnorm_calibration(cfg, model: torch.nn.Module, workers: int = 0) -> BatchNormCalibration | None:
    """The run's BatchNorm recalibration set for ``model`` (``search.bn_recalibration_images`` training images in
    batches of ``train.batch_size``); ``None``, with no data loaded, when that is 0 or ``model`` has no BatchNorm."""
    from flora_ray.data.datasets import calibration_images
    from flora_ray.data.listing import run_listing

    if cfg.search.bn_recalibration_images == 0 or not has_batchnorm(model):
        return None
    images, preprocess = calibration_images(
        cfg.data, cfg.search.bn_recalibration_images, workers, listing=run_listing(cfg)
    )
    return BatchNormCalibration(images, cfg.train.batch_size, preprocess)


def search_images(config: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The run's search images: ``search.eval_images`` of the search split, stratified by class (seeded by
    ``data.seed``), as uint8 pixels ``(N, C, H, W)`` and int64 labels, decoded by ``data.workers`` loader processes
    (default: one per evaluator CPU beyond the first). Built once per search, shared by every evaluator."""
    from flora_ray.config import Config, build_dataclass
    from flora_ray.data.datasets import build_datasets, eval_subset
    from flora_ray.data.listing import run_listing
    from flora_ray.training.worker import loader_workers

    cfg: Config = build_dataclass(Config, config, "")
    search = build_datasets(cfg.data, pixels=("search",), listing=run_listing(cfg)).search
    subset = eval_subset(search, cfg.search.eval_images, cfg.data.seed)
    workers = loader_workers(cfg.data.workers, cfg.search.cpus_per_trial)
    images, labels = search_batch(subset, len(subset), workers=workers)
    return images.numpy(), labels.numpy()


def search_batch(dataset, n_images: int, seed: int = 0, workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_images`` of a dataset, stratified by class and seeded, as two tensors (the same images for every
    trial), decoded by ``workers`` loader processes."""
    from torch.utils.data import DataLoader

    from flora_ray.data.datasets import eval_subset

    subset = eval_subset(dataset, n_images, seed)
    xs, ys = [], []
    for x, y in DataLoader(subset, batch_size=256, num_workers=workers):
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys).to(torch.int64)


class _EvaluatorCache:
    """One evaluator per key and process (the one process-level state of flora-ray, by design)."""

    evaluators: dict[str, Evaluator] = {}  # noqa: RUF012
    builds = 0


def cached_evaluator(key: str, build: Callable[[], Evaluator]) -> Evaluator:
    """The process's evaluator for ``key``, built by ``build()`` the first time only."""
    cache = _EvaluatorCache
    if key not in cache.evaluators:
        started = time.perf_counter()
        cache.evaluators.clear()  # one supernet per process: a new key replaces the old one
        cache.evaluators[key] = build()
        cache.builds += 1
        logger.info("evaluator %s built in %.1f s", key, time.perf_counter() - started)
    return cache.evaluators[key]


def evaluator_builds() -> int:
    """How many evaluators this process has built (tests count supernet loads with it)."""
    return _EvaluatorCache.builds

"""Model workloads and step timing shared by the timing benchmarks.

``STEP_WORKLOADS``, ``configs_for`` and ``interleaved_step_times`` are the supernet-step versus extracted-subnet
step measurement of ``supernet_step.py``, which ``throughput.py`` repeats; ``latency_workloads`` are the models
``latency.py`` and ``latency_predictor.py`` time.
"""

from __future__ import annotations

import random
import statistics
import time

import torch
import torch.nn.functional as F
from harness import EXPERIMENTS

import flora_ray as fr
from flora_ray.config import load_config
from flora_ray.stages.inputs import resolve_model_spec
from flora_ray.training.optim import build_optimizer

STEP_WORKLOADS = {
    # name: (timm model, kwargs, batch)
    "quickstart-vit": ("test_vit", {"img_size": 32, "patch_size": 4, "in_chans": 1, "num_classes": 10}, 64),
    "deit-tiny-224": ("deit_tiny_patch16_224", {}, 8),
}


def interleaved_step_times(
    models: list[torch.nn.Module], x: torch.Tensor, y: torch.Tensor, steps: int, warmup: int
) -> list[float]:
    """Median seconds of one optimisation step of each model, the models' steps interleaved so that drifts in
    machine speed hit all of them alike. The optimiser is flora-ray's (fused AdamW with its parameter groups)."""
    optimizers = [build_optimizer(m, 1e-4, 0.01) for m in models]
    times: list[list[float]] = [[] for _ in models]
    for m in models:
        m.train()
    for i in range(warmup + steps):
        for model, optimizer, bucket in zip(models, optimizers, times, strict=True):
            start = time.perf_counter()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if i >= warmup:
                bucket.append(time.perf_counter() - start)
    return [statistics.median(bucket) for bucket in times]


def configs_for(space: fr.RankSpace, rng: random.Random) -> dict[str, dict[str, int]]:
    """The configurations of a step comparison: largest, the middle uniform ratio, smallest and two random ones."""
    uniform = space.uniform_configs()
    ratios = sorted(uniform)
    out = {
        "largest": space.largest(),
        f"uniform {ratios[len(ratios) // 2]:.2f}": uniform[ratios[len(ratios) // 2]],
        "smallest": space.smallest(),
    }
    for i in range(2):
        out[f"random {i}"] = space.from_block_tuples([rng.choice(b.candidates) for b in space.blocks])
    return out


def latency_workloads(smoke: bool) -> dict[str, tuple[str, dict, tuple[float, ...] | None]]:
    """name: (timm model, kwargs, rank ratios); the quickstart model comes from ``experiments/quickstart.yaml``."""
    cfg = load_config(EXPERIMENTS / "quickstart.yaml")
    spec = resolve_model_spec(cfg)
    out = {"quickstart-vit": (spec.name, dict(spec.kwargs), cfg.model.ratios)}
    if not smoke:
        out["deit-tiny-224"] = ("deit_tiny_patch16_224", {}, None)
        out["deit-small-224"] = ("deit_small_patch16_224", {}, None)
    return out

"""Subnet samplers for supernet training: replaceable strategies over a (filtered) rank space.

Every step draws from a generator seeded by ``(seed, epoch, step)`` alone (``step_generator``), so all
data-parallel workers draw the same configuration without communicating, a resumed run draws exactly what an
uninterrupted one would have, and the sampler holds no state that a checkpoint must carry.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from typing import Protocol

import numpy as np

from flora_ray.core.space import RankConfig, RankSpace
from flora_ray.errors import InputError


def step_generator(seed: int, epoch: int, step: int) -> np.random.Generator:
    """The generator of one training step; identical on every worker."""
    return np.random.default_rng([seed, epoch, step])


def config_digest(config: Mapping[str, int]) -> int:
    """A 62-bit digest of a rank configuration (to compare configurations across workers)."""
    data = json.dumps(sorted(config.items())).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big") >> 2


class Sampler(Protocol):
    """Draws the configurations trained in one step (gradients of several are accumulated)."""

    def sample(self, rng: np.random.Generator) -> list[RankConfig]: ...


class BlockwiseSampler:
    """Draws each block's tuple independently with fixed per-block probabilities.

    Args:
        space: The (filtered) rank space.
        weighting: ``lowrank``: probability proportional to ``1 / prod(ratios)`` of the tuple (FLORA's low-rank
            aware sampling, which spends training on low ranks); ``uniform``: equal probabilities.
    """

    def __init__(self, space: RankSpace, weighting: str = "lowrank") -> None:
        if weighting not in ("lowrank", "uniform"):
            raise InputError(f"weighting={weighting!r} is not supported; use 'lowrank' or 'uniform'")
        self.space = space
        self.weighting = weighting
        self.probabilities = [self._block_probabilities(block) for block in space.blocks]

    def _block_probabilities(self, block) -> np.ndarray:
        if self.weighting == "uniform":
            weights = np.ones(len(block.candidates))
        else:
            weights = np.array(
                [
                    1.0 / math.prod(self.space.ratio_of(f, r) for f, r in zip(block.fqns, cand, strict=True))
                    for cand in block.candidates
                ]
            )
        return weights / weights.sum()

    def sample(self, rng: np.random.Generator) -> list[RankConfig]:
        tuples = [
            block.candidates[rng.choice(len(block.candidates), p=p)]
            for block, p in zip(self.space.blocks, self.probabilities, strict=True)
        ]
        return [self.space.from_block_tuples(tuples)]


class SandwichSampler:
    """The sandwich rule (an extension, not FLORA's recipe): largest, smallest and one low-rank aware draw."""

    def __init__(self, space: RankSpace) -> None:
        self.inner = BlockwiseSampler(space, "lowrank")
        self.largest = space.largest()
        self.smallest = space.smallest()

    def sample(self, rng: np.random.Generator) -> list[RankConfig]:
        return [self.largest, self.smallest, *self.inner.sample(rng)]


def build_sampler(name: str, space: RankSpace) -> Sampler:
    """``lowrank`` (default), ``uniform`` or ``sandwich``."""
    if name == "sandwich":
        return SandwichSampler(space)
    if name in ("lowrank", "uniform"):
        return BlockwiseSampler(space, name)
    raise InputError(f"sampler {name!r} is not supported; use lowrank, uniform or sandwich")

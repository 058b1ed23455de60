"""The rank search space: per-layer rank choices and per-block candidate tuples, keyed by FQN.

A *rank configuration* is a ``dict[str, int]`` from a factorised layer's FQN to its rank. Ratios exist only at
the configuration boundary: a ratio ``rho`` of a layer with full rank ``k`` is the rank ``round(rho * k)``
(half rounds up, at least 1). A block's candidates are tuples of ranks over its layers in module order
(``(qkv, fc1, fc2)`` by default); the full space is the product of the layers' choices, a filtered space keeps a
subset per block. The space round-trips through versioned JSON.
"""

from __future__ import annotations

import difflib
import itertools
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flora_ray.core.surgery import TargetLayer
from flora_ray.errors import InputError, MissingInput
from flora_ray.storage.files import read_json, write_json

SPACE_FORMAT = "flora-ray/space"
SPACE_VERSION = 1

EIGHTHS = tuple(i / 8 for i in range(1, 9) if i != 7)  # DeiT-B: 1/8 .. 6/8, 1
SIXTHS = tuple(i / 6 for i in range(1, 7))  # DeiT-S: 1/6 .. 1

# Reference ratio lists (docs/design.md, section 1); the first matching pattern wins.
RATIO_PRESETS: tuple[tuple[str, tuple[float, ...]], ...] = (
    (r"^(deit|vit)_base", EIGHTHS),
    (r"^(deit|vit)_small", SIXTHS),
)
DEFAULT_RATIOS = SIXTHS

RankConfig = dict[str, int]


def default_ratios(model_name: str | None) -> tuple[float, ...]:
    """The reference ratio list for DeiT-B / DeiT-S (and ViT-B / ViT-S); sixths for anything else."""
    for pattern, ratios in RATIO_PRESETS:
        if model_name and re.search(pattern, model_name):
            return ratios
    return DEFAULT_RATIOS


def rank_for_ratio(ratio: float, max_rank: int) -> int:
    """``round(ratio * max_rank)`` with halves rounded up, at least 1."""
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio <= 1:
        raise InputError(f"rank ratio {ratio!r} is out of range: ratios must be in (0, 1]")
    return max(1, math.floor(ratio * max_rank + 0.5))


@dataclass(frozen=True)
class LayerChoices:
    """The ranks one factorised layer may take."""

    fqn: str
    in_features: int
    out_features: int
    rank_choices: tuple[int, ...]

    @property
    def max_rank(self) -> int:
        return min(self.in_features, self.out_features)


@dataclass(frozen=True)
class BlockChoices:
    """The candidate rank tuples of one block, over its layers ``fqns`` in order."""

    name: str
    fqns: tuple[str, ...]
    candidates: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class RankSpace:
    """Per-layer rank choices plus per-block candidate tuples.

    Build one with ``RankSpace.from_targets``; ``supernet.build_supernet`` does it for you.
    """

    layers: tuple[LayerChoices, ...]
    blocks: tuple[BlockChoices, ...]
    ratios: tuple[float, ...]
    model: str | None = None
    _by_fqn: dict[str, LayerChoices] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_fqn", {layer.fqn: layer for layer in self.layers})
        self._check_consistent()

    # --- construction ---------------------------------------------------------------------------------------

    @classmethod
    def from_targets(
        cls,
        targets: Sequence[TargetLayer],
        ratios: Sequence[float] | None = None,
        model: str | None = None,
    ) -> RankSpace:
        """The full space over ``targets`` with ranks from ``ratios`` (default: ``default_ratios(model)``)."""
        ratios = tuple(float(r) for r in (ratios if ratios is not None else default_ratios(model)))
        if not ratios:
            raise InputError("ratios is empty: give at least one rank ratio in (0, 1]")
        layers = []
        for t in targets:
            max_rank = min(t.in_features, t.out_features)
            choices = tuple(sorted({rank_for_ratio(r, max_rank) for r in ratios}))
            layers.append(LayerChoices(t.fqn, t.in_features, t.out_features, choices))
        by_fqn = {layer.fqn: layer for layer in layers}
        block_names = list(dict.fromkeys(t.block for t in targets))
        blocks = []
        for name in block_names:
            fqns = tuple(t.fqn for t in targets if t.block == name)
            product = itertools.product(*(by_fqn[f].rank_choices for f in fqns))
            blocks.append(BlockChoices(name, fqns, tuple(product)))
        return cls(tuple(layers), tuple(blocks), tuple(sorted(set(ratios))), model)

    def restrict(self, kept: Mapping[str, Iterable[Sequence[int]]]) -> RankSpace:
        """A filtered space that keeps, per block name, only the given candidate tuples."""
        unknown = sorted(set(kept) - {b.name for b in self.blocks})
        if unknown:
            raise InputError(f"unknown block {unknown[0]!r}; blocks are {[b.name for b in self.blocks]}")
        blocks = []
        for block in self.blocks:
            if block.name not in kept:
                blocks.append(block)
                continue
            wanted = [tuple(int(r) for r in c) for c in kept[block.name]]
            allowed = set(block.candidates)
            for cand in wanted:
                if cand not in allowed:
                    raise InputError(f"candidate {list(cand)} is not in block {block.name!r} of this space")
            blocks.append(BlockChoices(block.name, block.fqns, tuple(dict.fromkeys(wanted))))
        return RankSpace(self.layers, tuple(blocks), self.ratios, self.model)

    # --- queries ----------------------------------------------------------------------------------------------

    @property
    def fqns(self) -> tuple[str, ...]:
        return tuple(layer.fqn for layer in self.layers)

    def layer(self, fqn: str) -> LayerChoices:
        try:
            return self._by_fqn[fqn]
        except KeyError:
            raise InputError(f"unknown layer {fqn!r}{_did_you_mean(fqn, self._by_fqn)}") from None

    @property
    def num_configs(self) -> int:
        """The number of configurations in the space (product of the blocks' candidate counts)."""
        return math.prod(len(b.candidates) for b in self.blocks)

    def validate(self, ranks: Mapping[str, Any], complete: bool = True) -> RankConfig:
        """Check a rank configuration and return it as ``{fqn: int}`` in layer order.

        Raises:
            ValueError: an unknown FQN, a rank that is not one of its layer's choices, a missing layer (when
                ``complete``), or a block tuple that a filtered space does not contain.
        """
        if not isinstance(ranks, Mapping):
            raise InputError(f"a rank configuration is a mapping from layer FQN to rank, got {type(ranks).__name__}")
        for fqn, rank in ranks.items():
            layer = self.layer(fqn)
            if isinstance(rank, bool) or not isinstance(rank, int) or rank not in layer.rank_choices:
                raise InputError(
                    f"rank {rank!r} for layer {fqn!r} is not one of its choices {list(layer.rank_choices)}"
                )
        if not complete:
            return {f: int(ranks[f]) for f in self.fqns if f in ranks}
        missing = [f for f in self.fqns if f not in ranks]
        if missing:
            raise InputError(f"rank configuration has no rank for layer {missing[0]!r} ({len(missing)} missing)")
        config = {f: int(ranks[f]) for f in self.fqns}
        for block, cand in zip(self.blocks, self.block_tuples(config), strict=True):
            if cand not in set(block.candidates):
                raise InputError(f"ranks {list(cand)} of block {block.name!r} are not among its kept candidates")
        return config

    def block_tuples(self, ranks: Mapping[str, int]) -> list[tuple[int, ...]]:
        """The per-block rank tuples of a configuration."""
        return [tuple(int(ranks[f]) for f in block.fqns) for block in self.blocks]

    def from_block_tuples(self, tuples: Sequence[Sequence[int]]) -> RankConfig:
        """The configuration made of one rank tuple per block, in block order."""
        if len(tuples) != len(self.blocks):
            raise InputError(f"expected {len(self.blocks)} block tuples, got {len(tuples)}")
        config: RankConfig = {}
        for block, cand in zip(self.blocks, tuples, strict=True):
            if len(cand) != len(block.fqns):
                raise InputError(f"block {block.name!r} needs {len(block.fqns)} ranks, got {list(cand)}")
            config.update({f: int(r) for f, r in zip(block.fqns, cand, strict=True)})
        return self.validate(config)

    def from_ratios(self, ratios: Sequence[Sequence[float]]) -> RankConfig:
        """A configuration from per-block ratio tuples (the reference ``SVD_CONFIG`` layout)."""
        if len(ratios) != len(self.blocks):
            raise InputError(f"ratio list has {len(ratios)} blocks but the model has {len(self.blocks)}")
        tuples = []
        for block, row in zip(self.blocks, ratios, strict=True):
            if len(row) != len(block.fqns):
                raise InputError(f"block {block.name!r} needs {len(block.fqns)} ratios, got {list(row)}")
            tuples.append([rank_for_ratio(r, self.layer(f).max_rank) for f, r in zip(block.fqns, row, strict=True)])
        return self.from_block_tuples(tuples)

    def uniform_all(self) -> dict[float, RankConfig]:
        """The uniform configuration of every ratio, whether or not a filter kept its tuples."""
        return {r: {layer.fqn: rank_for_ratio(r, layer.max_rank) for layer in self.layers} for r in self.ratios}

    def uniform(self, ratio: float) -> RankConfig:
        """Every layer at ``round(ratio * max_rank)``."""
        return self.validate({layer.fqn: rank_for_ratio(ratio, layer.max_rank) for layer in self.layers})

    def uniform_configs(self) -> dict[float, RankConfig]:
        """The uniform configuration of each ratio that this space contains, keyed by ratio."""
        out = {}
        for ratio in self.ratios:
            config = {layer.fqn: rank_for_ratio(ratio, layer.max_rank) for layer in self.layers}
            if self.contains(config):
                out[ratio] = config
        return out

    def contains(self, ranks: Mapping[str, int]) -> bool:
        try:
            self.validate(ranks)
        except ValueError:
            return False
        return True

    def largest(self) -> RankConfig:
        """Per block, the candidate with the most weights (every layer at full rank in a full space)."""
        return self._extreme(max)

    def smallest(self) -> RankConfig:
        """Per block, the candidate with the fewest weights (every layer at its lowest rank in a full space)."""
        return self._extreme(min)

    def _extreme(self, pick) -> RankConfig:
        tuples = []
        for block in self.blocks:
            widths = [self.layer(f).in_features + self.layer(f).out_features for f in block.fqns]
            tuples.append(
                pick(block.candidates, key=lambda c, w=widths: (sum(r * x for r, x in zip(c, w, strict=False)), c))
            )
        return self.from_block_tuples(tuples)

    def ratio_of(self, fqn: str, rank: int) -> float:
        """``rank / max_rank`` of a layer (used by the low-rank aware sampler)."""
        return rank / self.layer(fqn).max_rank

    # --- serialisation -------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SPACE_FORMAT,
            "version": SPACE_VERSION,
            "model": self.model,
            "ratios": list(self.ratios),
            "layers": [
                {
                    "fqn": layer.fqn,
                    "in_features": layer.in_features,
                    "out_features": layer.out_features,
                    "rank_choices": list(layer.rank_choices),
                }
                for layer in self.layers
            ],
            "blocks": [
                {"name": b.name, "fqns": list(b.fqns), "candidates": [list(c) for c in b.candidates]}
                for b in self.blocks
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "space") -> RankSpace:
        if not isinstance(data, Mapping) or data.get("format") != SPACE_FORMAT:
            raise InputError(f"{source} is not a flora-ray space file (no format {SPACE_FORMAT!r})")
        if data.get("version") != SPACE_VERSION:
            raise InputError(
                f"{source} has space version {data.get('version')!r}; this flora-ray reads {SPACE_VERSION}"
            )
        try:
            layers = tuple(
                LayerChoices(
                    str(d["fqn"]),
                    int(d["in_features"]),
                    int(d["out_features"]),
                    tuple(int(r) for r in d["rank_choices"]),
                )
                for d in data["layers"]
            )
            blocks = tuple(
                BlockChoices(str(d["name"]), tuple(d["fqns"]), tuple(tuple(int(r) for r in c) for c in d["candidates"]))
                for d in data["blocks"]
            )
            ratios = tuple(float(r) for r in data["ratios"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{source} is malformed ({type(exc).__name__}: {exc}); regenerate it") from exc
        return cls(layers, blocks, ratios, data.get("model"))

    def save(self, path: str | os.PathLike) -> None:
        """Write the space as JSON, atomically."""
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> RankSpace:
        return cls.from_dict(read_json(path, "space file"), source=f"space file {str(path)!r}")

    def check_compatible(self, other: RankSpace, source: str = "space file") -> None:
        """Raise unless ``other`` describes the same layers (FQNs and shapes) and blocks as this space."""
        mine = [(layer.fqn, layer.in_features, layer.out_features) for layer in self.layers]
        theirs = [(layer.fqn, layer.in_features, layer.out_features) for layer in other.layers]
        if mine != theirs or [b.fqns for b in self.blocks] != [b.fqns for b in other.blocks]:
            diff = next(((a, b) for a, b in zip(mine, theirs, strict=False) if a != b), None)
            detail = f"first difference {diff[1]} vs {diff[0]}" if diff else f"{len(theirs)} vs {len(mine)} layers"
            raise InputError(
                f"{source} was made for another model ({other.model or 'unknown'}; {detail}); "
                f"regenerate it for {self.model or 'this model'}"
            )

    # --- internal ------------------------------------------------------------------------------------------

    def _check_consistent(self) -> None:
        if len(self._by_fqn) != len(self.layers):
            raise InputError("space lists a layer twice")
        seen: set[str] = set()
        for block in self.blocks:
            if not block.candidates:
                raise InputError(f"block {block.name!r} has no candidates")
            for fqn in block.fqns:
                layer = self.layer(fqn)
                if fqn in seen:
                    raise InputError(f"layer {fqn!r} belongs to two blocks")
                seen.add(fqn)
                if not layer.rank_choices or not all(1 <= r <= layer.max_rank for r in layer.rank_choices):
                    raise InputError(f"layer {fqn!r} has rank choices outside 1..{layer.max_rank}")
            for cand in block.candidates:
                if len(cand) != len(block.fqns) or any(
                    r not in self._by_fqn[f].rank_choices for f, r in zip(block.fqns, cand, strict=False)
                ):
                    raise InputError(f"candidate {list(cand)} of block {block.name!r} is not a valid rank tuple")
        if seen != set(self._by_fqn):
            raise InputError(f"layer {sorted(set(self._by_fqn) - seen)[0]!r} belongs to no block")


def _did_you_mean(name: str, names: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(names), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


# --- rank files --------------------------------------------------------------------------------------------------


def load_reference_yaml(path: str | os.PathLike, space: RankSpace) -> RankConfig:
    """A configuration from a reference FLORA subnet YAML (``MODEL.DEIT.SVD_CONFIG``: one ratio triple per block).

    The reference format is positional; triple ``i`` is mapped to the FQNs of the space's block ``i`` and the
    file's ``DEPTH`` / ``EMBED_DIM`` (when present) are checked against the model.
    """
    p = Path(path)
    if not p.is_file():
        raise MissingInput(f"rank file {str(p)!r} does not exist")
    try:
        doc = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise InputError(f"rank file {str(p)!r} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    deit = ((doc or {}).get("MODEL") or {}).get("DEIT") if isinstance(doc, dict) else None
    if not isinstance(deit, dict) or "SVD_CONFIG" not in deit:
        raise InputError(f"rank file {str(p)!r} has no MODEL.DEIT.SVD_CONFIG (the reference subnet format)")
    rows = deit["SVD_CONFIG"]
    if not isinstance(rows, list) or not all(isinstance(r, list) for r in rows):
        raise InputError(f"MODEL.DEIT.SVD_CONFIG in {str(p)!r} must be a list of [qkv, fc1, fc2] ratio lists")
    if "DEPTH" in deit and int(deit["DEPTH"]) != len(space.blocks):
        raise InputError(f"rank file {str(p)!r} is for a {deit['DEPTH']}-block model; this one has {len(space.blocks)}")
    if "EMBED_DIM" in deit and space.layers and int(deit["EMBED_DIM"]) != space.layers[0].in_features:
        raise InputError(
            f"rank file {str(p)!r} is for embed dim {deit['EMBED_DIM']}; this model has {space.layers[0].in_features}"
        )
    return space.from_ratios(rows)


def load_rank_file(path: str | os.PathLike, space: RankSpace) -> RankConfig:
    """A configuration from a flora-ray rank JSON (``{"ranks": {fqn: rank}}`` or a bare mapping) or a reference
    subnet YAML (``.yml`` / ``.yaml``)."""
    p = Path(path)
    if p.suffix.lower() in (".yml", ".yaml"):
        return load_reference_yaml(p, space)
    data = read_json(p, "rank file")
    ranks = data.get("ranks", data) if isinstance(data, dict) else data
    if not isinstance(ranks, dict):
        raise InputError(f"rank file {str(p)!r} must hold a JSON object mapping layer FQN to rank")
    return space.validate(ranks)


def save_rank_file(path: str | os.PathLike, ranks: Mapping[str, int], **extra: Any) -> None:
    """Write ``{"ranks": {...}, ...extra}`` as JSON, atomically."""
    write_json(path, {"ranks": dict(ranks), **extra})

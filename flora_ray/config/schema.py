"""The configuration schema: one frozen dataclass per section, each key with its type, range and whether it
changes results (``SPEED_ONLY``); ``Config`` checks the keys that depend on each other."""

from __future__ import annotations

import numbers
import os
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flora_ray.errors import InputError

SAMPLERS = ("lowrank", "uniform", "sandwich")
DISTILL_SOURCES = ("teacher", "largest")  # what the sampled subnets of a supernet step distil from
# Named supernet training recipes: ``train.recipe`` -> (``train.sampler``, ``train.distill_from``). ``flora`` is
# FLORA's own; ``sandwich_inplace`` is the BigNAS / AttentiveNAS rule (largest + smallest + one draw, in-place
# distillation from the largest). The default stays ``flora`` until ranking_fidelity.py picks a recipe: on the
# proving ground over 40 subnets (2026-12-08) flora ranked worst, Kendall tau 0.32 [0.07, 0.55], against uniform
# 0.60, sandwich 0.58, sandwich_inplace 0.58 (intervals from 0.40): the measurement points away from flora, but the
# switch waits for the proving ground and quickstart to be measured again with it (docs/results.md).
RECIPES = {
    "flora": ("lowrank", "teacher"),
    "uniform": ("uniform", "teacher"),
    "sandwich": ("sandwich", "teacher"),
    "sandwich_inplace": ("sandwich", "largest"),
}
AMP_MODES = ("auto", "off", "bf16", "fp16")
DATASET_NAMES = ("fashion_mnist", "digits", "imagefolder")
# The image geometry (side, channels) each data set has by itself: data.img_size and data.in_chans default to it.
DATASET_GEOMETRY = {"fashion_mnist": (28, 1), "digits": (8, 1), "imagefolder": (224, 3)}
BASE_KEY = "base"  # a config file's ``base: other.yaml`` (or a list): the files it extends
REQUIRED_KEYS = ("model.name", "data.name")  # a config file must say what to compress and on which data
DATA_PIPELINES = ("loader", "ray_data")
COST_AXES = ("macs", "params", "latency_ms")  # the search's cost objective, beside accuracy
PROFILE_DEVICES = ("cpu", "cuda")
PROFILE_DTYPES = ("float32", "bfloat16", "float16")
# Field metadata: ``field(default=..., metadata=SPEED_ONLY)`` marks a key that changes speed or placement but not
# the results (it may differ between commands on one run directory); on a section it covers every key in it. A field
# without the metadata affects the results.
AFFECTS_RESULTS = "affects_results"
SPEED_ONLY = types.MappingProxyType({AFFECTS_RESULTS: False})
# A key added after runs were made: what a run whose recorded configuration lacks it did (so that upgrading
# flora-ray does not turn every earlier run into "a different configuration"). On a section, ``SECTION_DEFAULTS``:
# a run without the section behaved as its defaults say.
ABSENT_MEANS = "flora_ray.absent_means"
SECTION_DEFAULTS = "section defaults"


def _check(condition: bool, name: str, value: Any, allowed: str) -> None:
    if not condition:
        raise InputError(f"{name}={value!r} is invalid: {allowed}")


def _section(config: Any) -> str:
    """The YAML section of an optimisation recipe: ``PretrainConfig`` -> ``pretrain``."""
    return type(config).__name__.removesuffix("Config").lower()


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)  # numpy integers included


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)  # numpy floats included


@dataclass(frozen=True)
class ModelConfig:
    """The timm model and how it is factorised.

    Attributes:
        name: timm model name.
        kwargs: timm kwargs (``img_size``, ``in_chans``, ``num_classes``, ``embed_dim``, ``depth``...).
        pretrained: Dense weights: ``False`` (train a teacher with ``flora-ray pretrain``), ``True`` (timm
            pretrained weights from the hub cache) or the path of a weight file.
        ratios: Rank ratios (default: the model's preset).
        include_proj: Also factorise ``attn.proj``.
        targets: Regex over FQNs for other timm transformers.
        sv_placement: ``faithful`` or ``sqrt``.
        tome_r: Tokens merged per block by ToMe token merging (``core.tome``) in the teacher, the supernet, the
            search's evaluations and the exported subnet alike; 0 (the default) for none. timm ViT/DeiT with at
            most a class token only; it must leave every block at least ``2 r`` mergeable tokens.
    """

    name: str = "test_vit"
    kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained: bool | str = False
    ratios: tuple[float, ...] | None = None
    include_proj: bool = False
    targets: str | None = None
    sv_placement: str = "faithful"
    tome_r: int = field(default=0, metadata={ABSENT_MEANS: 0})

    def __post_init__(self) -> None:
        _check(self.sv_placement in ("faithful", "sqrt"), "model.sv_placement", self.sv_placement, "faithful or sqrt")
        _check(_is_int(self.tome_r) and self.tome_r >= 0, "model.tome_r", self.tome_r, "a whole number of tokens >= 0")
        if self.ratios is not None:
            _check(
                len(self.ratios) > 0 and all(0 < r <= 1 for r in self.ratios),
                "model.ratios",
                self.ratios,
                "a non-empty list of ratios in (0, 1]",
            )


@dataclass(frozen=True)
class DataConfig:
    """Which data to load and how to split and transform it.

    Attributes:
        name: ``fashion_mnist``, ``digits`` or ``imagefolder``.
        root: Data directory. Fashion-MNIST: the idx files (or a torchvision download directory); defaults to the
            first of ``flora_ray.data.fashion_mnist.FASHION_MNIST_DIRS`` that exists. Image folders: ``root/train/<class>/*``,
            ``root/val/<class>/*`` (required), a local directory or a URI (``s3://bucket/prefix``, ``gs://...``)
            read in place, never copied (``flora_ray.data.listing``). Ignored for digits.
        img_size: Side of the square images the model sees (default: the data set's own, ``DATASET_GEOMETRY``:
            28 for Fashion-MNIST, 8 for digits, 224 for image folders).
        in_chans: 1 or 3; grey images are replicated to 3 channels. Image folders need 3. Default: the data
            set's own (1 for Fashion-MNIST and digits, 3 for image folders).
        search_fraction: Fraction of each class of the training data carved out as the search split, in (0, 1).
        search_per_class: Images per class in the search split; overrides ``search_fraction`` when set.
        seed: Seed of the search split and the train subset.
        train_subset: Fraction in (0, 1] of the remaining training data kept (seeded, class-balanced).
        augment: Augment the train split (never search or test).
        mean: Per-channel normalisation mean (1 or ``in_chans`` values); ``None`` for the dataset's default.
        std: Per-channel normalisation std, as ``mean``.
        workers: DataLoader worker processes of each training process (decode and augment); ``None``: one per CPU
            the process reserves beyond its own (``scaling.cpus_per_worker - 1``, ``filter.cpus_per_task - 1``).
            Results do not depend on it: every item's random draws are seeded by (seed, epoch, index).
        pipeline: Where training images are decoded and augmented: ``loader`` (DataLoader worker processes of each
            training process, on the CPUs it reserves; bitwise reproducible) or ``ray_data`` (Ray Data tasks on any
            free CPU of the cluster, e.g. CPU-only nodes, streamed to the training workers; image folders on the
            Ray backend; reproducible shuffles, augmentation not seeded per image). The filter's local supernets
            always use the loader.
        decoders: With ``ray_data``, the most decode tasks at once (``None``: as many as there are free CPUs).
    """

    name: str = "fashion_mnist"
    root: str | None = None
    img_size: int | None = None
    in_chans: int | None = None
    search_fraction: float = 0.1
    search_per_class: int | None = None
    seed: int = 0
    train_subset: float | None = None
    augment: bool = True
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    workers: int | None = field(default=None, metadata=SPEED_ONLY)
    pipeline: str = "loader"
    decoders: int | None = field(default=None, metadata=SPEED_ONLY)

    def __post_init__(self) -> None:
        # Built directly by library users too (not only from YAML), so the types are checked here as well.
        if isinstance(self.root, os.PathLike):
            object.__setattr__(self, "root", os.fspath(self.root))
        for key in ("mean", "std"):
            value = getattr(self, key)
            if isinstance(value, list | tuple) and all(map(_is_real, value)):
                object.__setattr__(self, key, tuple(float(v) for v in value))
        folder = self.name == "imagefolder"
        _check(self.name in DATASET_NAMES, "data.name", self.name, f"must be one of {list(DATASET_NAMES)}")
        for key, value in zip(("img_size", "in_chans"), DATASET_GEOMETRY[self.name], strict=True):
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        _check(self.root is None or isinstance(self.root, str), "data.root", self.root, "must be a path or None")
        _check(not folder or self.root is not None, "data.root", self.root, "must be a path for imagefolder")
        _check(
            _is_int(self.img_size) and self.img_size >= 1, "data.img_size", self.img_size, "must be a positive integer"
        )
        _check(_is_int(self.in_chans) and self.in_chans in (1, 3), "data.in_chans", self.in_chans, "must be 1 or 3")
        _check(not folder or self.in_chans == 3, "data.in_chans", self.in_chans, "must be 3 for imagefolder")
        fraction, per_class, subset = self.search_fraction, self.search_per_class, self.train_subset
        _check(_is_real(fraction) and 0 < fraction < 1, "data.search_fraction", fraction, "must be a number in (0, 1)")
        per_class_ok = per_class is None or (_is_int(per_class) and per_class >= 1)
        _check(per_class_ok, "data.search_per_class", per_class, "must be a positive integer or null")
        _check(_is_int(self.seed) and self.seed >= 0, "data.seed", self.seed, "must be an integer >= 0")
        subset_ok = subset is None or (_is_real(subset) and 0 < subset <= 1)
        _check(subset_ok, "data.train_subset", subset, "must be a number in (0, 1] or null")
        _check(isinstance(self.augment, bool), "data.augment", self.augment, "must be true or false")
        workers_ok = self.workers is None or (_is_int(self.workers) and self.workers >= 0)
        _check(workers_ok, "data.workers", self.workers, "must be an integer >= 0 or null (one per reserved CPU)")
        _check(
            self.pipeline in DATA_PIPELINES, "data.pipeline", self.pipeline, f"must be one of {list(DATA_PIPELINES)}"
        )
        _check(
            self.pipeline == "loader" or folder, "data.pipeline", self.pipeline,
            "reads image files: use it with data.name=imagefolder, or data.pipeline=loader",
        )  # fmt: skip
        decoders_ok = self.decoders is None or (_is_int(self.decoders) and self.decoders >= 1)
        _check(decoders_ok, "data.decoders", self.decoders, "must be a positive integer or null")
        for key in ("mean", "std"):
            value = getattr(self, key)
            numbers_ok = isinstance(value, tuple) and all(isinstance(v, float) for v in value)
            ok = value is None or (numbers_ok and len(value) in (1, self.in_chans))
            _check(ok, f"data.{key}", value, f"must be null or 1 or in_chans={self.in_chans} numbers")
        std_ok = not isinstance(self.std, tuple) or all(v > 0 for v in self.std if isinstance(v, float))
        _check(std_ok, "data.std", self.std, "must be positive numbers")


@dataclass(frozen=True)
class OptimConfig:
    """Optimisation recipe shared by dense pretraining, filtering and supernet training (AdamW, cosine with warm-up).

    Attributes:
        epochs: Training epochs.
        batch_size: Images per worker per batch.
        accumulate: Batches per optimiser step (gradient accumulation): the effective batch is
            ``batch_size x accumulate x workers``.
        lr: Peak learning rate.
        min_lr: Final learning rate of the cosine schedule.
        weight_decay: AdamW weight decay (never on norms, biases, tokens, position embeddings).
        warmup_epochs: Linear warm-up length (fractions allowed).
        clip_grad: Gradient-norm clip (``None``: off).
        amp: Mixed precision on CUDA: ``auto`` (bf16 where supported, else fp16), ``bf16``, ``fp16`` or ``off``.
            CPU runs in float32.
        log_every: Steps between progress lines.
    """

    epochs: int = 10
    batch_size: int = 128
    accumulate: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    clip_grad: float | None = 5.0
    amp: str = "auto"
    log_every: int = field(default=50, metadata=SPEED_ONLY)

    def __post_init__(self) -> None:
        section = _section(self)
        _check(self.epochs >= 1, f"{section}.epochs", self.epochs, "must be at least 1")
        _check(self.batch_size >= 1, f"{section}.batch_size", self.batch_size, "must be at least 1")
        _check(
            _is_int(self.accumulate) and self.accumulate >= 1, f"{section}.accumulate", self.accumulate, "at least 1"
        )
        _check(self.lr > 0, f"{section}.lr", self.lr, "must be positive")
        _check(0 <= self.min_lr <= self.lr, f"{section}.min_lr", self.min_lr, "must be in [0, lr]")
        _check(self.weight_decay >= 0, f"{section}.weight_decay", self.weight_decay, "must be >= 0")
        _check(0 <= self.warmup_epochs < self.epochs, f"{section}.warmup_epochs", self.warmup_epochs, "in [0, epochs)")
        _check(self.clip_grad is None or self.clip_grad > 0, f"{section}.clip_grad", self.clip_grad, "positive or null")
        _check(self.amp in AMP_MODES, f"{section}.amp", self.amp, f"one of {AMP_MODES}")
        _check(self.log_every >= 1, f"{section}.log_every", self.log_every, "must be at least 1")


@dataclass(frozen=True)
class TrainStageConfig(OptimConfig):
    """The recipe of a Ray Train stage (pretrain, train): the shared keys plus a label loss and checkpoints.

    Attributes:
        label_smoothing: Label smoothing of the cross-entropy terms.
        checkpoint_every: Epochs between checkpoints.
        checkpoint_every_steps: Also a checkpoint every this many optimiser steps within an epoch (``None``: at
            epoch ends only). A resumed run restarts at the step after the checkpoint: a preemption repeats at
            most this many steps.
    """

    label_smoothing: float = 0.0
    checkpoint_every: int = field(default=1, metadata=SPEED_ONLY)
    checkpoint_every_steps: int | None = field(default=None, metadata=SPEED_ONLY)

    def __post_init__(self) -> None:
        super().__post_init__()
        section = _section(self)
        _check(0 <= self.label_smoothing < 1, f"{section}.label_smoothing", self.label_smoothing, "must be in [0, 1)")
        _check(self.checkpoint_every >= 1, f"{section}.checkpoint_every", self.checkpoint_every, "must be at least 1")
        steps = self.checkpoint_every_steps
        _check(
            steps is None or (_is_int(steps) and steps >= 1), f"{section}.checkpoint_every_steps", steps,
            "must be a positive integer or null",
        )  # fmt: skip


@dataclass(frozen=True)
class PretrainConfig(TrainStageConfig):
    """Dense teacher training (cross-entropy on labels)."""


@dataclass(frozen=True)
class TrainConfig(TrainStageConfig):
    """Supernet training: the sampled subnet(s) of each step, distilled from the dense teacher or in place.

    Attributes:
        recipe: A named recipe (``RECIPES``) that sets ``sampler`` and ``distill_from`` in one word: ``flora``
            (``lowrank`` + ``teacher``, FLORA's own), ``uniform`` (``uniform`` + ``teacher``), ``sandwich``
            (``sandwich`` + ``teacher``) or ``sandwich_inplace`` (``sandwich`` + ``largest``: BigNAS /
            AttentiveNAS). ``flora`` is the default until measured: which recipe ranks subnets most faithfully is
            what ``experiments/benchmarks/ranking_fidelity.py --recipes`` measures (>= 40 subnets per recipe): on
            the proving ground flora ranked worst (tau 0.32; the others 0.58-0.60, docs/results.md). The epochs
            are not part of a recipe: ``train.epochs`` says them.
        sampler: ``lowrank`` (a block's tuple drawn with probability proportional to 1 / product of its ratios,
            the FLORA default), ``uniform``, or ``sandwich`` (largest, smallest and a low-rank aware sample,
            gradients accumulated, an extension). Unset: the recipe's; set, it overrides the recipe. The loaded
            configuration holds the resolved value (what ``run_config.yaml`` records).
        distill_from: What the sampled subnets learn from. ``teacher``: every subnet distils from the dense
            teacher (the reference). ``largest`` (in-place distillation): each step trains the largest subnet
            first, on the teacher loss (with ``label_weight``'s label term), and every other subnet of the step
            distils from the largest subnet's detached logits (KL divergence at ``temperature``, no label term);
            the largest is trained once a step, also when the sampler draws it. The teacher runs once a step in
            both modes: with ``largest`` it is the largest subnet's target, the only one when ``label_weight`` is
            0. Unset: the recipe's; set, it overrides the recipe.
        temperature: Distillation temperature.
        label_weight: Weight of an extra cross-entropy term on the labels (0: pure distillation, the reference).
        space_file: A filtered ``space.json`` to sample from (default: the run's filtered space if it exists,
            else the full space).
        eval_images: Search-split images used for the per-epoch accuracy of the largest, middle and smallest
            uniform subnets.
    """

    lr: float = 5e-4
    weight_decay: float = 0.01
    # A name only: what it sets (sampler, distill_from) is recorded resolved and compared, so the name never
    # changes the results by itself (a run recorded with sampler: sandwich continues under recipe: sandwich).
    recipe: str = field(default="flora", metadata={AFFECTS_RESULTS: False})
    sampler: str | None = None
    distill_from: str | None = field(default=None, metadata={ABSENT_MEANS: "teacher"})
    temperature: float = 1.0
    label_weight: float = 0.0
    space_file: str | None = None
    eval_images: int = 2000

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.recipe in RECIPES, "train.recipe", self.recipe, f"one of {list(RECIPES)}")
        sampler, distill_from = RECIPES[self.recipe]
        if self.sampler is None:
            object.__setattr__(self, "sampler", sampler)
        if self.distill_from is None:
            object.__setattr__(self, "distill_from", distill_from)
        _check(self.sampler in SAMPLERS, "train.sampler", self.sampler, f"one of {SAMPLERS}")
        allowed = f"one of {list(DISTILL_SOURCES)}"
        _check(self.distill_from in DISTILL_SOURCES, "train.distill_from", self.distill_from, allowed)
        _check(self.temperature > 0, "train.temperature", self.temperature, "must be positive")
        _check(self.label_weight >= 0, "train.label_weight", self.label_weight, "must be >= 0")
        _check(self.eval_images >= 1, "train.eval_images", self.eval_images, "must be at least 1")


@dataclass(frozen=True)
class FinetuneConfig(TrainStageConfig):
    """Fine-tuning of an exported subnet (``flora-ray finetune``; a pipeline stage after export when ``enabled``).

    The subnet (the extracted low-rank model, a static timm model) is distilled from the run's teacher with the
    supernet's loss, on the same data, through the same trainer, backend, checkpoints and progress as supernet
    training, then exported again with its test accuracy before and after.

    Attributes:
        enabled: Whether ``flora-ray run`` fine-tunes a subnet after the export stage.
        trial: The trial the pipeline fine-tunes (default: the knee point of the front, as export).
        max_macs: Instead, the most accurate front point within this many MACs per image.
        temperature: Distillation temperature.
        label_weight: Weight of an extra cross-entropy term on the labels (0: pure distillation).
        eval_images: Search-split images the per-epoch accuracy is measured on.
    """

    enabled: bool = False
    epochs: int = 2
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_epochs: float = 0.0
    trial: int | None = None
    max_macs: float | None = None
    temperature: float = 1.0
    label_weight: float = 0.0
    eval_images: int = 2000

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.trial is None or self.max_macs is None, "finetune.max_macs", self.max_macs,
               "give finetune.trial or finetune.max_macs, not both")  # fmt: skip
        _check(self.trial is None or self.trial >= 0, "finetune.trial", self.trial, "a trial number >= 0 or null")
        _check(self.max_macs is None or self.max_macs > 0, "finetune.max_macs", self.max_macs, "positive or null")
        _check(self.temperature > 0, "finetune.temperature", self.temperature, "must be positive")
        _check(self.label_weight >= 0, "finetune.label_weight", self.label_weight, "must be >= 0")
        _check(self.eval_images >= 1, "finetune.eval_images", self.eval_images, "must be at least 1")


@dataclass(frozen=True)
class RefineConfig:
    """Choosing a subnet per budget after fine-tuning (``flora-ray refine``, ``Run.refine``).

    Inherited (supernet) accuracy ranks subnets differently from their accuracy after a fine-tune, so for each budget
    the ``k`` most accurate front points within it (by inherited accuracy) and the best uniform configuration within
    it are fine-tuned on one schedule (the ``finetune`` section's recipe: distillation from the run's teacher) and
    scored on the same test images; the most accurate after fine-tuning is the budget's choice.

    The defaults were chosen, not measured: ``k = 3`` candidates (the issue's proposal: the front's top three cost
    three fine-tunes per budget, and a fourth adds another), and the schedule of the ``finetune`` section, so that a
    refined candidate's accuracy is the one ``flora-ray finetune`` gives the same subnet with one training worker
    (``--backend local``).

    Attributes:
        k: Front points fine-tuned per budget (the most accurate within it by inherited accuracy).
        epochs: Fine-tuning epochs of every candidate (``None``: ``finetune.epochs``).
        train_images: Training images each candidate is fine-tuned on: a stratified subset seeded by ``data.seed``,
            the same for every candidate (``None``: the whole training split, as ``flora-ray finetune``).
        concurrency: Candidates fine-tuned at once (one task each, with ``search.cpus_per_trial`` and
            ``search.gpus_per_trial``).
    """

    k: int = 3
    epochs: int | None = None
    train_images: int | None = None
    concurrency: int = field(default=1, metadata=SPEED_ONLY)

    def __post_init__(self) -> None:
        _check(_is_int(self.k) and self.k >= 1, "refine.k", self.k, "an integer >= 1")
        _check(self.epochs is None or (_is_int(self.epochs) and self.epochs >= 1), "refine.epochs", self.epochs,
               "an integer >= 1, or null for finetune.epochs")  # fmt: skip
        _check(self.train_images is None or (_is_int(self.train_images) and self.train_images >= 1),
               "refine.train_images", self.train_images, "an integer >= 1, or null for every training image")  # fmt: skip
        _check(_is_int(self.concurrency) and self.concurrency >= 1, "refine.concurrency", self.concurrency,
               "an integer >= 1")  # fmt: skip


FILTER_MODES = ("local_supernet", "zero_training")
FILTER_SCORES = ("flops_aware", "accuracy")
UNIFORM_MIN = "uniform_min"  # filter.cost_floor: the cost of the cheapest uniform configuration


@dataclass(frozen=True)
class FilterConfig(OptimConfig):
    """Low-rank aware candidate filtering (docs/design.md, section 3).

    The local supernets train with the shared ``OptimConfig`` keys (no label loss: they distil the teacher's soft
    targets; no ``checkpoint_every``: a finished block is the unit of resume).

    Attributes:
        temperature: Distillation temperature of the local supernets.
        mode: ``local_supernet`` (per block, train a supernet in which only that block's tuple varies, then
            score) or ``zero_training`` (score on the inherited weights directly: fast, labelled in the output).
        subset: Seeded, class-balanced fraction of the training data the local supernets train on.
        keep_fraction: Fraction of each block's candidates kept (the full-rank tuple is always kept).
        score: ``flops_aware``: accuracy lost per fraction of MACs saved, lowest kept; ``accuracy``: highest kept.
        cost_floor: The cheapest cost the filtered space must still reach (improvement; ``None``: the faithful
            keep rule alone, whose kept sets form a band of cost per block that may drop every cheap triple).
            ``uniform_min`` (the cheapest uniform configuration), absolute MACs per image, or a share of the dense
            model's MACs (``"30%"``). Each block's share of the floor (``search.filtering.floor_thresholds``) is
            kept reachable by adding that block's best-scoring triple cheap enough for it.
        cost_bins: Coverage of each block's cost range, robust to score noise: its MAC range is split into this
            many equal bins and the best-scoring triple of each bin is kept (0: no coverage rule).
        keep_uniform: Every uniform configuration the space can express survives filtering (each block keeps its
            uniform tuples), so the search evaluates them first, on the same images as every trial, and its front
            is never worse than uniform ranks (improvement; ``false``: FLORA's filter, which may drop them).
        eval_images: Search-split images each candidate is scored on.
        concurrency: Blocks processed at once (one Ray task each).
        cpus_per_task: CPUs one block's task reserves.
    """

    epochs: int = 2
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_epochs: float = 0.0
    temperature: float = 1.0
    mode: str = "local_supernet"
    subset: float = 0.35
    keep_fraction: float = 0.3
    score: str = "flops_aware"
    cost_floor: float | str | None = field(default=None, metadata={ABSENT_MEANS: None})
    cost_bins: int = field(default=0, metadata={ABSENT_MEANS: 0})
    keep_uniform: bool = field(default=True, metadata={ABSENT_MEANS: False})
    eval_images: int = 2000
    concurrency: int = field(default=2, metadata=SPEED_ONLY)
    cpus_per_task: float = field(default=1.0, metadata=SPEED_ONLY)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.mode in FILTER_MODES, "filter.mode", self.mode, f"one of {FILTER_MODES}")
        _check(0 < self.subset <= 1, "filter.subset", self.subset, "must be in (0, 1]")
        _check(0 < self.keep_fraction <= 1, "filter.keep_fraction", self.keep_fraction, "must be in (0, 1]")
        _check(self.score in FILTER_SCORES, "filter.score", self.score, f"one of {FILTER_SCORES}")
        floor = self.cost_floor
        _check(
            floor is None or floor == UNIFORM_MIN or parse_budget(floor) is not None,
            "filter.cost_floor",
            floor,
            f"{UNIFORM_MIN!r} (the cheapest uniform configuration), MACs per image, a share of dense such as '30%', "
            "or null",
        )
        _check(self.cost_bins >= 0, "filter.cost_bins", self.cost_bins, "must be >= 0 (0: no coverage rule)")
        _check(self.eval_images >= 1, "filter.eval_images", self.eval_images, "must be at least 1")
        _check(self.concurrency >= 1, "filter.concurrency", self.concurrency, "must be at least 1")
        _check(self.cpus_per_task >= 0, "filter.cpus_per_task", self.cpus_per_task, "must be >= 0")
        _check(self.temperature > 0, "filter.temperature", self.temperature, "must be positive")


BOUNDS = tuple(f"{side}_{axis}" for axis in COST_AXES for side in ("max", "min"))
BUDGET_HELP = "a positive number, a share of the dense model such as '60%', or null"


def parse_budget(value: float | str) -> tuple[float, bool] | None:
    """``(amount, relative)`` of a budget (``"60%"`` -> ``(0.6, True)``), ``None`` when it is not one."""
    if isinstance(value, str):
        text = value.strip()
        try:
            share = float(text[:-1]) / 100 if text.endswith("%") else None
        except ValueError:
            return None
        return (share, True) if share is not None and share > 0 else None
    return (float(value), False) if _is_real(value) and value > 0 else None


@dataclass(frozen=True)
class SearchConfig:
    """Multi-objective search (docs/design.md, section 5): Ray Tune + Optuna NSGA-II over the filtered space.

    Attributes:
        trials: Subnets evaluated in total (the uniform configurations first).
        population: NSGA-II population size per generation.
        mutation_prob: Per-block mutation probability (``None``: Optuna's default, 1 / number of blocks).
        crossover_prob: NSGA-II crossover probability.
        seed: Sampler seed (``None``: ``run.seed``).
        objectives: The cost axis searched beside accuracy: ``[macs]``, ``[params]`` or ``[latency_ms]`` (the
            latency the run's latency table predicts at ``profile.batch``; ``accuracy`` may be listed too).
        max_macs, max_params, max_latency_ms: Budgets (constraints): absolute (MACs per image, parameters, ms per
            batch) or relative to the dense model (``"60%"``); ``None``: none.
        min_macs, min_params, min_latency_ms: Lower bounds of the same kinds, so that a search spends its trials
            inside one window of cost.
        eval_images: Search-split images each subnet is scored on (the same stratified, seeded images for every
            subnet and the uniform baseline). Choose it from the accuracy differences the search must resolve: one
            accuracy ``p`` has standard error ``100 sqrt(p (1 - p) / n)`` points (0.45 at 86% and 6000 images); a
            paired difference of two subnets that disagree on a share ``q`` of the images, about
            ``100 sqrt(q / n)``; resolving ``d`` points at 2 standard errors needs ``n >= 4 q / (d / 100)^2``
            (docs/guide.md, "Accuracy noise and the filter's reach").
        bn_recalibration_images: Training images (un-augmented, class-stratified, seeded by ``data.seed``, the
            same for every subnet) on which each subnet's BatchNorm running statistics are recalibrated before it
            is scored (filtering, search, uniform baselines) and exported, in batches of ``train.batch_size``
            (``core.batchnorm``); 0: off, every subnet uses the supernet's shared statistics. Models without
            BatchNorm (ViT, Swin) are not affected and load no images for it.
        guided_anchors: Before the first trial, score each layer alone at its lowest rank (the rest at full rank)
            on the search images, ``L + 1`` evaluations written to ``sensitivity.parquet``, and evaluate first,
            beside the uniform configurations, the sensitivity-guided allocations the space holds (the least
            sensitive layers lowered first, the most sensitive kept high: the cheap heuristic of pruning tools;
            at most ``population`` of them and half of the trials the uniform ones leave, spread over their cost),
            so the front starts from that heuristic's points as well as uniform ones. ``false``: uniform anchors
            only, as FLORA.
        batch_size: Evaluation batch size.
        concurrency: Trials evaluated at once (evaluator actors).
        cpus_per_trial: CPUs an evaluator reserves.
        gpus_per_trial: GPU fraction an evaluator reserves (several evaluators may share a GPU).
    """

    trials: int = 200
    population: int = 50
    mutation_prob: float | None = None
    crossover_prob: float = 0.9
    seed: int | None = None
    objectives: tuple[str, ...] = ("macs",)
    max_macs: float | str | None = None
    max_params: float | str | None = None
    max_latency_ms: float | str | None = None
    min_macs: float | str | None = None
    min_params: float | str | None = None
    min_latency_ms: float | str | None = None
    eval_images: int = 2000
    bn_recalibration_images: int = field(default=500, metadata={ABSENT_MEANS: 0})  # earlier runs: no recalibration
    guided_anchors: bool = field(default=True, metadata={ABSENT_MEANS: False})  # earlier runs: uniform anchors only
    batch_size: int = field(default=500, metadata=SPEED_ONLY)
    concurrency: int = field(default=2, metadata=SPEED_ONLY)
    cpus_per_trial: float = field(default=1.0, metadata=SPEED_ONLY)
    gpus_per_trial: float = field(default=0.0, metadata=SPEED_ONLY)

    def __post_init__(self) -> None:
        _check(self.trials >= 1, "search.trials", self.trials, "must be at least 1")
        _check(self.population >= 2, "search.population", self.population, "must be at least 2")
        _check(
            self.mutation_prob is None or 0 <= self.mutation_prob <= 1,
            "search.mutation_prob",
            self.mutation_prob,
            "in [0, 1] or null",
        )
        _check(0 <= self.crossover_prob <= 1, "search.crossover_prob", self.crossover_prob, "must be in [0, 1]")
        costs = [o for o in self.objectives if o != "accuracy"]
        _check(
            len(costs) == 1 and all(o in ("accuracy", *COST_AXES) for o in self.objectives),
            "search.objectives",
            list(self.objectives),
            f"one cost axis of {list(COST_AXES)} (accuracy is always the other objective)",
        )
        for bound in BOUNDS:
            value = getattr(self, bound)
            _check(value is None or parse_budget(value) is not None, f"search.{bound}", value, BUDGET_HELP)
        _check(self.eval_images >= 1, "search.eval_images", self.eval_images, "must be at least 1")
        _check(
            _is_int(self.bn_recalibration_images) and self.bn_recalibration_images >= 0,
            "search.bn_recalibration_images",
            self.bn_recalibration_images,
            "an integer >= 0 (0: off)",
        )
        _check(self.batch_size >= 1, "search.batch_size", self.batch_size, "must be at least 1")
        _check(self.concurrency >= 1, "search.concurrency", self.concurrency, "must be at least 1")
        _check(self.cpus_per_trial >= 0, "search.cpus_per_trial", self.cpus_per_trial, "must be >= 0")
        _check(0 <= self.gpus_per_trial <= 1, "search.gpus_per_trial", self.gpus_per_trial, "must be in [0, 1]")

    @property
    def cost_axis(self) -> str:
        """The searched cost objective (``macs``, ``params`` or ``latency_ms``)."""
        return next(o for o in self.objectives if o != "accuracy")

    @property
    def uses_latency(self) -> bool:
        """Whether the search needs the run's latency table (a latency objective or budget)."""
        return self.cost_axis == "latency_ms" or any(
            getattr(self, b) is not None for b in ("max_latency_ms", "min_latency_ms")
        )


@dataclass(frozen=True)
class ProfileConfig:
    """The latency table on the target device (``flora-ray profile``; ``core.latency``).

    Attributes:
        enabled: Whether ``flora-ray run`` measures the table (first stage). Required by a latency objective or
            budget; without a table the trials' ``latency_ms`` is empty.
        device: Where latency is measured: ``cpu`` or ``cuda`` (the deployment device).
        resources: The Ray resources the profile task and export's latency measurement ask for, so that on a
            cluster they run on the node kind the model is deployed on (``{GPU: 1}``, or a custom resource such
            as ``{c7i: 1}``); default: ``threads`` CPUs, plus one accelerator for ``cuda``.
        batch_sizes: Batch sizes the table is measured at.
        batch: The batch size the search's latency objective and budgets use (default: the first measured).
        dtype: ``float32``, ``bfloat16``, or ``float16`` (``cuda`` only).
        threads: torch intra-op threads while measuring.
        min_run_time: Seconds each item is timed for (``torch.utils.benchmark`` ``blocked_autorange``).
    """

    enabled: bool = True
    device: str = "cpu"
    resources: dict[str, float] = field(default_factory=dict)
    batch_sizes: tuple[int, ...] = (1,)
    batch: int | None = None
    dtype: str = "float32"
    threads: int = 1
    min_run_time: float = 0.2

    def __post_init__(self) -> None:
        _check(self.device in PROFILE_DEVICES, "profile.device", self.device, f"one of {PROFILE_DEVICES}")
        _check(self.dtype in PROFILE_DTYPES, "profile.dtype", self.dtype, f"one of {PROFILE_DTYPES}")
        _check(
            not (self.dtype == "float16" and self.device == "cpu"),
            "profile.dtype",
            self.dtype,
            "float16 needs profile.device=cuda; use float32 or bfloat16 on CPU",
        )
        _check(
            len(self.batch_sizes) > 0 and all(b >= 1 for b in self.batch_sizes),
            "profile.batch_sizes",
            list(self.batch_sizes),
            "a non-empty list of batch sizes >= 1",
        )
        _check(
            self.batch is None or self.batch in self.batch_sizes,
            "profile.batch",
            self.batch,
            f"one of profile.batch_sizes {list(self.batch_sizes)} or null",
        )
        _check(self.threads >= 1, "profile.threads", self.threads, "must be at least 1")
        _check(self.min_run_time > 0, "profile.min_run_time", self.min_run_time, "must be positive (seconds)")
        _check(all(v > 0 for v in self.resources.values()), "profile.resources", self.resources, "positive amounts")

    @property
    def search_batch(self) -> int:
        """The batch size whose latency the search uses."""
        return self.batch if self.batch is not None else self.batch_sizes[0]


@dataclass(frozen=True)
class ScalingConfig:
    """Ray Train workers.

    Attributes:
        num_workers: Data-parallel workers.
        use_gpu: One accelerator per worker (NCCL, mixed precision) instead of CPU (gloo).
        cpus_per_worker: CPUs each worker reserves.
        accelerator: Resource name a worker asks for when ``use_gpu`` (``GPU``, or a custom resource).
        resources_per_worker: Extra Ray resources per worker.
        allow_cpu: Run on CPU where a GPU was asked for (``use_gpu``, ``search.gpus_per_trial``) but torch sees no
            CUDA device. ``false`` (the default): such a run is refused before it starts (on this machine) or its
            work fails (on a cluster node), instead of running silently on CPU.
    """

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    accelerator: str = "GPU"
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    allow_cpu: bool = False

    def __post_init__(self) -> None:
        _check(self.num_workers >= 1, "scaling.num_workers", self.num_workers, "must be at least 1")
        _check(self.cpus_per_worker >= 0, "scaling.cpus_per_worker", self.cpus_per_worker, "must be >= 0")
        _check(bool(self.accelerator), "scaling.accelerator", self.accelerator, "a Ray resource name")


@dataclass(frozen=True)
class NotifyConfig:
    """Notifications (``flora_ray.notify``). Never changes the results.

    Attributes:
        webhook: Where a JSON POST goes when a stage finishes, the run finishes or a stage fails: an
            ``http(s)://`` URL, or ``$NAME`` for the URL in environment variable ``NAME`` (keep a secret URL, such as
            a Slack incoming webhook, out of the run's recorded configuration). The body has a Slack-compatible
            ``text`` and the event's fields. ``None``: no notifications.
        stages: Also notify when each stage finishes (not only when the run finishes or fails).
        timeout_s: Seconds a POST may take; a notification that fails is logged and never stops the run.
    """

    webhook: str | None = None
    stages: bool = True
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        _check(
            self.webhook is None
            or self.webhook.startswith(("http://", "https://"))
            or (self.webhook[1:].isidentifier() and self.webhook.startswith("$")),
            "notify.webhook",
            self.webhook,
            "an http(s):// URL or $NAME (the URL in environment variable NAME)",
        )
        _check(self.timeout_s > 0, "notify.timeout_s", self.timeout_s, "must be positive")


@dataclass(frozen=True)
class TrackingConfig:
    """Experiment tracking (optional; ``pip install 'flora-ray[tracking]'``). Never changes the results.

    Attributes:
        mlflow_uri: MLflow tracking URI (``file:///abs/mlruns``, ``http://host:5000``, ``databricks``); ``None``:
            no tracking. Through Ray's integrations: per-epoch training metrics from rank 0 (``setup_mlflow``), one
            MLflow run per search trial on the Ray backend (``MLflowLoggerCallback``), and a results run with the
            trials table, the front, the plots and the report as artifacts. On a cluster every node must reach it
            (a server, not a local path).
        experiment: MLflow experiment name (default: ``run.name``).
        artifact_location: Where a new experiment keeps its artifacts (default: ``mlartifacts`` next to a
            ``sqlite:///`` database, else MLflow's default).
    """

    mlflow_uri: str | None = None
    experiment: str | None = None
    artifact_location: str | None = None

    def __post_init__(self) -> None:
        uri_ok = self.mlflow_uri is None or (isinstance(self.mlflow_uri, str) and self.mlflow_uri.strip() != "")
        _check(uri_ok, "tracking.mlflow_uri", self.mlflow_uri, "an MLflow tracking URI (file:///abs/mlruns) or null")


@dataclass(frozen=True)
class RunConfig:
    """Where the run lives and how it is seeded.

    Attributes:
        name: Run name; re-running with the same name resumes.
        output_dir: This machine's directory for runs: the run is ``output_dir/name`` when ``storage`` is unset,
            else only working copies (the search journal, exports before upload) live there.
        storage: Where the whole run lives, ``storage/name``: an absolute path on a filesystem every node mounts, or
            ``s3://bucket/prefix`` / ``gs://bucket/prefix``; checkpoints, Tune state and every result go there.
            Required with ``--address`` (unless ``output_dir`` is itself an absolute shared path).
        seed: Global seed.
        max_failures: How often lost work is started again after a node or process is lost (a spot reclaim): a
            training worker group (from the latest checkpoint), a filter block's task, a search trial, a stage's
            single task. ``-1``: always. Errors of the work itself (a bad configuration, a NaN) are not retried.
        threads_per_worker: torch intra-op threads per worker (0: leave torch's default).
        parent: A finished run (path or storage URI) whose teacher, rank space and supernet this run takes over
            (``flora_ray.stages.parent``): a child run searches again on a trained supernet (another objective,
            budget, seed or more trials) and trains nothing. Its model, data, pretrain, filter, train and seed must
            equal the parent's.
    """

    name: str = "flora"
    output_dir: str = field(default="runs", metadata=SPEED_ONLY)
    storage: str | None = field(default=None, metadata=SPEED_ONLY)
    seed: int = 0
    max_failures: int = field(default=0, metadata=SPEED_ONLY)
    threads_per_worker: int = field(default=1, metadata=SPEED_ONLY)
    parent: str | None = field(default=None, metadata={ABSENT_MEANS: None})

    def __post_init__(self) -> None:
        _check(self.parent is None or bool(self.parent.strip()), "run.parent", self.parent, "a run's path or URI")
        _check(bool(self.name) and "/" not in self.name, "run.name", self.name, "a non-empty name without '/'")
        _check(self.max_failures >= -1, "run.max_failures", self.max_failures, "-1 (unlimited) or >= 0")
        _check(self.threads_per_worker >= 0, "run.threads_per_worker", self.threads_per_worker, "must be >= 0")

    @property
    def run_dir(self) -> Path:
        """This machine's directory of the run (the run itself when ``storage`` is unset)."""
        return Path(self.output_dir) / self.name


@dataclass(frozen=True)
class Config:
    """A whole flora-ray experiment."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig, metadata={ABSENT_MEANS: SECTION_DEFAULTS})
    refine: RefineConfig = field(default_factory=RefineConfig, metadata={ABSENT_MEANS: SECTION_DEFAULTS})
    scaling: ScalingConfig = field(default_factory=ScalingConfig, metadata=SPEED_ONLY)
    tracking: TrackingConfig = field(default_factory=TrackingConfig, metadata=SPEED_ONLY)
    notify: NotifyConfig = field(default_factory=NotifyConfig, metadata=SPEED_ONLY)

    def __post_init__(self) -> None:
        _check(
            not self.search.uses_latency or self.profile.enabled,
            "profile.enabled",
            self.profile.enabled,
            f"the search uses latency (search.objectives={list(self.search.objectives)} or a latency budget), "
            "which needs the latency table: set profile.enabled=true",
        )

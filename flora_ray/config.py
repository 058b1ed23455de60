"""Run configuration: frozen dataclasses per stage, loaded from YAML, overridden by dotted keys, validated.

``load_config(path, overrides)`` reads an experiment YAML (see ``experiments/``), applies ``section.key=value``
overrides (values parsed as YAML), checks every key against the schema (an unknown key is an error naming the
closest valid one) and every value against its type and range. ``config_to_dict`` gives the plain dict that is
dumped next to every result.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flora_ray.data.datasets import DataConfig

SAMPLERS = ("lowrank", "uniform", "sandwich")
AMP_MODES = ("auto", "off", "bf16", "fp16")


def _check(condition: bool, name: str, value: Any, allowed: str) -> None:
    if not condition:
        raise ValueError(f"{name}={value!r} is invalid: {allowed}")


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
    """

    name: str = "test_vit"
    kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained: bool | str = False
    ratios: tuple[float, ...] | None = None
    include_proj: bool = False
    targets: str | None = None
    sv_placement: str = "faithful"

    def __post_init__(self) -> None:
        _check(self.sv_placement in ("faithful", "sqrt"), "model.sv_placement", self.sv_placement, "faithful or sqrt")
        if self.ratios is not None:
            _check(
                len(self.ratios) > 0 and all(0 < r <= 1 for r in self.ratios),
                "model.ratios",
                self.ratios,
                "a non-empty list of ratios in (0, 1]",
            )


@dataclass(frozen=True)
class OptimConfig:
    """Optimisation recipe shared by dense pretraining and supernet training (AdamW, cosine with warm-up).

    Attributes:
        epochs: Training epochs.
        batch_size: Images per worker per step.
        lr: Peak learning rate.
        min_lr: Final learning rate of the cosine schedule.
        weight_decay: AdamW weight decay (never on norms, biases, tokens, position embeddings).
        warmup_epochs: Linear warm-up length (fractions allowed).
        clip_grad: Gradient-norm clip (``None``: off).
        label_smoothing: Label smoothing of the cross-entropy terms.
        amp: Mixed precision on CUDA: ``auto`` (bf16 where supported, else fp16), ``bf16``, ``fp16`` or ``off``.
            CPU runs in float32.
        checkpoint_every: Epochs between checkpoints.
        log_every: Steps between progress lines.
    """

    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    clip_grad: float | None = 5.0
    label_smoothing: float = 0.0
    amp: str = "auto"
    checkpoint_every: int = 1
    log_every: int = 50

    def __post_init__(self) -> None:
        section = type(self).__name__.removesuffix("Config").lower()
        _check(self.epochs >= 1, f"{section}.epochs", self.epochs, "must be at least 1")
        _check(self.batch_size >= 1, f"{section}.batch_size", self.batch_size, "must be at least 1")
        _check(self.lr > 0, f"{section}.lr", self.lr, "must be positive")
        _check(0 <= self.min_lr <= self.lr, f"{section}.min_lr", self.min_lr, "must be in [0, lr]")
        _check(self.weight_decay >= 0, f"{section}.weight_decay", self.weight_decay, "must be >= 0")
        _check(0 <= self.warmup_epochs < self.epochs, f"{section}.warmup_epochs", self.warmup_epochs, "in [0, epochs)")
        _check(self.clip_grad is None or self.clip_grad > 0, f"{section}.clip_grad", self.clip_grad, "positive or null")
        _check(0 <= self.label_smoothing < 1, f"{section}.label_smoothing", self.label_smoothing, "must be in [0, 1)")
        _check(self.amp in AMP_MODES, f"{section}.amp", self.amp, f"one of {AMP_MODES}")
        _check(self.checkpoint_every >= 1, f"{section}.checkpoint_every", self.checkpoint_every, "must be at least 1")
        _check(self.log_every >= 1, f"{section}.log_every", self.log_every, "must be at least 1")


@dataclass(frozen=True)
class PretrainConfig(OptimConfig):
    """Dense teacher training (cross-entropy on labels)."""


@dataclass(frozen=True)
class TrainConfig(OptimConfig):
    """Supernet training: one sampled subnet per step, distilled from the dense teacher.

    Attributes:
        sampler: ``lowrank`` (a block's tuple drawn with probability proportional to 1 / product of its ratios,
            the FLORA default), ``uniform``, or ``sandwich`` (largest, smallest and a low-rank aware sample,
            gradients accumulated, an extension).
        temperature: Distillation temperature.
        label_weight: Weight of an extra cross-entropy term on the labels (0: pure distillation, the reference).
        space_file: A filtered ``space.json`` to sample from (default: the run's filtered space if it exists,
            else the full space).
        eval_images: Search-split images used for the per-epoch accuracy of the largest, middle and smallest
            uniform subnets.
    """

    lr: float = 5e-4
    weight_decay: float = 0.01
    sampler: str = "lowrank"
    temperature: float = 1.0
    label_weight: float = 0.0
    space_file: str | None = None
    eval_images: int = 2000

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.sampler in SAMPLERS, "train.sampler", self.sampler, f"one of {SAMPLERS}")
        _check(self.temperature > 0, "train.temperature", self.temperature, "must be positive")
        _check(self.label_weight >= 0, "train.label_weight", self.label_weight, "must be >= 0")
        _check(self.eval_images >= 1, "train.eval_images", self.eval_images, "must be at least 1")


FILTER_MODES = ("local_supernet", "zero_training")
FILTER_SCORES = ("flops_aware", "accuracy")


@dataclass(frozen=True)
class FilterConfig(OptimConfig):
    """Low-rank aware candidate filtering (design doc section 3).

    Attributes:
        mode: ``local_supernet`` (per block, train a supernet in which only that block's tuple varies, then
            score) or ``zero_training`` (score on the inherited weights directly: fast, labelled in the output).
        subset: Seeded, class-balanced fraction of the training data the local supernets train on.
        keep_fraction: Fraction of each block's candidates kept (the full-rank tuple is always kept).
        score: ``flops_aware``: accuracy lost per fraction of MACs saved, lowest kept; ``accuracy``: highest kept.
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
    eval_images: int = 2000
    concurrency: int = 2
    cpus_per_task: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.mode in FILTER_MODES, "filter.mode", self.mode, f"one of {FILTER_MODES}")
        _check(0 < self.subset <= 1, "filter.subset", self.subset, "must be in (0, 1]")
        _check(0 < self.keep_fraction <= 1, "filter.keep_fraction", self.keep_fraction, "must be in (0, 1]")
        _check(self.score in FILTER_SCORES, "filter.score", self.score, f"one of {FILTER_SCORES}")
        _check(self.eval_images >= 1, "filter.eval_images", self.eval_images, "must be at least 1")
        _check(self.concurrency >= 1, "filter.concurrency", self.concurrency, "must be at least 1")
        _check(self.cpus_per_task >= 0, "filter.cpus_per_task", self.cpus_per_task, "must be >= 0")
        _check(self.temperature > 0, "filter.temperature", self.temperature, "must be positive")


@dataclass(frozen=True)
class SearchConfig:
    """Multi-objective search (design doc section 5): Ray Tune + Optuna NSGA-II over the filtered space.

    Attributes:
        trials: Subnets evaluated in total (the uniform configurations first).
        population: NSGA-II population size per generation.
        mutation_prob: Per-block mutation probability (``None``: Optuna's default, 1 / number of blocks).
        crossover_prob: NSGA-II crossover probability.
        seed: Sampler seed (``None``: ``run.seed``).
        max_macs: Hard budget in MACs per image (a constraint; ``None``: none).
        eval_images: Search-split images each subnet is scored on.
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
    max_macs: float | None = None
    eval_images: int = 2000
    batch_size: int = 500
    concurrency: int = 2
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0

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
        _check(self.max_macs is None or self.max_macs > 0, "search.max_macs", self.max_macs, "positive or null")
        _check(self.eval_images >= 1, "search.eval_images", self.eval_images, "must be at least 1")
        _check(self.batch_size >= 1, "search.batch_size", self.batch_size, "must be at least 1")
        _check(self.concurrency >= 1, "search.concurrency", self.concurrency, "must be at least 1")
        _check(self.cpus_per_trial >= 0, "search.cpus_per_trial", self.cpus_per_trial, "must be >= 0")
        _check(0 <= self.gpus_per_trial <= 1, "search.gpus_per_trial", self.gpus_per_trial, "must be in [0, 1]")


@dataclass(frozen=True)
class ScalingConfig:
    """Ray Train workers.

    Attributes:
        num_workers: Data-parallel workers.
        use_gpu: One accelerator per worker (NCCL, mixed precision) instead of CPU (gloo).
        cpus_per_worker: CPUs each worker reserves.
        accelerator: Resource name a worker asks for when ``use_gpu`` (``GPU``, or a custom resource).
        resources_per_worker: Extra Ray resources per worker.
    """

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    accelerator: str = "GPU"
    resources_per_worker: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(self.num_workers >= 1, "scaling.num_workers", self.num_workers, "must be at least 1")
        _check(self.cpus_per_worker >= 0, "scaling.cpus_per_worker", self.cpus_per_worker, "must be >= 0")
        _check(bool(self.accelerator), "scaling.accelerator", self.accelerator, "a Ray resource name")


@dataclass(frozen=True)
class RunConfig:
    """Where results go and how the run is seeded.

    Attributes:
        name: Run name; re-running with the same name resumes.
        output_dir: Parent of the run directory ``output_dir/name``.
        storage: Ray storage path for checkpoints (local directory or ``s3://`` / ``gs://`` URI); default
            ``<run dir>/ray``.
        seed: Global seed.
        max_failures: Worker-group restarts from the latest checkpoint after a failure.
        threads_per_worker: torch intra-op threads per worker (0: leave torch's default).
    """

    name: str = "flora"
    output_dir: str = "runs"
    storage: str | None = None
    seed: int = 0
    max_failures: int = 0
    threads_per_worker: int = 1

    def __post_init__(self) -> None:
        _check(bool(self.name) and "/" not in self.name, "run.name", self.name, "a non-empty name without '/'")
        _check(self.max_failures >= -1, "run.max_failures", self.max_failures, "-1 (unlimited) or >= 0")
        _check(self.threads_per_worker >= 0, "run.threads_per_worker", self.threads_per_worker, "must be >= 0")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    @property
    def storage_path(self) -> str:
        return self.storage or str((self.run_dir / "ray").resolve())


@dataclass(frozen=True)
class Config:
    """A whole flora-ray experiment."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)


# --- loading ------------------------------------------------------------------------------------------------------


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML experiment file (or the defaults) and apply ``section.key=value`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {str(p)!r} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"config file {str(p)!r} is not valid YAML: {' '.join(str(exc).split())}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"config file {str(p)!r} must hold a mapping of sections, got {type(data).__name__}")
    for item in overrides:
        apply_override(data, item)
    return build_dataclass(Config, data, "")


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply one ``a.b.c=value`` override (value parsed as YAML) to a nested dict, in place."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ValueError(f"override {item!r} is not of the form section.key=value")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"override {item!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def build_dataclass(cls: type, data: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from a mapping, checking keys and types; errors name the dotted key."""
    where = prefix or "config"
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ValueError(f"{where} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close else f"; valid: {names}"
            raise ValueError(f"unknown config key '{dotted}'{hint}")
        kwargs[key] = _coerce(hints[key], value, dotted)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ValueError(f"{where}: {exc}") from exc


def _coerce(hint: Any, value: Any, dotted: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, dotted)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, dotted)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[-1] if len(errors) == 1 else f"{dotted}={value!r} has the wrong type ({hint})")
    if hint is Any:
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ValueError(f"{dotted}={value!r} must be a list")
        return tuple(_coerce(args[0], v, f"{dotted}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"{dotted}={value!r} must be a mapping")
        return {str(k): _coerce(args[1], v, f"{dotted}.{k}") for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{dotted}={value!r} must be true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{dotted}={value!r} must be an integer")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"{dotted}={value!r} must be a number") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{dotted}={value!r} must be a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{dotted}={value!r} must be a string")
        return value
    raise TypeError(f"unsupported config type {hint} for {dotted}")


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain, YAML/JSON-safe dict of a config (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)

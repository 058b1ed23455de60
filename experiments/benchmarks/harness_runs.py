"""Prepared runs and their in-process evaluation, shared by the search benchmarks.

``search_efficiency.py``, ``flora_vs_uniform.py``, ``latency_front.py`` and ``ranking_fidelity.py`` benchmark one
trained run: given with ``--run-dir``, or prepared here (``prepare_base_run``: the quickstart as
``runs/bench-quickstart``, or with ``--smoke`` a tiny digits run in-process). ``prepare_ablation`` trains a variant
supernet beside it; ``CachedEvaluator`` scores subnets of a supernet on fixed search images; ``nsga2_search`` and
``uniform_search`` are flora-ray's NSGA-II as an in-process ask/tell loop and the uniform baseline;
``product_search`` runs the product's own search stage (``pipeline.run_stage``, as ``flora-ray search``) on a
supernet with another search seed, in a run directory of its own.
``prepare_search_run`` makes a run with a random-init teacher and its SVD supernet, ready to search
(``search_overhead.py``, ``scaling.py``).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import torch
from harness import EXPERIMENTS, ROOT

import flora_ray as fr
from flora_ray.api import writing_run
from flora_ray.backends.local import LocalBackend
from flora_ray.backends.ray import RayBackend, init_ray
from flora_ray.config import Config, SearchConfig, changed_result_keys, config_to_dict, load_config
from flora_ray.core.models import dense_checkpoint_metadata
from flora_ray.core.space import RankConfig, RankSpace
from flora_ray.data.datasets import build_datasets
from flora_ray.pipeline import run_stage
from flora_ray.records import StageMarker
from flora_ray.results import hypervolume, pareto_mask
from flora_ray.search.evaluator import Evaluator, anchor_points, genes_to_config, search_batch, supernet_from_numpy
from flora_ray.stages.inputs import build_run_supernet, resolve_model_spec
from flora_ray.storage.files import read_checkpoint_header, read_json, sha256_file, write_json
from flora_ray.storage.run_store import ARTEFACTS, RunStore

BENCH_RUN = "bench-quickstart"
SMOKE_RUN = "bench-smoke"
# The tiny digits run of the smoke mode: 2 blocks, 3 ratios, seconds per stage in-process.
SMOKE_OVERRIDES = (
    "model.kwargs={patch_size: 2, embed_dim: 32, depth: 2, num_heads: 2, mlp_ratio: 2}",
    "model.ratios=[0.25, 0.5, 1.0]",
    "pretrain.epochs=8",
    "pretrain.batch_size=64",
    "pretrain.warmup_epochs=0",
    "filter.mode=zero_training",
    "filter.eval_images=100",
    "filter.keep_fraction=0.5",
    "train.epochs=2",
    "train.batch_size=64",
    "train.warmup_epochs=0",
    "train.eval_images=100",
    "search.population=8",
    "search.eval_images=200",
)
PREPARED_STAGES = ("pretrain", "filter", "train")
STAGE_OUTPUTS = {"pretrain": ARTEFACTS.teacher, "filter": ARTEFACTS.space, "train": ARTEFACTS.supernet}
Point = tuple[float, float]  # (macs, accuracy)
Evaluate = Callable[[RankConfig], Point]
SOURCE_FILE = "bench_source.json"  # what a prepared variant was trained from


# --- the base run -----------------------------------------------------------------------------------------------------


def config_at(path: Path, run_dir: Path, overrides: Sequence[str] = ()) -> Config:
    """The experiment at ``path`` with its run directory set to ``run_dir``."""
    return load_config(path, [*overrides, f"run.output_dir={run_dir.parent}", f"run.name={run_dir.name}"])


def recorded_configs(run_dir: Path) -> list[Path]:
    """The configuration files of a run: its ``run_config.yaml`` and, in a run made before the run store, the
    ``<stage>_config.yaml`` each stage wrote."""
    names = (ARTEFACTS.run_config, *(f"{stage}_config.yaml" for stage in PREPARED_STAGES))
    return [run_dir / name for name in names if (run_dir / name).is_file()]


def config_file(run_dir: Path) -> Path:
    """The configuration file a run's supernet was trained with: ``run_config.yaml`` (``train_config.yaml`` in a run
    made before the run store)."""
    for path in (run_dir / ARTEFACTS.run_config, run_dir / "train_config.yaml"):
        if path.is_file():
            return path
    raise SystemExit(
        f"error: {run_dir / ARTEFACTS.run_config} does not exist; is {run_dir} a run trained with `flora-ray train`?"
    )


def run_config(run_dir: Path, overrides: Sequence[str] = ()) -> Config:
    """The configuration a run's supernet was trained with, pointed at ``run_dir``."""
    return config_at(config_file(run_dir), run_dir, overrides)


def run_missing_stages(cfg: Config, local: bool, stages: Sequence[str] = PREPARED_STAGES) -> None:
    """Run ``stages`` of the run in order, from the first whose output is missing (all later ones are redone).

    Each stage runs with ``pipeline.run_stage`` (as ``flora-ray run`` does); ``local``: on ``LocalBackend``, in this
    process; otherwise on ``RayBackend`` with local Ray, started here only if a stage has to run.
    """
    store = RunStore.for_config(cfg)
    missing = [i for i, stage in enumerate(stages) if not store.is_file(STAGE_OUTPUTS[stage])]
    todo = list(stages[missing[0] :]) if missing else []
    if not todo:
        return
    with contextlib.nullcontext() if local else local_ray():
        backend = LocalBackend() if local else RayBackend()
        for stage in todo:
            started = time.perf_counter()
            run_stage(cfg, stage, backend)
            print(f"prepared {store.root}: {stage} in {time.perf_counter() - started:.0f} s", flush=True)


def _preparation(cfg: Config) -> dict[str, Any]:
    """What the prepared outputs depend on: every section but ``search`` (the benchmarks set their own budgets)."""
    return {k: v for k, v in config_to_dict(cfg).items() if k != "search"}


def prepare_base_run(run_dir: Path | None, smoke: bool, output: Path, overrides: Sequence[str] = ()) -> Path:
    """The run directory to benchmark: ``run_dir`` as given, else a prepared quickstart (or smoke digits) run.

    A prepared run is redone from scratch when its configuration (but for the ``search`` section) differs from the
    wanted one (the quickstart file or ``overrides`` changed).
    """
    if run_dir is not None:
        if not (run_dir / ARTEFACTS.supernet).is_file():
            raise SystemExit(f"error: {run_dir} has no {ARTEFACTS.supernet}; train it first or omit --run-dir")
        return run_dir
    if smoke:
        cfg = config_at(EXPERIMENTS / "digits_tiny.yaml", output / "runs" / SMOKE_RUN, [*SMOKE_OVERRIDES, *overrides])
    else:
        cfg = config_at(EXPERIMENTS / "quickstart.yaml", ROOT / "runs" / BENCH_RUN, overrides)
    target = cfg.run.run_dir
    if any(_preparation(config_at(path, target)) != _preparation(cfg) for path in recorded_configs(target)):
        print(f"{target} was prepared with another configuration: preparing it again", flush=True)
        shutil.rmtree(target)
    run_missing_stages(cfg, local=smoke)
    return target


@contextlib.contextmanager
def local_ray() -> Iterator[None]:
    """Local Ray on 127.0.0.1 for the block; shuts down only a Ray it started (never ``ray stop``)."""
    import ray

    started = not ray.is_initialized()
    init_ray(None)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


# --- ablation supernets beside it -------------------------------------------------------------------------------------


def variant_dir(base: Path, variant: str, runs_root: Path) -> Path:
    """``runs_root/bench-<base run>-<variant>``."""
    return runs_root / f"bench-{base.name.removeprefix('bench-')}-{variant.replace('_', '')}"


def same_source(recorded: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Whether a prepared variant was trained from the same teacher, space and result-changing configuration
    (paths and other speed-only keys may differ: the same runs reached through another path are reused, not
    deleted and retrained)."""
    return (
        recorded.get("teacher_sha256") == wanted["teacher_sha256"]
        and recorded.get("space") == wanted["space"]
        and not changed_result_keys(recorded.get("config", {}), wanted["config"])
    )


def reuse_or_clear(target: Path, reusable: bool, what: str) -> bool:
    """``True`` (and a line saying so) when ``target`` can be reused; otherwise ``target``, one of this benchmark's
    own ``bench-`` runs, is deleted if it exists and ``False`` returned."""
    if reusable:
        print(f"reusing {target} ({what})", flush=True)
        return True
    if target.exists():
        assert target.name.startswith("bench-"), target  # only ever delete this benchmark's own runs
        shutil.rmtree(target)
    return False


def prepare_ablation(
    base: Path, variant: str, ablation: tuple[tuple[str, ...], bool], *, runs_root: Path, local: bool
) -> Path:
    """Train (or reuse) one ablation supernet from the base run's teacher and training configuration.

    ``ablation`` is ``(overrides of the base run's configuration, whether the variant keeps the base run's trained
    space)``. The variant's run directory (``variant_dir``) gets the base run's teacher and, when the variant keeps
    it, the space the base supernet was trained on; ``train`` runs on ``LocalBackend`` if ``local``, else on local
    Ray. It is reused when ``bench_source.json`` (teacher hash, space, configuration) matches.
    """
    overrides, keep_space = ablation
    target = variant_dir(base, variant, runs_root)
    cfg = config_at(config_file(base), target, overrides)
    space = read_checkpoint_header(base / ARTEFACTS.supernet)["space"] if keep_space else None
    teacher = base / ARTEFACTS.teacher
    source = {"teacher_sha256": sha256_file(teacher), "space": space, "config": config_to_dict(cfg)}
    source = json.loads(json.dumps(source))  # as it reads back from the file (tuples become lists)
    marker = target / SOURCE_FILE
    trained = (target / ARTEFACTS.supernet).is_file() and marker.is_file()
    if reuse_or_clear(target, trained and same_source(read_json(marker), source), variant):
        return target
    store = RunStore(target)
    store.write_bytes(ARTEFACTS.teacher, teacher.read_bytes())
    if space is not None:
        store.write_json(ARTEFACTS.space, RankSpace.from_dict(space).to_dict())
    run_missing_stages(cfg, local, stages=("train",))
    write_json(marker, source)
    return target


# --- a run with a random-init teacher ---------------------------------------------------------------------------


def prepare_search_run(trials: int, eval_images: int, out: Path) -> tuple[Config, fr.Supernet]:
    """A run directory ``out/overhead`` of the quickstart configuration with a random-init teacher and its SVD
    supernet, ready to search (``trials`` trials, population 12, ``eval_images`` search images, one evaluator)."""
    cfg = load_config(
        EXPERIMENTS / "quickstart.yaml",
        [
            f"run.output_dir={out}",
            "run.name=overhead",
            f"search.trials={trials}",
            "search.population=12",
            f"search.eval_images={eval_images}",
            "search.concurrency=1",
        ],
    )
    spec = resolve_model_spec(cfg)
    store = RunStore.for_config(cfg)
    store.write_checkpoint(ARTEFACTS.teacher, spec.create().state_dict(), dense_checkpoint_metadata(spec))
    supernet, _ = build_run_supernet(cfg, store)
    fr.save_supernet(supernet, store.local_path(ARTEFACTS.supernet))
    return cfg, supernet


# --- the product's search on a trained supernet, one run per search seed ---------------------------------------------

SEARCH_INPUTS = (ARTEFACTS.teacher, ARTEFACTS.space, ARTEFACTS.filter_scores, ARTEFACTS.supernet)


def seed_run_dir(source: Path, seed: int, trials: int, runs_root: Path) -> Path:
    """``runs_root/bench-<source run>-seed<seed>-t<trials>``: where ``product_search`` searches ``source``'s
    supernet."""
    return runs_root / f"bench-{source.name.removeprefix('bench-')}-seed{seed}-t{trials}"


def product_search(source: Path, seed: int, trials: int, *, runs_root: Path, local: bool) -> Path:
    """The product's search stage on ``source``'s supernet with search seed ``seed`` and ``trials`` trials.

    The run directory (``seed_run_dir``) gets copies of ``source``'s teacher, space, filter scores and supernet (the
    files a child run, ``run.parent``, takes over; ablation supernets have no pretrain and filter markers, so the
    copy is made here) and ``source``'s configuration with ``search.seed`` and ``search.trials`` set; then
    ``search`` runs as ``flora-ray search`` runs it (``api.writing_run``, ``pipeline.run_stage``) on
    ``LocalBackend`` if ``local``, else on the Ray that the caller started (``local_ray``). A finished search with
    the same configuration and supernet is reused. Returns the run directory.
    """
    target = seed_run_dir(source, seed, trials, runs_root)
    overrides = [f"search.seed={seed}", f"search.trials={trials}"]
    cfg = config_at(config_file(source), target, overrides)
    wanted = {
        "config": json.loads(json.dumps(config_to_dict(cfg))),
        "supernet": sha256_file(source / ARTEFACTS.supernet),
    }
    marker = target / SOURCE_FILE
    done = StageMarker.read(RunStore(target), stage="search") if target.is_dir() else None
    searched = done is not None and marker.is_file()
    if reuse_or_clear(target, searched and _same_search(read_json(marker), wanted), f"search seed {seed}"):
        return target
    store = RunStore(target)
    for name in SEARCH_INPUTS:
        if (source / name).is_file():
            store.write_bytes(name, (source / name).read_bytes())
    started = time.perf_counter()
    with writing_run(cfg, ["search"], None, "local" if local else "ray"):
        run_stage(cfg, "search", LocalBackend() if local else RayBackend())
    print(f"searched {target} (seed {seed}, {trials} trials) in {time.perf_counter() - started:.0f} s", flush=True)
    write_json(marker, wanted)
    return target


def _same_search(recorded: dict[str, Any], wanted: dict[str, Any]) -> bool:
    return recorded.get("supernet") == wanted["supernet"] and not changed_result_keys(
        recorded.get("config", {}), wanted["config"]
    )


# --- evaluation and in-process search ---------------------------------------------------------------------------


class CachedEvaluator:
    """``Evaluator.evaluate`` memoised by configuration; evaluation is deterministic, so a repeat is free.

    Attributes:
        cache: ``(macs, accuracy)`` by rank tuple in layer order.
        eval_seconds: Time spent in real evaluations.
    """

    def __init__(self, evaluator: Evaluator) -> None:
        self.evaluator = evaluator
        self.space: RankSpace = evaluator.supernet.space
        self.cache: dict[tuple[int, ...], Point] = {}
        self.eval_seconds = 0.0

    def __call__(self, config: RankConfig) -> Point:
        key = tuple(int(config[fqn]) for fqn in self.space.fqns)
        if key not in self.cache:
            metrics = self.evaluator.evaluate(dict(zip(self.space.fqns, key, strict=True)))
            self.cache[key] = (metrics["macs"], metrics["accuracy"])
            self.eval_seconds += metrics["eval_seconds"]
        return self.cache[key]

    def macs(self, config: RankConfig) -> float:
        """MACs per image of ``config`` from the cost model (no evaluation)."""
        return float(self.evaluator.supernet.cost.macs(config))

    def full_rank(self) -> RankConfig:
        """Every factorised layer at full rank (the dense model's cost)."""
        return {layer.fqn: layer.max_rank for layer in self.space.layers}


def build_evaluator(cfg: Config, run_dir: Path, eval_images: int) -> CachedEvaluator:
    """The cached evaluator of a run's supernet on the first ``eval_images`` search-split images (one thread)."""
    torch.set_num_threads(max(cfg.run.threads_per_worker, 1))
    tensors, header = RunStore(run_dir).read_checkpoint(ARTEFACTS.supernet)
    supernet = supernet_from_numpy(header, {k: v.numpy() for k, v in tensors.items()})
    images, labels = search_batch(build_datasets(cfg.data).search, eval_images)
    return CachedEvaluator(Evaluator(supernet, images, labels, "cpu", cfg.search.batch_size))


def nsga2_search(space: RankSpace, evaluate: Evaluate, search: SearchConfig, trials: int, seed: int) -> list[Point]:
    """flora-ray's NSGA-II (the sampler settings and enqueued anchor points of ``stages.search.search_problem``),
    asked and told in this process on an in-memory study."""
    sampler = optuna.samplers.NSGAIISampler(
        population_size=search.population,
        mutation_prob=search.mutation_prob,
        crossover_prob=search.crossover_prob,
        seed=seed,
    )
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    for genes in anchor_points(space)[:trials]:
        study.enqueue_trial(genes)
    distributions = {
        b.name: optuna.distributions.CategoricalDistribution(list(range(len(b.candidates)))) for b in space.blocks
    }
    points = []
    for _ in range(trials):
        trial = study.ask(distributions)
        macs, accuracy = evaluate(genes_to_config(space, trial.params))
        study.tell(trial, [accuracy, macs])
        points.append((macs, accuracy))
    return points


def uniform_search(evaluate: CachedEvaluator) -> list[Point]:
    """Every uniform configuration (each ratio), largest first."""
    configs = evaluate.space.uniform_all()
    return [evaluate(configs[ratio]) for ratio in sorted(configs, reverse=True)]


def pareto_points(points: Sequence[Point]) -> list[Point]:
    df = pd.DataFrame(points, columns=["macs", "accuracy"])
    return [tuple(p) for p in df[pareto_mask(df)].to_numpy()]


def points_hypervolume(points: Sequence[Point], ref: Point) -> float:
    return hypervolume(pd.DataFrame(list(points), columns=["macs", "accuracy"]), ref) if points else 0.0

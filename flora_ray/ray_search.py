"""Ray glue for the search: a Ray Tune ``Tuner`` driven by Optuna's NSGA-II, results written to Parquet.

The Optuna study lives in a ``JournalStorage`` file in the run directory (``search_journal.log``) and the Tune
experiment under the run's storage path, so re-running an interrupted search continues it. Evaluator actors are
reused across trials (``reuse_actors=True``) and keep their supernet in a process cache; its weights travel once
through the object store as numpy arrays. MACs and parameters come from the analytic cost model.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from flora_ray.config import Config, build_dataclass, config_to_dict, dump_config
from flora_ray.core.space import RankSpace
from flora_ray.results import PARETO_FILE, TRIALS_FILE, UNIFORM_FILE, hypervolume, pareto_mask
from flora_ray.search.evaluator import (
    Evaluator,
    anchor_points,
    cached_evaluator,
    evaluator_builds,
    genes_to_config,
    search_batch,
    supernet_from_numpy,
)
from flora_ray.storage.files import atomic_path, read_checkpoint, write_json, write_parquet, write_text
from flora_ray.training.trainer import SUPERNET_FILE, provenance

logger = logging.getLogger(__name__)

JOURNAL_FILE = "search_journal.log"
SUMMARY_FILE = "search_summary.json"


def _build_evaluator(header: dict[str, Any], weights: dict[str, Any], config: dict[str, Any]) -> Evaluator:
    import torch

    from flora_ray.data.datasets import build_datasets

    cfg: Config = build_dataclass(Config, config, "")
    if cfg.run.threads_per_worker:
        torch.set_num_threads(cfg.run.threads_per_worker)
    on_gpu = cfg.scaling.accelerator == "GPU" and cfg.search.gpus_per_trial > 0  # a custom accelerator: CPU torch
    device = torch.device("cuda" if on_gpu and torch.cuda.is_available() else "cpu")
    supernet = supernet_from_numpy(header, weights, device)
    images, labels = search_batch(build_datasets(cfg.data).search, cfg.search.eval_images)
    return Evaluator(supernet, images, labels, device, cfg.search.batch_size)


def _evaluate_trial(
    genes: dict[str, Any], header=None, weights=None, config=None, key=None, fault_injection=None
) -> None:
    from ray import tune

    evaluator = cached_evaluator(key, lambda: _build_evaluator(header, weights, config))
    metrics = evaluator.evaluate(genes_to_config(evaluator.supernet.space, genes))
    _inject_fault(fault_injection, genes, metrics)
    metrics.update(pid=os.getpid(), evaluator_builds=evaluator_builds())
    tune.report(metrics)


def _inject_fault(fault_injection: dict[str, Any] | None, genes: dict[str, Any], metrics: dict[str, float]) -> None:
    """Tests only: a trial whose first gene equals ``raise_if_first_gene`` raises, ``nan_if_first_gene``: NaN."""
    if not fault_injection:
        return
    first = genes[sorted(genes)[0]]
    if first == fault_injection.get("raise_if_first_gene"):
        raise RuntimeError(f"injected evaluation failure (first gene {first})")
    if first == fault_injection.get("nan_if_first_gene"):
        metrics["accuracy"] = math.nan


def _searcher_class():
    from ray.tune.search.optuna import OptunaSearch

    class FloraOptunaSearch(OptunaSearch):
        """OptunaSearch that records parameters and evaluation time on the Optuna trial, marks NaN results as
        failed, and sets the MAC budget with ``Trial.set_constraint``."""

        def __init__(self, *args: Any, max_macs: float | None = None, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._max_macs = max_macs

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            ot_trial = self._ot_trials.get(trial_id)
            if result is not None and not all(
                isinstance(result.get(k), int | float) and math.isfinite(result[k]) for k in ("accuracy", "macs")
            ):
                result, error = None, True
            if ot_trial is not None and result is not None:
                for key in ("params", "eval_seconds"):
                    ot_trial.set_user_attr(key, float(result[key]))
                if self._max_macs is not None:
                    ot_trial.set_constraint("max_macs", float(result["macs"]) - self._max_macs)
            super().on_trial_complete(trial_id, result=result, error=error)

    return FloraOptunaSearch


def _progress_callback(total: int):
    from ray.tune import Callback

    class Progress(Callback):
        """Logs trials done / total, the current front size and hypervolume as results arrive."""

        def __init__(self, every_s: float = 5.0) -> None:
            self.points: list[tuple[float, float]] = []
            self.started = self.logged = time.perf_counter()
            self.every_s = every_s

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            if "accuracy" not in result or "macs" not in result:
                return
            self.points.append((float(result["macs"]), float(result["accuracy"])))
            now = time.perf_counter()
            if len(self.points) < total and now - self.logged < self.every_s:
                return
            self.logged = now
            df = pd.DataFrame(self.points, columns=["macs", "accuracy"])
            ref = (df["macs"].max() * 1.01, 0.0)
            done = len(self.points)
            rate = done / max(time.perf_counter() - self.started, 1e-9)
            logger.info(
                "search: %d/%d trials (this session), front %d, hypervolume %.4g, %.2f trials/s, ETA %.0f s",
                done,
                total,
                int(pareto_mask(df).sum()),
                hypervolume(df, ref),
                rate,
                max(total - done, 0) / rate,
            )

    return Progress()


def _trial_resources(cfg: Config) -> dict[str, float]:
    """What one evaluator asks Ray for: CPUs, plus a share of the accelerator (``GPU`` or a custom resource)."""
    resources = {"CPU": cfg.search.cpus_per_trial}
    if cfg.search.gpus_per_trial:
        resources[cfg.scaling.accelerator] = cfg.search.gpus_per_trial
    return resources


def run_search(cfg: Config, *, fault_injection: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run (or continue) the search of a run and write its Parquet files; returns a summary.

    ``fault_injection`` (tests only) makes chosen trials raise or return NaN; see ``_inject_fault``.
    """
    # Tune's default per-trial CSV/JSON/TensorBoard loggers duplicate what the Parquet files hold and cost time.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    # ...so the result grid cannot read them back and would warn once per trial; the Optuna journal has them.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    import optuna
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    run_dir = cfg.run.run_dir.resolve()
    supernet_path = run_dir / SUPERNET_FILE
    if not supernet_path.is_file():
        raise FileNotFoundError(f"no supernet at {str(supernet_path)!r}: run `flora-ray train CONFIG` first")
    write_text(run_dir / "search_config.yaml", dump_config(cfg))
    tensors, header = read_checkpoint(supernet_path)
    space = RankSpace.from_dict(header["space"], source=f"checkpoint {str(supernet_path)!r}")
    weights = {k: v.numpy() for k, v in tensors.items()}
    key = f"{supernet_path}:{supernet_path.stat().st_mtime_ns}:{cfg.data.name}:{cfg.search.eval_images}"
    trainable = tune.with_parameters(
        _evaluate_trial,
        header=header,
        weights=weights,
        config=config_to_dict(cfg),
        key=key,
        fault_injection=fault_injection,
    )
    trainable = tune.with_resources(trainable, _trial_resources(cfg))

    name = f"{cfg.run.name}-search"
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(run_dir / JOURNAL_FILE)))
    experiment = os.path.join(cfg.run.storage_path, name)
    started = time.perf_counter()
    if tune.Tuner.can_restore(experiment):
        logger.info("search: continuing %s", experiment)
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_errored=True)
    else:
        sampler = optuna.samplers.NSGAIISampler(
            population_size=cfg.search.population,
            mutation_prob=cfg.search.mutation_prob,
            crossover_prob=cfg.search.crossover_prob,
            seed=cfg.search.seed if cfg.search.seed is not None else cfg.run.seed,
        )
        searcher = _searcher_class()(
            space={b.name: tune.choice(list(range(len(b.candidates)))) for b in space.blocks},
            metric=["accuracy", "macs"],
            mode=["max", "min"],
            sampler=sampler,
            study_name=name,
            storage=storage,
            points_to_evaluate=anchor_points(space)[: cfg.search.trials],
            max_macs=cfg.search.max_macs,
        )
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=ConcurrencyLimiter(searcher, max_concurrent=cfg.search.concurrency),
                num_samples=cfg.search.trials,
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=cfg.run.storage_path,
                verbose=0,
                callbacks=[_progress_callback(cfg.search.trials)],
            ),
        )
    grid = tuner.fit()
    seconds = time.perf_counter() - started
    study = optuna.load_study(study_name=name, storage=storage)
    trials = trials_frame(study, space, cfg)
    uniform, dense_accuracy = evaluate_baselines(header, weights, cfg, space)
    _write_parquet(run_dir / TRIALS_FILE, trials, cfg)
    front = trials[trials["is_pareto"]].sort_values("macs").reset_index(drop=True)
    _write_parquet(run_dir / PARETO_FILE, front, cfg)
    _write_parquet(run_dir / UNIFORM_FILE, uniform, cfg)
    complete = trials[trials["state"] == "COMPLETE"]
    plot_front(run_dir / "pareto.png", complete, front, uniform)
    plot_hypervolume(run_dir / "hypervolume.png", trials, (float(uniform["macs"].max()) * 1.01, 0.0))
    finished = [t for t in study.trials if t.datetime_start and t.datetime_complete]
    span = (
        (max(t.datetime_complete for t in finished) - min(t.datetime_start for t in finished)).total_seconds()
        if finished
        else 0.0
    )
    ref = (float(uniform["macs"].max()) * 1.01, 0.0)
    summary = {
        "trials": len(trials),
        "complete": len(complete),
        "failed": int((trials["state"] == "FAIL").sum()),
        "front_size": len(front),
        "hypervolume": hypervolume(complete, ref) if len(complete) else 0.0,
        "dense_accuracy": dense_accuracy,
        "dense_macs": float(uniform["macs"].max()),
        "seconds": seconds,
        "trials_per_second": len(finished) / span if span else 0.0,  # over the whole study, all sessions
        "evaluator_builds": {str(k): v for k, v in _builds_per_process(grid).items()},
    }
    write_json(run_dir / SUMMARY_FILE, summary)
    logger.info("search: %s", summary)
    if summary["complete"] + summary["failed"] < cfg.search.trials:
        logger.warning(
            "search stopped after %d of %d trials; the files hold those; re-run the same command to continue",
            summary["complete"] + summary["failed"],
            cfg.search.trials,
        )
    return summary


def _builds_per_process(grid) -> dict[int, int]:
    builds: dict[int, int] = {}
    for result in grid:
        metrics = result.metrics or {}
        if "pid" in metrics and "evaluator_builds" in metrics:  # failed trials report nothing
            builds[int(metrics["pid"])] = max(builds.get(int(metrics["pid"]), 0), int(metrics["evaluator_builds"]))
    return builds


def trials_frame(study, space: RankSpace, cfg: Config) -> pd.DataFrame:
    """One row per Optuna trial: number, generation, genes as triples, ranks, objectives, state, ``is_pareto``."""
    rows = []
    for trial in study.trials:
        generation = next((v for k, v in trial.system_attrs.items() if k.endswith(":generation")), None)
        row: dict[str, Any] = {
            "trial": trial.number,
            # Enqueued uniform configurations carry no generation: they belong to the first one.
            "generation": 0 if generation is None else int(generation),
            "enqueued": generation is None,
            "state": trial.state.name,
            "accuracy": math.nan,
            "macs": math.nan,
            "params": trial.user_attrs.get("params", math.nan),
            "eval_seconds": trial.user_attrs.get("eval_seconds", math.nan),
            "triples": None,
            "ranks": None,
            "feasible": True,
        }
        if len(trial.params) == len(space.blocks):
            config = genes_to_config(space, trial.params)
            row["triples"] = json.dumps([list(t) for t in space.block_tuples(config)])
            row["ranks"] = json.dumps(config)
        if trial.values is not None:
            row["accuracy"], row["macs"] = float(trial.values[0]), float(trial.values[1])
        if cfg.search.max_macs is not None and not math.isnan(row["macs"]):
            row["feasible"] = row["macs"] <= cfg.search.max_macs
        rows.append(row)
    df = pd.DataFrame(rows)
    df["is_pareto"] = _feasible_front(df)
    return df


def _baselines_task(header: dict[str, Any], weights: dict[str, Any], dense_state: dict[str, Any], config):
    """Evaluate every uniform configuration and the dense model on the search images (one evaluator build)."""
    import torch

    from flora_ray.core.models import ModelSpec
    from flora_ray.training.trainer import accuracy

    evaluator = _build_evaluator(header, weights, config)
    rows = []
    for ratio, ranks in evaluator.supernet.space.uniform_all().items():
        rows.append({"ratio": ratio, "ranks": ranks, **evaluator.evaluate(ranks)})
    dense = ModelSpec.from_dict(header["model"]).create(device="meta")
    dense.load_state_dict({k: torch.from_numpy(v) for k, v in dense_state.items()}, strict=True, assign=True)
    images = torch.utils.data.TensorDataset(evaluator.images, evaluator.labels)
    # The same images and batch size as every trial.
    return rows, accuracy(dense.to(evaluator.device), images, evaluator.device, batch_size=evaluator.batch_size)


def evaluate_baselines(
    header: dict[str, Any], weights: dict[str, Any], cfg: Config, space: RankSpace
) -> tuple[pd.DataFrame, float]:
    """The uniform baseline (``uniform.parquet``: the trial columns plus ``ratio`` and ``in_space``) and the dense
    teacher's accuracy, evaluated like a trial (same images, same code) in one Ray task with a trial's resources."""
    import ray

    from flora_ray.training.trainer import resolve_model_spec, teacher_source

    dense = resolve_model_spec(cfg).create(pretrained=teacher_source(cfg, cfg.run.run_dir))
    dense_state = {k: v.detach().cpu().numpy() for k, v in dense.state_dict().items()}
    resources = _trial_resources(cfg)
    task = ray.remote(_baselines_task).options(
        num_cpus=resources.pop("CPU"), num_gpus=resources.pop("GPU", 0), resources=resources or None
    )
    rows, dense_accuracy = ray.get(task.remote(header, weights, dense_state, config_to_dict(cfg)))
    frame = pd.DataFrame(
        {
            "trial": pd.array([None] * len(rows), dtype="Int64"),  # not Optuna trials
            "generation": pd.array([None] * len(rows), dtype="Int64"),
            "enqueued": False,
            "state": "COMPLETE",
            "accuracy": [r["accuracy"] for r in rows],
            "macs": [r["macs"] for r in rows],
            "params": [r["params"] for r in rows],
            "eval_seconds": [r["eval_seconds"] for r in rows],
            "triples": [json.dumps([list(t) for t in space.block_tuples(r["ranks"])]) for r in rows],
            "ranks": [json.dumps(r["ranks"]) for r in rows],
            "feasible": [cfg.search.max_macs is None or r["macs"] <= cfg.search.max_macs for r in rows],
            "ratio": [r["ratio"] for r in rows],
            "in_space": [space.contains(r["ranks"]) for r in rows],
        }
    )
    frame.insert(frame.columns.get_loc("feasible") + 1, "is_pareto", _feasible_front(frame))
    return frame, dense_accuracy


def _feasible_front(df: pd.DataFrame) -> pd.Series:
    """``is_pareto``: non-dominated among the complete, feasible rows."""
    mask = pd.Series(False, index=df.index)
    candidates = df[(df["state"] == "COMPLETE") & df["feasible"]]
    if len(candidates):
        mask[candidates.index[pareto_mask(candidates)]] = True
    return mask


def _write_parquet(path: Path, df: pd.DataFrame, cfg: Config) -> None:
    seed = cfg.search.seed if cfg.search.seed is not None else cfg.run.seed
    write_parquet(path, pa.Table.from_pandas(df, preserve_index=False), provenance(cfg, seed=seed))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: Path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    _pyplot().close(fig)


def plot_front(path: Path, trials: pd.DataFrame, front: pd.DataFrame, uniform: pd.DataFrame) -> None:
    """Accuracy versus GMACs: every trial, the front, the uniform baseline and the full-rank (dense-cost) model."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.scatter(trials["macs"] / 1e9, trials["accuracy"], s=10, color="0.75", label="trials")
    ax.step(front["macs"] / 1e9, front["accuracy"], where="post", color="C0", marker="o", label="Pareto front")
    ordered = uniform.sort_values("macs")
    ax.plot(ordered["macs"] / 1e9, ordered["accuracy"], color="C1", marker="s", linestyle="--", label="uniform ranks")
    full = ordered.iloc[-1]
    ax.scatter([full["macs"] / 1e9], [full["accuracy"]], color="C3", marker="*", s=120, zorder=5, label="full rank")
    ax.set_xlabel("GMACs per image")
    ax.set_ylabel("search-split accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    _save_figure(fig, path)


def plot_hypervolume(path: Path, trials: pd.DataFrame, ref: tuple[float, float]) -> None:
    """Hypervolume of the trials so far, by trial number."""
    plt = _pyplot()
    done = trials[trials["state"] == "COMPLETE"].sort_values("trial")
    values = [hypervolume(done.iloc[: i + 1], ref) for i in range(len(done))]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot(done["trial"], values, color="C0")
    ax.set_xlabel("trial")
    ax.set_ylabel("hypervolume (MACs x accuracy points)")
    ax.grid(alpha=0.3)
    _save_figure(fig, path)

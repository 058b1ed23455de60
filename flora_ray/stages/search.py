"""The search stage: NSGA-II over the (filtered) space on a backend, then the trials, front and baseline files.

The Optuna study lives in a journal file in the run (``search_journal.log``), so re-running an interrupted search
continues it. Evaluators keep their supernet across trials; its weights travel once to each evaluator process as
numpy arrays. MACs and parameters come from the analytic cost model, latency from the run's latency table
(``stages.profile``); ``search.objectives`` picks the axis searched beside accuracy and the budgets become Optuna
constraints (``search.objectives``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pandas as pd

from flora_ray.backends.base import Backend, SearchJob
from flora_ray.config import Config, config_to_dict
from flora_ray.core.cost import build_cost_model
from flora_ray.core.models import ModelSpec
from flora_ray.core.space import RankSpace
from flora_ray.records import SearchSummary
from flora_ray.results import hypervolume
from flora_ray.search.evaluator import anchor_points, module_from_numpy, search_images
from flora_ray.search.frames import trials_frame, uniform_frame
from flora_ray.search.objectives import Objectives, dense_value, latency_predictor, resolve_bounds, subnet_costs
from flora_ray.search.plots import front_figure, hypervolume_figure
from flora_ray.search.sensitivity import evenly, guided_points, layer_rows
from flora_ray.search.study import DUPLICATE_OF, SearchProblem, finished_trials, search_budget
from flora_ray.stages.inputs import load_teacher, open_run, provenance, ray_storage, study_name, working_dir
from flora_ray.stages.preflight import preflight
from flora_ray.stages.profile import run_latency_model
from flora_ray.storage.files import write_bytes
from flora_ray.storage.run_store import ARTEFACTS, RunStore

logger = logging.getLogger(__name__)


def trial_resources(cfg: Config) -> dict[str, float]:
    """What one evaluator asks for: CPUs, plus a share of the accelerator (``GPU`` or a custom resource)."""
    resources = {"CPU": cfg.search.cpus_per_trial}
    if cfg.search.gpus_per_trial:
        resources[cfg.scaling.accelerator] = cfg.search.gpus_per_trial
    return resources


def search_bundles(cfg: Config) -> list[dict[str, float]]:
    """What the stage asks Ray for at once (``flora-ray plan``): ``search.concurrency`` evaluators."""
    return [trial_resources(cfg)] * cfg.search.concurrency


def search_work(cfg: Config, *, workload: Any) -> float:
    """The stage's MACs for ``flora-ray plan`` (``workload``: a ``plan.Workload``): every trial and the uniform and
    dense baselines scored on ``search.eval_images`` at the mean uniform configuration's cost."""
    return (cfg.search.trials + 8) * cfg.search.eval_images * workload.mean_macs


def search_parallel(cfg: Config, *, workload: Any, cluster: bool) -> float:
    """Accelerators busy at once on a cluster (evaluators x their share of one); evaluators on this machine."""
    return cfg.search.concurrency * (cfg.search.gpus_per_trial or 1.0) if cluster else cfg.search.concurrency


def search_seed(cfg: Config) -> int:
    return cfg.search.seed if cfg.search.seed is not None else cfg.run.seed


def search_problem(cfg: Config, store: RunStore, journal: JournalSync | None = None) -> SearchProblem:
    """The run's search: its supernet (read once), genes, anchors, study settings and journal."""
    journal = journal or JournalSync(cfg, store)
    tensors, header = store.read_checkpoint(ARTEFACTS.supernet)
    space = RankSpace.from_dict(header["space"], source=f"checkpoint {store.location(ARTEFACTS.supernet)!r}")
    info = store.filesystem.get_file_info(store.location(ARTEFACTS.supernet))
    objectives = search_objectives(cfg, store, space, ModelSpec.from_dict(header["model"]))
    genes = {b.name: len(b.candidates) for b in space.blocks}
    return SearchProblem(
        header=header,
        weights={k: v.numpy() for k, v in tensors.items()},
        config=config_to_dict(cfg),
        key=f"{info.path}:{info.mtime_ns}:{cfg.data.name}:{cfg.data.seed}:{cfg.search.eval_images}:{cfg.search.bn_recalibration_images}",
        genes=genes,
        anchors=anchor_points(space),
        trials=search_budget(cfg.search.trials, genes),
        study_name=study_name(cfg),
        journal=str(journal.local),
        objectives=objectives,
        sampler_args={
            "population_size": cfg.search.population,
            "mutation_prob": cfg.search.mutation_prob,
            "crossover_prob": cfg.search.crossover_prob,
            "seed": search_seed(cfg),
        },
    )


def search_objectives(cfg: Config, store: RunStore, space: RankSpace, spec: ModelSpec) -> Objectives:
    """The search's cost axis, absolute budgets (checked against ``space``) and latency predictor."""
    cost = build_cost_model(spec.create(device="meta"))
    latency = run_latency_model(cfg, store, space, cost)
    bounds = resolve_bounds(cfg.search, space, cost, latency)
    return Objectives(cfg.search.cost_axis, bounds, latency.to_dict() if latency is not None else None)


class JournalSync:
    """The Optuna journal of a run whose storage is not local: a working copy on this machine, copied to the run's
    storage after every trial and fetched from it when the copy here is missing or behind (a new head)."""

    def __init__(self, cfg: Config, store: RunStore) -> None:
        self.store = store
        self.local = store.local_path(ARTEFACTS.journal) if store.is_local else working_dir(cfg) / ARTEFACTS.journal
        self.local.parent.mkdir(parents=True, exist_ok=True)

    def fetch(self) -> None:
        """Bring the stored journal here unless the copy here already holds it (the log only grows)."""
        if self.store.is_local or not self.store.is_file(ARTEFACTS.journal):
            return
        stored = self.store.read_bytes(ARTEFACTS.journal)
        if not self.local.is_file() or self.local.stat().st_size < len(stored):
            write_bytes(self.local, stored)

    def __call__(self) -> None:
        """Copy the journal to the run's storage (atomically there)."""
        if not self.store.is_local and self.local.is_file():
            self.store.write_bytes(ARTEFACTS.journal, self.local.read_bytes())


def baselines_task(problem: SearchProblem, dense_state: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every uniform configuration and the dense model on the search images (one evaluator build, the same images
    and batch size as every trial, so each trial pairs with them image by image); the dense model's
    ``Evaluator.model_metrics``."""
    evaluator = problem.build_evaluator()
    latency = latency_predictor(problem.objectives)
    rows = []
    for ratio, ranks in evaluator.supernet.space.uniform_all().items():
        costs = subnet_costs(ranks, evaluator.supernet.cost, latency)
        rows.append({"ratio": ratio, "ranks": ranks, **evaluator.evaluate(ranks), **costs})
    spec = ModelSpec.from_dict(problem.header["model"])
    dense = module_from_numpy(lambda where: spec.create(device=where), dense_state)
    return rows, evaluator.model_metrics(dense.to(evaluator.device).eval())


def sensitivity_task(problem: SearchProblem) -> list[dict[str, Any]]:
    """Full rank and each layer alone at its lowest rank (the rest at full rank) on the search images: each row's
    ``accuracy``, paired ``drop`` from full rank with ``drop_se`` (points), ``macs`` and ``macs_saved``."""
    keep = ("kind", "block", "accuracy", "drop", "drop_se", "macs", "macs_saved")
    return [{"layer": r["name"] if r["kind"] == "layer" else None, **{k: r.get(k) for k in keep}}
            for r in layer_rows(problem.build_evaluator())]  # fmt: skip


SUPERNET_KEY = "flora_ray.search_key"  # sensitivity.parquet's metadata: the supernet, data and images it was scored on


def guided_anchors(
    cfg: Config, store: RunStore, problem: SearchProblem, space: RankSpace, backend: Backend
) -> list[dict[str, int]]:
    """The genes of the sensitivity-guided allocations the search evaluates first (``search.guided_anchors``): the
    layers' sensitivities from the run's ``sensitivity.parquet`` when it was measured on this supernet and these
    images, else measured now (one evaluator task) and written; those of the allocations the space holds that are
    not anchors already, at most ``search.population`` and half of the trials the other anchors leave."""
    if not cfg.search.guided_anchors:
        return []
    import pyarrow.parquet as pq

    stored = None
    if store.is_file(ARTEFACTS.sensitivity):
        schema = pq.read_schema(store.location(ARTEFACTS.sensitivity), filesystem=store.filesystem)
        if (schema.metadata or {}).get(SUPERNET_KEY.encode(), b"").decode() == problem.key:
            stored = store.read_parquet(ARTEFACTS.sensitivity, "sensitivity table")
    if stored is None:
        started = time.perf_counter()
        rows = backend.call(sensitivity_task, problem, resources=trial_resources(cfg), retries=cfg.run.max_failures)
        stored = pd.DataFrame(rows)
        store.write_parquet(ARTEFACTS.sensitivity, stored, {**provenance(cfg, seed=search_seed(cfg)),
                                                            SUPERNET_KEY: problem.key})  # fmt: skip
        logger.info("search: layer sensitivities measured in %.1f s (%d evaluations)",
                    time.perf_counter() - started, len(stored))  # fmt: skip
    layers = stored[stored["kind"] == "layer"]
    cost = build_cost_model(ModelSpec.from_dict(problem.header["model"]).create(device="meta"))
    points = guided_points(space, dict(zip(layers["layer"], layers["drop"], strict=True)), cost)
    room = (problem.trials - len(problem.anchors)) // 2  # NSGA-II keeps at least half of the trials left
    new = evenly([p for p in points if p not in problem.anchors], max(0, min(cfg.search.population, room)))
    logger.info("search: %d sensitivity-guided allocations evaluated first (%d the space holds; layer drops "
                "%.2f to %.2f points)", len(new), len(points), layers["drop"].min(), layers["drop"].max())  # fmt: skip
    return new


def search_stage(cfg: Config, backend: Backend) -> dict[str, Any]:
    """Run (or continue) the search of a run on ``backend`` and write its files; returns a summary."""
    store = open_run(cfg)
    preflight(cfg, "search", store)
    journal = JournalSync(cfg, store)
    journal.fetch()
    problem = search_problem(cfg, store, journal)
    space = RankSpace.from_dict(problem.header["space"])
    started = time.perf_counter()
    problem.images, problem.labels = backend.call(
        search_images, problem.config, resources=trial_resources(cfg), retries=cfg.run.max_failures
    )
    logger.info("search: %d search images (%.0f MB of uint8 pixels)", len(problem.labels), problem.images.nbytes / 1e6)
    guided = guided_anchors(cfg, store, problem, space, backend)
    problem.anchors = [*problem.anchors, *guided]
    path, filesystem = ray_storage(store)
    retries = cfg.run.max_failures
    job = SearchJob(problem, trial_resources(cfg), cfg.search.concurrency, path, filesystem, journal, retries)
    builds = backend.search(job)
    journal()
    seconds = time.perf_counter() - started
    study = problem.load_study()
    trials = trials_frame(study, space, problem.objectives)
    (dense,) = load_teacher(cfg, store)
    dense_state = {k: v.detach().cpu().numpy() for k, v in dense.state_dict().items()}
    rows, dense_metrics = backend.call(
        baselines_task, problem, dense_state, resources=trial_resources(cfg), retries=cfg.run.max_failures
    )
    uniform = uniform_frame(rows, space, problem.objectives)
    summary = SearchSummary(
        **write_search_outputs(cfg, store, study, trials, uniform), **dense_costs(problem),
        dense_accuracy=dense_metrics["accuracy"], dense_accuracy_se=dense_metrics["accuracy_se"],
        eval_images=dense_metrics["eval_images"], seconds=seconds, evaluator_builds={str(k): v for k, v in builds.items()},
        budget=problem.trials, guided_anchors=len(guided),
        dense_correct=dense_metrics["correct"],  # pairs with every trial's; in the file, not in the stage's summary
    )  # fmt: skip
    summary.write(store)
    logger.info("search: %s", summary.stage_summary())
    return summary.stage_summary()  # an unfinished search is the caller's to report: see stages.STAGES


def dense_costs(problem: SearchProblem) -> dict[str, float]:
    """The dense model's MACs, parameters and predicted latency (NaN without a latency table)."""
    spec = ModelSpec.from_dict(problem.header["model"])
    cost, latency = build_cost_model(spec.create(device="meta")), latency_predictor(problem.objectives)
    out = {f"dense_{axis}": dense_value(axis, cost, latency) for axis in ("macs", "params")}
    out["dense_latency_ms"] = latency.dense_ms if latency is not None else float("nan")
    return {**out, "cost_axis": problem.objectives.cost, "latency_batch": latency.batch if latency else None}


def write_search_outputs(cfg: Config, store: RunStore, study, trials, uniform) -> dict[str, Any]:
    """``trials``/``pareto``/``uniform.parquet`` and the plots; returns the summary's figures."""
    axis = cfg.search.cost_axis
    metadata = provenance(cfg, seed=search_seed(cfg), cost_axis=axis)
    front = trials[trials["is_pareto"]].sort_values(axis).reset_index(drop=True)
    for name, frame in ((ARTEFACTS.trials, trials), (ARTEFACTS.pareto, front), (ARTEFACTS.uniform, uniform)):
        store.write_parquet(name, frame, metadata)
    complete = trials[trials["state"] == "COMPLETE"]
    ref = (float(uniform[axis].max()) * 1.01, 0.0)
    store.save_figure(ARTEFACTS.pareto_plot, front_figure(complete, front, uniform, axis))
    store.save_figure(ARTEFACTS.hypervolume_plot, hypervolume_figure(trials, ref, axis))
    finished = [t for t in study.trials if t.datetime_start and t.datetime_complete]
    span = (
        (max(t.datetime_complete for t in finished) - min(t.datetime_start for t in finished)).total_seconds()
        if finished
        else 0.0
    )
    return {
        "trials": len(trials),
        "complete": len(complete),
        "failed": int((trials["state"] == "FAIL").sum()),
        "front_size": len(front),
        "hypervolume": hypervolume(complete, ref, axis) if len(complete) else 0.0,
        "hypervolume_share": (hypervolume(complete, ref, axis) / (ref[0] * 100.0)) if len(complete) else 0.0,
        "trials_per_second": len(finished) / span if span else 0.0,  # the whole study, all sessions
        "distinct_configurations": int(trials.loc[trials["state"] == "COMPLETE", "ranks"].nunique()),
        "repeats_answered": sum(DUPLICATE_OF in t.user_attrs for t in study.trials),  # no evaluation, no budget
        "finished": finished_trials(study),  # the trials spent from the budget
    }

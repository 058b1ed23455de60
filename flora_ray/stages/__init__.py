"""The pipeline's stages, each a public function ``stage(cfg, backend) -> summary`` on any backend.

``profile`` (latency table on the target device) -> ``pretrain`` (dense teacher) -> ``filter`` (per-block candidates) -> ``train`` (supernet) -> ``search`` (NSGA-II
front) -> ``export`` (knee point) -> ``finetune`` (when ``finetune.enabled``) -> ``report``. ``STAGES`` is the one table the pipeline, the CLI and
``flora-ray plan`` share; each entry holds what is particular to its stage: whether its inputs are checked in
preflight, how to tell that a finished call left work, what its command prints, and what it asks of a cluster
(``Demand``), so that no caller dispatches on stage names. Each stage's module (torch, timm, Ray) is imported when
one of its functions is first called (``lazy``), so reading the table (the CLI's ``--help``, ``flora-ray list``)
stays light.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


def lazy(module: str, name: str) -> Callable[..., Any]:
    """``module.name``, the module imported at the first call."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__qualname__ = call.__name__ = name
    return call


def _search_left_work(cfg: Any, summary: Mapping[str, Any]) -> str | None:
    """The search's budget (``search.study.search_budget``: ``search.trials`` capped at the space's size) not spent."""
    from flora_ray.records import SearchSummary

    search = SearchSummary.from_dict(summary, source="the search stage's summary")
    budget = search.budget if search.budget is not None else cfg.search.trials
    if search.spent < budget:
        return f"search stopped after {search.spent} of {budget} trials; re-run the same command to continue"
    return None


def describe_outputs(summary: Mapping[str, Any], *, seconds: float, stage: str) -> str:
    """What a stage command prints by default: where its output went and its final metrics."""
    metrics = ", ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.get("metrics", {}).items()
    )
    return f"{stage}: done in {seconds:.0f} s -> {summary.get('output', '')}\n  {metrics}"


def _nothing(*args: Any, **kwargs: Any) -> None:
    return None


def _no_work(cfg: Any, *, workload: Any) -> float:
    return 0.0


def _one(cfg: Any, *, workload: Any, cluster: bool) -> float:
    return 1.0


@dataclass(frozen=True)
class Demand:
    """What a stage asks of a cluster, for ``flora-ray plan`` (``workload`` is a ``plan.Workload``).

    Attributes:
        bundles: ``bundles(cfg)``: the resource bundles it asks Ray for at once.
        work: ``work(cfg, workload=...)``: its multiply-accumulates.
        parallel: ``parallel(cfg, workload=..., cluster=...)``: accelerators (on this machine: workers) busy at once.
        skipped: ``skipped(cfg, workload=...)``: why it will have nothing to do, or ``None``.
        time: ``time(cfg, workload=...) -> (seconds, source)`` for a stage whose time is not its MACs over a rate.
    """

    bundles: Callable[[Any], list[dict[str, float]]]
    work: Callable[..., float] = _no_work
    parallel: Callable[..., float] = _one
    skipped: Callable[..., str | None] = _nothing
    time: Callable[..., tuple[float, str]] | None = None


@dataclass(frozen=True, kw_only=True)
class Stage:
    """One stage of the pipeline.

    Attributes:
        name: The stage's name (CLI subcommand, completion marker).
        run: ``run(cfg, backend) -> summary``.
        help: One line for ``--help``.
        preflight: Whether ``stages.preflight`` checks its inputs before any work starts.
        left_work: ``(cfg, summary) -> message`` when the call finished without completing the stage.
        describe: ``(summary, seconds=...) -> text``: what its command prints (default: output and metrics).
        demand: What it asks of a cluster (``flora-ray plan``); ``None``: not planned.
        command: Whether ``flora-ray <name> CONFIG`` runs it alone (export and finetune have commands of their own
            that read a run; the report is written by ``run``).
    """

    name: str
    run: Callable[[Any, Any], dict[str, Any]]
    help: str
    preflight: bool = True
    left_work: Callable[[Any, Mapping[str, Any]], str | None] = _nothing
    describe: Callable[..., str] | None = None
    demand: Demand | None = None
    command: bool = True

    def summarize(self, summary: Mapping[str, Any], *, seconds: float) -> str:
        """What the stage's command prints when it finishes with ``summary`` after ``seconds``."""
        if "skipped" in summary:
            return f"{self.name}: skipped ({summary['skipped']})"
        if self.describe is None:
            return describe_outputs(summary, seconds=seconds, stage=self.name)
        return self.describe(summary, seconds=seconds)


def _stage_functions(module: str, *names: str) -> list[Callable[..., Any]]:
    return [lazy(f"flora_ray.stages.{module}", name) for name in names]


def _table() -> dict[str, Stage]:
    profile_bundles, profile_skipped, profile_time = _stage_functions(
        "profile", "profile_bundles", "profile_skipped", "profile_time"
    )
    training_bundles, training_parallel = _stage_functions("training", "training_bundles", "training_parallel")
    trial = _stage_functions("search", "search_bundles", "search_work", "search_parallel")
    stages = (
        Stage(name="profile", run=lazy("flora_ray.stages.profile", "profile_stage"),
              help="measure the latency table on the target device", preflight=False,
              describe=lazy("flora_ray.stages.profile", "describe_profile"),
              demand=Demand(profile_bundles, skipped=profile_skipped, time=profile_time)),
        Stage(name="pretrain", run=lazy("flora_ray.stages.training", "pretrain"),
              help="train the dense teacher on the configured data",
              demand=Demand(training_bundles, lazy("flora_ray.stages.training", "pretrain_work"), training_parallel,
                            lazy("flora_ray.stages.training", "pretrain_skipped"))),
        Stage(name="filter", run=lazy("flora_ray.stages.filter", "filter_stage"),
              help="filter each block's rank candidates with local supernets",
              describe=lazy("flora_ray.stages.filter", "describe_filter"),
              demand=Demand(*_stage_functions("filter", "filter_bundles", "filter_work", "filter_parallel"))),
        Stage(name="train", run=lazy("flora_ray.stages.training", "train"),
              help="train the FLORA supernet by distillation from the teacher",
              demand=Demand(training_bundles, lazy("flora_ray.stages.training", "train_work"), training_parallel)),
        Stage(name="search", run=lazy("flora_ray.stages.search", "search_stage"),
              help="NSGA-II search of the (filtered) space; Pareto front to Parquet", left_work=_search_left_work,
              describe=lazy("flora_ray.records", "describe_search"), demand=Demand(*trial)),
        Stage(name="export", run=lazy("flora_ray.stages.export", "export_stage"),
              help="export the knee point of the front", preflight=False, command=False,
              demand=Demand(*_stage_functions("export", "export_bundles", "export_work"))),
        Stage(name="finetune", run=lazy("flora_ray.stages.finetune", "finetune_stage"),
              help="fine-tune an exported subnet from the teacher (finetune.enabled)", preflight=False,
              command=False),
        Stage(name="report", run=lazy("flora_ray.stages.report", "report_stage"), help="write report.md",
              preflight=False, command=False),
    )  # fmt: skip
    return {stage.name: stage for stage in stages}


STAGES: dict[str, Stage] = _table()


def stages_from(first: str) -> list[str]:
    """``first`` and the stages after it, in pipeline order."""
    names = list(STAGES)
    return names[names.index(first) :]


__all__ = ["STAGES", "Demand", "Stage", "describe_outputs", "lazy", "stages_from"]

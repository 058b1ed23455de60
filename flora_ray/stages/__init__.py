"""The pipeline's stages, each a public function ``stage(cfg, backend) -> summary`` on any backend.

``profile`` (latency table on the target device) -> ``pretrain`` (dense teacher) -> ``filter`` (per-block candidates) -> ``train`` (supernet) -> ``search`` (NSGA-II
front) -> ``export`` (knee point) -> ``finetune`` (when ``finetune.enabled``) -> ``report``. ``STAGES`` is the one table the pipeline and the CLI share; each
entry says whether the stage's inputs are checked in preflight and how to tell that a finished call left work.
Each stage's module (torch, timm, Ray) is imported when the stage first runs, so reading the table (the CLI's
``--help``, ``flora-ray list``) stays light.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def lazy(module: str, name: str) -> Callable[[Any, Any], dict[str, Any]]:
    """``module.name(cfg, backend)``, the module imported at the first call."""

    def run(cfg: Any, backend: Any) -> dict[str, Any]:
        return getattr(importlib.import_module(module), name)(cfg, backend)

    run.__qualname__ = run.__name__ = name
    return run


def _search_left_work(cfg: Any, summary: dict[str, Any]) -> str | None:
    """The search's budget (``search.study.search_budget``: ``search.trials`` capped at the space's size) not spent."""
    from flora_ray.stages.records import SearchSummary

    search = SearchSummary.from_dict(summary, source="the search stage's summary")
    budget = search.budget if search.budget is not None else cfg.search.trials
    if search.spent < budget:
        return f"search stopped after {search.spent} of {budget} trials; re-run the same command to continue"
    return None


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline.

    Attributes:
        name: The stage's name (CLI subcommand, completion marker).
        run: ``run(cfg, backend) -> summary``.
        help: One line for ``--help``.
        preflight: Whether ``stages.preflight`` checks its inputs before any work starts.
        left_work: ``(cfg, summary) -> message`` when the call finished without completing the stage.
    """

    name: str
    run: Callable[[Any, Any], dict[str, Any]]
    help: str
    preflight: bool = True
    left_work: Callable[[Any, dict[str, Any]], str | None] = lambda cfg, summary: None


STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage("profile", lazy("flora_ray.stages.profile", "profile_stage"),
              "measure the latency table on the target device", preflight=False),
        Stage("pretrain", lazy("flora_ray.stages.training", "pretrain"), "train the dense teacher on the configured data"),
        Stage("filter", lazy("flora_ray.stages.filter", "filter_stage"),
              "filter each block's rank candidates with local supernets"),
        Stage("train", lazy("flora_ray.stages.training", "train"),
              "train the FLORA supernet by distillation from the teacher"),
        Stage("search", lazy("flora_ray.stages.search", "search_stage"),
              "NSGA-II search of the (filtered) space; Pareto front to Parquet", True, _search_left_work),
        Stage("export", lazy("flora_ray.stages.export", "export_stage"), "export the knee point of the front",
              preflight=False),
        Stage("finetune", lazy("flora_ray.stages.finetune", "finetune_stage"),
              "fine-tune an exported subnet from the teacher (finetune.enabled)", preflight=False),
        Stage("report", lazy("flora_ray.stages.report", "report_stage"), "write report.md", preflight=False),
    )
}  # fmt: skip

__all__ = ["STAGES", "Stage"]

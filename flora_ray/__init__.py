"""flora-ray: FLORA low-rank architecture search for Vision Transformers on Ray.

``flora_ray.run(config)`` runs the whole pipeline from Python and returns a ``Run``; ``flora_ray.Run.open(path)``
reopens any run (its configuration, trials, front, uniform baseline, Optuna study, subnets and exports);
``flora_ray.list_runs(prefix)`` lists the runs under a storage prefix and ``flora_ray.compare(runs)`` puts their fronts
in one frame.

The library API, in data-flow order: ``build_supernet`` (SVD surgery on a timm model), ``RankSpace`` (the
per-block rank candidates), ``build_cost_model`` (exact MACs and parameters), ``LatencyModel`` (latency predicted
from a run's latency table), ``extract_subnet`` /
``save_subnet`` / ``load_subnet`` (export).

The names are imported on first use (PEP 562), so that ``import flora_ray.config`` (parsing a configuration) does
not import torch or timm.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "Run": "flora_ray.api",
    "run": "flora_ray.api",
    "compare": "flora_ray.registry",
    "list_runs": "flora_ray.registry",
    "run_status": "flora_ray.registry",
    "CostModel": "flora_ray.core.cost",
    "build_cost_model": "flora_ray.core.cost",
    "LatencyModel": "flora_ray.core.latency",
    "ElasticLowRankLinear": "flora_ray.core.lowrank",
    "factorize": "flora_ray.core.lowrank",
    "ModelSpec": "flora_ray.core.models",
    "create_model": "flora_ray.core.models",
    "RankSpace": "flora_ray.core.space",
    "load_rank_file": "flora_ray.core.space",
    "load_reference_yaml": "flora_ray.core.space",
    "extract_subnet": "flora_ray.core.subnet",
    "load_subnet": "flora_ray.core.subnet",
    "save_subnet": "flora_ray.core.subnet",
    "Supernet": "flora_ray.core.supernet",
    "build_supernet": "flora_ray.core.supernet",
    "load_supernet": "flora_ray.core.supernet",
    "save_supernet": "flora_ray.core.supernet",
}

__all__ = [
    "CostModel",
    "ElasticLowRankLinear",
    "LatencyModel",
    "ModelSpec",
    "RankSpace",
    "Run",
    "Supernet",
    "__version__",
    "build_cost_model",
    "build_supernet",
    "compare",
    "create_model",
    "extract_subnet",
    "factorize",
    "list_runs",
    "load_rank_file",
    "load_reference_yaml",
    "load_subnet",
    "load_supernet",
    "run",
    "run_status",
    "save_subnet",
    "save_supernet",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names come from __getattr__
    from flora_ray.api import Run, run
    from flora_ray.core.cost import CostModel, build_cost_model
    from flora_ray.core.latency import LatencyModel
    from flora_ray.core.lowrank import ElasticLowRankLinear, factorize
    from flora_ray.core.models import ModelSpec, create_model
    from flora_ray.core.space import RankSpace, load_rank_file, load_reference_yaml
    from flora_ray.core.subnet import extract_subnet, load_subnet, save_subnet
    from flora_ray.core.supernet import Supernet, build_supernet, load_supernet, save_supernet
    from flora_ray.registry import compare, list_runs, run_status


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

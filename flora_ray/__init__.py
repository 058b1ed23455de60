"""flora-ray: FLORA low-rank architecture search for Vision Transformers on Ray.

The library API, in data-flow order: ``build_supernet`` (SVD surgery on a timm model), ``RankSpace`` (the
per-block rank candidates), ``build_cost_model`` (exact MACs and parameters), ``extract_subnet`` /
``save_subnet`` / ``load_subnet`` (export).
"""

__version__ = "0.1.0"

from flora_ray.core.cost import CostModel, build_cost_model
from flora_ray.core.lowrank import ElasticLowRankLinear, factorize
from flora_ray.core.models import ModelSpec, create_model
from flora_ray.core.space import RankSpace, load_rank_file, load_reference_yaml
from flora_ray.core.subnet import extract_subnet, load_subnet, save_subnet
from flora_ray.core.supernet import Supernet, build_supernet, load_supernet, save_supernet

__all__ = [
    "CostModel",
    "ElasticLowRankLinear",
    "ModelSpec",
    "RankSpace",
    "Supernet",
    "__version__",
    "build_cost_model",
    "build_supernet",
    "create_model",
    "extract_subnet",
    "factorize",
    "load_rank_file",
    "load_reference_yaml",
    "load_subnet",
    "load_supernet",
    "save_subnet",
    "save_supernet",
]

"""A run's inputs resolved from its configuration and its store: the timm spec, the teacher, the rank space.

Shared by the driver (preflight, filtering, search baselines, export) and the workers (training), so that every
process resolves the same model from the same configuration.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from flora_ray.config import Config, changed_result_keys, config_to_dict, dotted_value, dump_config
from flora_ray.core.models import ModelSpec, create_model
from flora_ray.core.space import RankSpace
from flora_ray.core.subnet import package_versions
from flora_ray.core.supernet import Supernet, build_space, build_supernet
from flora_ray.storage.run_store import ARTEFACTS, RunStore

logger = logging.getLogger(__name__)

SMALL_DATASETS = ("fashion_mnist", "digits")


def resolve_model_spec(cfg: Config) -> ModelSpec:
    """The timm spec of the run: data geometry (``img_size``, ``in_chans``, ``num_classes``) plus model kwargs."""
    kwargs: dict[str, Any] = {"img_size": cfg.data.img_size, "in_chans": cfg.data.in_chans}
    if cfg.data.name in SMALL_DATASETS:
        kwargs["num_classes"] = 10
    kwargs.update(cfg.model.kwargs)
    for key in ("img_size", "in_chans"):
        if kwargs[key] != getattr(cfg.data, key):
            raise ValueError(f"model.kwargs.{key}={kwargs[key]} contradicts data.{key}={getattr(cfg.data, key)}")
    return ModelSpec(cfg.model.name, kwargs)


def teacher_source(cfg: Config, store: RunStore) -> bool | str:
    """Where the dense weights come from: the configured pretrained weights, else the run's own teacher."""
    if cfg.model.pretrained:
        return cfg.model.pretrained
    if not store.is_file(ARTEFACTS.teacher):
        raise FileNotFoundError(
            f"no dense teacher at {store.location(ARTEFACTS.teacher)!r}: run `flora-ray pretrain CONFIG` first "
            "or set model.pretrained to a weight file"
        )
    return str(store.local_path(ARTEFACTS.teacher))


def resolve_space(cfg: Config, store: RunStore, full: RankSpace) -> RankSpace:
    """The space to train on: ``train.space_file``, else the run's filtered space, else ``full``."""
    if cfg.train.space_file:
        path = cfg.train.space_file
        if not Path(path).is_file():
            raise FileNotFoundError(f"space file {path!r} does not exist; run `flora-ray filter` or fix the path")
        space = RankSpace.load(path)
    elif store.is_file(ARTEFACTS.space):
        path = store.location(ARTEFACTS.space)
        space = RankSpace.from_dict(store.read_json(ARTEFACTS.space, "space file"), source=f"space file {path!r}")
    else:
        return full
    full.check_compatible(space, source=f"space file {path!r}")
    logger.info("sampling from %s: %.3g of %.3g configurations", path, space.num_configs, full.num_configs)
    return space


def build_run_supernet(cfg: Config, store: RunStore, device: torch.device | str = "cpu") -> tuple[Supernet, nn.Module]:
    """The supernet (SVD of the teacher, on the run's space) and the frozen dense teacher of a run."""
    spec = resolve_model_spec(cfg)
    source = teacher_source(cfg, store)
    supernet = build_supernet(
        spec.name,
        model_kwargs=spec.kwargs,
        pretrained=source,
        ratios=cfg.model.ratios,
        include_proj=cfg.model.include_proj,
        targets=cfg.model.targets,
        sv_placement=cfg.model.sv_placement,
        device=device,
    )
    supernet.space = resolve_space(cfg, store, supernet.space)
    teacher = spec.create(pretrained=source, device=device).eval()
    teacher.requires_grad_(False)
    return supernet, teacher


def full_space(cfg: Config) -> RankSpace:
    """The run's unfiltered rank space, from the model built on the meta device (no weights, no SVD)."""
    spec = resolve_model_spec(cfg)
    return build_space(
        create_model(spec.name, device="meta", **spec.kwargs),
        ratios=cfg.model.ratios,
        include_proj=cfg.model.include_proj,
        targets=cfg.model.targets,
        model_name=spec.name,
    )


def provenance(cfg: Config, seed: int | None = None, **extra: str) -> dict[str, str]:
    """Parquet key-value metadata of a run's results: config, seed, model, data set and package versions."""
    return {
        "flora_ray.config": json.dumps(config_to_dict(cfg)),
        "flora_ray.versions": json.dumps(package_versions()),
        "flora_ray.seed": str(cfg.run.seed if seed is None else seed),
        "flora_ray.model": cfg.model.name,
        "flora_ray.dataset": cfg.data.name,
        **{f"flora_ray.{k}": v for k, v in extra.items()},
    }


def claim_run(cfg: Config, record: bool = True) -> RunStore:
    """The run's store, after refusing a configuration that differs from the one the run was made with (keys that
    only change speed or placement may differ); a new run records its configuration (``record=False``: only check).
    """
    store = RunStore.for_config(cfg)
    current = config_to_dict(cfg)
    if store.is_file(ARTEFACTS.run_config):
        try:
            stored = yaml.safe_load(store.read_text(ARTEFACTS.run_config)) or {}
        except yaml.YAMLError as exc:
            raise ValueError(
                f"{store.location(ARTEFACTS.run_config)!r} is not valid YAML ({exc.__class__.__name__}); "
                "remove the run directory"
            ) from None
        changed = changed_result_keys(stored, current)
        if changed:
            shown = "; ".join(f"{k}: {dotted_value(stored, k)!r} -> {dotted_value(current, k)!r}" for k in changed[:3])
            raise ValueError(
                f"run directory {store.root!r} was made with a different configuration ({shown}"
                f"{'; ...' if len(changed) > 3 else ''}): choose another run.name or --output, or remove it"
            )
    elif record:
        store.write_text(ARTEFACTS.run_config, dump_config(cfg))
    return store


def open_run(cfg: Config) -> RunStore:
    """The run's store, with its configuration recorded (a different configuration is refused)."""
    return claim_run(cfg)


def ray_storage(cfg: Config, store: RunStore) -> str:
    """Where Ray Train and Tune keep checkpoints and experiment state: ``run.storage``, else inside the run."""
    return cfg.run.storage or str(store.local_path(ARTEFACTS.ray))

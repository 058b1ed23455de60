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

from flora_ray.config import Config, changed_result_keys, config_to_dict, describe_change, dump_config
from flora_ray.core.models import ModelSpec, load_state_dict_strict, pretrained_num_classes
from flora_ray.core.names import HUB_PREFIX, hub_weights, resolve_hub_model
from flora_ray.core.names import architecture as model_architecture
from flora_ray.core.space import RankSpace
from flora_ray.core.subnet import package_versions
from flora_ray.core.supernet import Supernet, build_space, build_supernet
from flora_ray.data.datasets import num_classes
from flora_ray.data.listing import run_classes
from flora_ray.errors import InputError, MissingInput
from flora_ray.stages import stages_from
from flora_ray.storage.run_store import ARTEFACTS, RunStore

logger = logging.getLogger(__name__)

SMALL_DATASETS = ("fashion_mnist", "digits")


def resolve_model_spec(cfg: Config) -> ModelSpec:
    """The timm spec of the run: data geometry (``img_size``, ``in_chans``) and the data's class count, plus the
    model kwargs (which may not contradict the data)."""
    remote = run_classes(cfg)  # a URI: the classes of the run's listing
    classes = len(remote) if remote is not None else num_classes(cfg.data)
    name, kwargs = architecture(cfg)
    kwargs.update({"img_size": cfg.data.img_size, "in_chans": cfg.data.in_chans, "num_classes": classes})
    kwargs.update(cfg.model.kwargs)
    for key in ("img_size", "in_chans"):
        if kwargs[key] != getattr(cfg.data, key):
            raise InputError(f"model.kwargs.{key}={kwargs[key]} contradicts data.{key}={getattr(cfg.data, key)}")
    if kwargs["num_classes"] != classes:
        raise InputError(
            f"model.kwargs.num_classes={kwargs['num_classes']} but the data ({cfg.data.name}) has {classes} classes; "
            "remove model.kwargs.num_classes: it comes from the data"
        )
    return ModelSpec(name, kwargs, cfg.model.tome_r)


def architecture(cfg: Config) -> tuple[str, dict[str, Any]]:
    """The timm architecture and its model arguments: ``model.name`` itself, or for a ``hf-hub:`` name what its
    config in the local hub cache says (the run's artefacts then name the architecture, not the hub repo)."""
    return model_architecture(cfg.model.name)


def pretrained_source(cfg: Config) -> bool | str:
    """``model.pretrained`` as ``create_model`` takes it: ``True`` with a ``hf-hub:`` name is that repo's weight
    file in the local hub cache (never timm's default weights of the architecture)."""
    if cfg.model.pretrained is True and cfg.model.name.startswith(HUB_PREFIX):
        return hub_weights(cfg.model.name)
    return cfg.model.pretrained


def pretrained_classes(cfg: Config) -> int | None:
    """The class count of ``model.pretrained``'s classifier (``None``: no pretrained weights, or unknown)."""
    if not cfg.model.pretrained:
        return None
    if cfg.model.pretrained is True and cfg.model.name.startswith(HUB_PREFIX):
        return resolve_hub_model(cfg.model.name).num_classes
    return pretrained_num_classes(architecture(cfg)[0], cfg.model.pretrained)


def teacher_is_pretrained(cfg: Config) -> bool:
    """Whether ``model.pretrained`` is the teacher as it is: weights given and their classifier fits the data.
    Weights for another class count are fine-tuned into the run's teacher by the pretrain stage instead."""
    if not cfg.model.pretrained:
        return False
    classes = pretrained_classes(cfg)
    return classes is None or classes == resolve_model_spec(cfg).kwargs["num_classes"]


def teacher_source(cfg: Config, store: RunStore) -> bool | str:
    """Where the dense weights come from: ``model.pretrained`` when it is the teacher as it is, else the run's own
    teacher (trained or fine-tuned by the pretrain stage) in the store."""
    if teacher_is_pretrained(cfg):
        return pretrained_source(cfg)
    if not store.is_file(ARTEFACTS.teacher):
        raise MissingInput(
            f"no dense teacher at {store.location(ARTEFACTS.teacher)!r}: run `flora-ray pretrain CONFIG` first "
            "or set model.pretrained to a weight file"
        )
    return store.location(ARTEFACTS.teacher)


def load_teacher(cfg: Config, store: RunStore, device: torch.device | str = "cpu", copies: int = 1) -> list[nn.Module]:
    """``copies`` freshly built dense models with the run's teacher weights (from ``model.pretrained`` or from the
    run store, never from a path only the driver can see); the store's checkpoint is read once."""
    spec = resolve_model_spec(cfg)
    if teacher_is_pretrained(cfg):
        return [spec.create(pretrained=pretrained_source(cfg), device=device) for _ in range(copies)]
    teacher_source(cfg, store)  # a missing teacher: the one-line error
    tensors, header = store.read_checkpoint(ARTEFACTS.teacher)
    if "model" in header and ModelSpec.from_dict(header["model"]) != spec:
        raise InputError(
            f"checkpoint {store.location(ARTEFACTS.teacher)!r} holds {json.dumps(header['model'])}, not "
            f"{json.dumps(spec.to_dict())}; use the checkpoint made for this model or change the model config"
        )
    models = []
    for _ in range(copies):
        model = spec.create(device=device)
        load_state_dict_strict(model, tensors, store.location(ARTEFACTS.teacher))
        models.append(model)
    return models


def resolve_space(cfg: Config, store: RunStore, full: RankSpace) -> RankSpace:
    """The space to train on: ``train.space_file``, else the run's filtered space, else (when the filter stage has
    not run) ``full``. A filtered space that the finished filter stage should have left but that cannot be read is
    an error, never a silent fallback to the full space."""
    if cfg.train.space_file:
        path = cfg.train.space_file
        if not Path(path).is_file():
            raise MissingInput(f"space file {path!r} does not exist; run `flora-ray filter` or fix the path")
        space = RankSpace.load(path)
    elif store.is_file(ARTEFACTS.space):
        path = store.location(ARTEFACTS.space)
        space = RankSpace.from_dict(store.read_json(ARTEFACTS.space, "space file"), source=f"space file {path!r}")
    elif store.is_file(ARTEFACTS.stage_marker("filter")):
        raise MissingInput(
            f"the filter stage finished but its space {store.location(ARTEFACTS.space)!r} cannot be read; check "
            "run.storage, or remove stages/filter.json to filter again"
        )
    else:
        logger.warning("no filtered space in %s: training on the full space (run the filter stage first)", store.uri)
        return full
    full.check_compatible(space, source=f"space file {path!r}")
    logger.info("sampling from %s: %.3g of %.3g configurations", path, space.num_configs, full.num_configs)
    return space


def factorize_model(cfg: Config, dense: nn.Module) -> Supernet:
    """The supernet of a dense model (changed in place) with the run's factorisation settings (``model``)."""
    spec = resolve_model_spec(cfg)
    return build_supernet(
        dense,
        model_name=spec.name,
        model_kwargs=spec.kwargs,
        ratios=cfg.model.ratios,
        include_proj=cfg.model.include_proj,
        targets=cfg.model.targets,
        sv_placement=cfg.model.sv_placement,
    )


def build_run_supernet(
    cfg: Config, store: RunStore, device: torch.device | str = "cpu", space: RankSpace | None = None
) -> tuple[Supernet, nn.Module]:
    """The supernet (SVD of the teacher) on ``space`` (default: ``resolve_space``) and the frozen dense teacher."""
    dense, teacher = load_teacher(cfg, store, device, copies=2)
    supernet = factorize_model(cfg, dense)
    if space is not None:
        supernet.space.check_compatible(space, source="the run's rank space")
    supernet.space = space if space is not None else resolve_space(cfg, store, supernet.space)
    teacher.eval().requires_grad_(False)
    return supernet, teacher


def full_space(cfg: Config) -> RankSpace:
    """The run's unfiltered rank space, from the model built on the meta device (no weights, no SVD)."""
    spec = resolve_model_spec(cfg)
    return build_space(
        spec.create(device="meta"),
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
            raise InputError(
                f"{store.location(ARTEFACTS.run_config)!r} is not valid YAML ({exc.__class__.__name__}); "
                "remove the run directory"
            ) from None
        changed = changed_result_keys(stored, current)
        if extends_search(stored, current, changed):
            if record:
                extend_search(store, cfg, stored["search"]["trials"])
            return store
        if changed:
            shown = "; ".join(describe_change(stored, current, k) for k in changed[:3])
            raise InputError(
                f"run directory {store.root!r} was made with a different configuration ({shown}"
                f"{'; ...' if len(changed) > 3 else ''}): choose another run.name or --output, or remove it"
            )
    elif record:
        store.write_text(ARTEFACTS.run_config, dump_config(cfg))
    return store


def study_name(cfg: Config) -> str:
    """The run's Optuna study (in its journal) and Ray Tune experiment (under ``ray/``)."""
    return f"{cfg.run.name}-search"


def extends_search(stored: dict[str, Any], current: dict[str, Any], changed: list[str]) -> bool:
    """Whether the only result-changing difference is a larger ``search.trials``: the run's search is extended,
    continuing its Optuna study (every other search setting must stay: a child run, ``run.parent``, changes them)."""
    before = (stored.get("search") or {}).get("trials")
    return changed == ["search.trials"] and isinstance(before, int) and current["search"]["trials"] > before


def extend_search(store: RunStore, cfg: Config, before: int) -> None:
    """Record the larger budget and mark the search and what follows it unfinished; the finished Tune experiment's
    state is set aside, so the search starts Tune again over the same journal for the trials it lacks."""
    for stage in stages_from("search"):  # the search continues its study; the stages after it follow its new front
        name = ARTEFACTS.stage_marker(stage)
        if store.is_file(name):
            store.filesystem.delete_file(store.location(name))
    tuner_state = f"{ARTEFACTS.ray}/{study_name(cfg)}/tuner.pkl"  # backends.ray_tune.TUNER_STATE
    if store.is_file(tuner_state):
        store.filesystem.delete_file(store.location(tuner_state))
    store.write_text(ARTEFACTS.run_config, dump_config(cfg))
    logger.info("search: extending %s from %d to %d trials", store.uri, before, cfg.search.trials)


def open_run(cfg: Config) -> RunStore:
    """The run's store, with its configuration recorded (a different configuration is refused)."""
    return claim_run(cfg)


def ray_storage(store: RunStore) -> tuple[str, Any]:
    """Where Ray Train and Tune keep checkpoints and experiment state: ``ray/`` inside the run, as a path on the
    store's filesystem plus that filesystem (``None`` for a local store: Ray then uses the path as it is)."""
    return store.location(ARTEFACTS.ray), (None if store.is_local else store.filesystem)


def working_dir(cfg: Config) -> Path:
    """This machine's working directory for the run (``run.output_dir/run.name``): local copies of what must be a
    local file (the search journal, exported subnets) when the run lives elsewhere."""
    return cfg.run.run_dir

"""Cheap checks of a stage's inputs before any worker starts: model, data, teacher, space and supernet files."""

from __future__ import annotations

import json
from pathlib import Path

from flora_ray.config import Config
from flora_ray.core.models import ModelSpec, create_model
from flora_ray.data.datasets import build_datasets
from flora_ray.stages.inputs import SMALL_DATASETS, full_space, resolve_model_spec, resolve_space, teacher_source
from flora_ray.storage.files import read_checkpoint_header
from flora_ray.storage.run_store import ARTEFACTS, RunStore

PREFLIGHT_STAGES = ("pretrain", "filter", "train", "search")


def preflight(cfg: Config, stage: str, store: RunStore | None = None) -> None:
    """Raise a one-line error when ``stage`` cannot run (unknown model, missing data, teacher, space or supernet)."""
    if stage not in PREFLIGHT_STAGES:
        raise ValueError(f"stage {stage!r} is not one of {PREFLIGHT_STAGES}")
    store = store or RunStore.for_config(cfg)
    spec = resolve_model_spec(cfg)
    create_model(spec.name, device="meta", **spec.kwargs)  # unknown model or kwargs: fail here, not in a worker
    pretrained = cfg.model.pretrained
    if isinstance(pretrained, str) and not Path(pretrained).expanduser().is_file():
        raise FileNotFoundError(f"model.pretrained weight file {pretrained!r} does not exist; fix the path")
    if cfg.data.name in SMALL_DATASETS:
        build_datasets(cfg.data)
    elif cfg.data.root is None or not Path(cfg.data.root).is_dir():
        raise FileNotFoundError(f"data.root {cfg.data.root!r} is not a directory with train/ and val/ class folders")
    if stage in ("filter", "train"):
        check_checkpoint(teacher_source(cfg, store), spec)
    if stage == "search":
        if not store.is_file(ARTEFACTS.supernet):
            raise FileNotFoundError(
                f"no supernet at {store.location(ARTEFACTS.supernet)!r}: run `flora-ray train CONFIG` first"
            )
        check_checkpoint(str(store.local_path(ARTEFACTS.supernet)), spec)
    if stage == "train" and (cfg.train.space_file or store.is_file(ARTEFACTS.space)):
        resolve_space(cfg, store, full_space(cfg))


def check_checkpoint(source: bool | str, spec: ModelSpec) -> None:
    """A safetensors checkpoint must be readable and, if flora-ray wrote it, be of this model (header only)."""
    if not isinstance(source, str) or not source.endswith(".safetensors"):
        return
    header = read_checkpoint_header(source)
    if "model" in header and ModelSpec.from_dict(header["model"]) != spec:
        raise ValueError(
            f"checkpoint {source!r} holds {json.dumps(header['model'])}, not {json.dumps(spec.to_dict())}; "
            "use the checkpoint made for this model or change the model config"
        )

"""Cheap checks of a stage's inputs before any worker starts: model, data, teacher, space and supernet files."""

from __future__ import annotations

import json
from pathlib import Path

from flora_ray.config import BOUNDS, Config
from flora_ray.core.models import ModelSpec
from flora_ray.data.datasets import build_datasets
from flora_ray.data.listing import data_filesystem, is_remote, run_listing
from flora_ray.errors import InputError, MissingInput
from flora_ray.notify import check_notify
from flora_ray.stages.inputs import (
    SMALL_DATASETS,
    full_space,
    pretrained_source,
    resolve_model_spec,
    resolve_space,
    teacher_is_pretrained,
    teacher_source,
)
from flora_ray.storage.files import read_checkpoint_header
from flora_ray.storage.run_store import ARTEFACTS, RunStore
from flora_ray.tracking import check_tracking

PREFLIGHT_STAGES = ("pretrain", "filter", "train", "search")

RAY_DATA_NEEDS_RAY = "data.pipeline=ray_data streams from Ray Data: use the Ray backend, or data.pipeline=loader"


def check_geometry(spec: ModelSpec) -> None:
    """Build the model on the meta device and run two images of the run's geometry through it (no memory, no
    compute): a patch size that does not divide the image, or a wrong channel count, fails here. Two, because
    BatchNorm in training mode (LeViT) rejects a batch of one pooled image."""
    import torch

    model = spec.create(device="meta")  # token merging: a tome_r too large for the token count fails here
    size, chans = spec.kwargs["img_size"], spec.kwargs["in_chans"]
    try:
        with torch.no_grad():
            model(torch.empty(2, chans, size, size, device="meta"))
    except (AssertionError, RuntimeError, ValueError) as exc:
        raise InputError(
            f"model {spec.name} cannot take {size}x{size} images with {chans} channel(s) "
            f"({' '.join(str(exc).split())[:200]}): fix model.kwargs (patch_size, ...) or data.img_size"
        ) from None


def preflight(cfg: Config, stage: str, store: RunStore | None = None) -> None:
    """Raise a one-line error when ``stage`` cannot run (unknown model, missing data, teacher, space or supernet)."""
    if stage not in PREFLIGHT_STAGES:
        raise InputError(f"stage {stage!r} is not one of {PREFLIGHT_STAGES}")
    store = store or RunStore.for_config(cfg)
    check_image_folder(cfg)  # first: a URI's listing gives the class count the model spec needs
    spec = resolve_model_spec(cfg)
    check_geometry(spec)  # unknown model or kwargs, images it cannot take: fail here, not in a worker
    pretrained = pretrained_source(cfg)  # a hf-hub: model's weights: their file in the local hub cache
    if isinstance(pretrained, str) and not Path(pretrained).expanduser().is_file():
        raise MissingInput(f"model.pretrained weight file {pretrained!r} does not exist; fix the path")
    check_budgets(cfg, store, needs_table=stage == "search")
    check_cost_floor(cfg)
    check_tracking(cfg)
    check_notify(cfg)
    if cfg.data.name in SMALL_DATASETS:
        build_datasets(cfg.data)
    if stage in ("filter", "train"):
        if teacher_is_pretrained(cfg):
            check_checkpoint(
                read_checkpoint_header(pretrained) if _is_safetensors(pretrained) else {}, spec, pretrained
            )
        else:
            teacher_source(cfg, store)  # the run's teacher must exist
            check_checkpoint(store.read_checkpoint_header(ARTEFACTS.teacher), spec, store.location(ARTEFACTS.teacher))
    if stage == "search":
        if not store.is_file(ARTEFACTS.supernet):
            raise MissingInput(
                f"no supernet at {store.location(ARTEFACTS.supernet)!r}: run `flora-ray train CONFIG` first"
            )
        check_checkpoint(store.read_checkpoint_header(ARTEFACTS.supernet), spec, store.location(ARTEFACTS.supernet))
    if stage == "train" and (cfg.train.space_file or store.is_file(ARTEFACTS.space)):
        resolve_space(cfg, store, full_space(cfg))


def check_image_folder(cfg: Config) -> None:
    """An image folder's ``data.root``: a URI is listed here, once, and the listing recorded in the run for every
    other process (a bad URI, a missing bucket, an empty folder fail in one line); a path must be a directory."""
    if cfg.data.name != "imagefolder":
        return
    if is_remote(cfg.data.root):
        run_listing(cfg, record=True)
        return
    data_filesystem(cfg.data.root)  # an almost-URI (s3:/bucket) is refused, not taken for a relative path
    if not Path(cfg.data.root).is_dir():
        raise MissingInput(f"data.root {cfg.data.root!r} is not a directory with train/ and val/ class folders")


def check_budgets(cfg: Config, store: RunStore, needs_table: bool = False) -> None:
    """The search's budgets must leave some configuration of the run's space (a MAC budget below the cheapest
    one fails here, before hours of training); latency budgets are checked once the run has its latency table
    (right after ``flora-ray profile``, the pipeline's first stage), which a search that uses latency needs
    (``needs_table``)."""
    import dataclasses

    from flora_ray.core.cost import build_cost_model
    from flora_ray.search.objectives import resolve_bounds
    from flora_ray.stages.profile import missing_table, run_latency_model

    search = cfg.search
    has_table = store.is_file(ARTEFACTS.latency_table)
    if needs_table and search.uses_latency and not has_table:
        raise missing_table(store)
    if all(getattr(search, bound) is None for bound in BOUNDS):
        return
    space = full_space(cfg)
    cost = build_cost_model(resolve_model_spec(cfg).create(device="meta"))
    latency = run_latency_model(cfg, store, space, cost) if has_table else None
    if latency is None:
        search = dataclasses.replace(search, max_latency_ms=None, min_latency_ms=None, objectives=("macs",))
    resolve_bounds(search, space, cost, latency)


def check_cost_floor(cfg: Config) -> None:
    """``filter.cost_floor`` must be reachable in the run's full space (one below the cheapest
    configuration's cost can never be kept reachable): checked before the filter, on a model built on ``meta``."""
    if cfg.filter.cost_floor is None:
        return
    from flora_ray.core.cost import build_cost_model
    from flora_ray.search.filtering import cost_floor_macs

    cost_floor_macs(
        cfg.filter.cost_floor, full_space(cfg), build_cost_model(resolve_model_spec(cfg).create(device="meta"))
    )


def _is_safetensors(source: bool | str) -> bool:
    return isinstance(source, str) and source.endswith(".safetensors")


def check_checkpoint(header: dict, spec: ModelSpec, source: str) -> None:
    """A checkpoint flora-ray wrote must be of this model (its header names the model spec)."""
    if "model" in header and ModelSpec.from_dict(header["model"]) != spec:
        raise InputError(
            f"checkpoint {source!r} holds {json.dumps(header['model'])}, not {json.dumps(spec.to_dict())}; "
            "use the checkpoint made for this model or change the model config"
        )


def check_run_storage(cfg: Config, cluster: bool, local_backend: bool = False) -> None:
    """Before any work: the run's storage must be reachable and writable, and on a cluster (``--address``)
    visible to every node; the in-process backend keeps training checkpoints locally, so it needs a local store."""
    from flora_ray.storage.filesystems import check_storage, is_shared_location

    location = cfg.run.storage or cfg.run.output_dir
    if cluster and not is_shared_location(location):
        raise InputError(
            f"with --address every node reads and writes the run, but it would live in {location!r} (relative, on "
            "this machine only): set run.storage to an absolute path on a filesystem every node mounts, or to "
            "s3://BUCKET/PREFIX or gs://BUCKET/PREFIX"
        )
    if local_backend and cfg.data.pipeline == "ray_data":
        raise InputError(RAY_DATA_NEEDS_RAY)
    if cfg.run.storage:
        check_storage(cfg.run.storage)
        if local_backend and "://" in cfg.run.storage and not cfg.run.storage.startswith("file://"):
            raise InputError(
                f"--backend local keeps training checkpoints on this machine; run.storage={cfg.run.storage!r} is "
                "remote: use the Ray backend or a local run.storage"
            )


def check_devices(cfg: Config, on_this_machine: bool) -> None:
    """Work that asks for a GPU (``scaling.use_gpu``, ``search.gpus_per_trial``, with the ``GPU`` accelerator) and
    runs on this machine (no ``--address``) needs a CUDA device here, unless ``scaling.allow_cpu``. On a cluster the
    GPU nodes may not exist yet (the autoscaler starts them on demand): each worker checks its own device instead."""
    from flora_ray.training.worker import gpu_requests, no_cuda_message

    asked = gpu_requests(cfg)
    if not on_this_machine or cfg.scaling.allow_cpu or not asked:
        return
    import torch

    if not torch.cuda.is_available():
        raise InputError(no_cuda_message(asked[0]))

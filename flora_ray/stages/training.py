"""The training stages: ``pretrain`` (the dense teacher) and ``train`` (the supernet), on any backend.

``train_worker`` is what every data-parallel worker runs: it resolves the stage's task from the configuration and
the run store, and hands it to the one ``Trainer`` with the checkpoint, progress and (supernet) cross-worker
callbacks. The stage functions run it on a backend and copy the final model into the run store.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from flora_ray.backends.base import Backend, TrainJob
from flora_ray.config import Config, build_dataclass, config_to_dict
from flora_ray.core.models import dense_checkpoint_metadata, load_state_dict_strict
from flora_ray.core.space import RankSpace
from flora_ray.data.datasets import build_datasets, eval_subset
from flora_ray.data.listing import run_listing
from flora_ray.data.ray_data import ShardBatches, train_dataset
from flora_ray.errors import InputError
from flora_ray.stages.inputs import (
    build_run_supernet,
    full_space,
    open_run,
    pretrained_classes,
    pretrained_source,
    ray_storage,
    resolve_model_spec,
    resolve_space,
    teacher_is_pretrained,
)
from flora_ray.stages.preflight import RAY_DATA_NEEDS_RAY, preflight
from flora_ray.storage.run_store import ARTEFACTS, RunStore
from flora_ray.tracking import EpochMetrics, enabled
from flora_ray.training.callbacks import Checkpoint, ConfigCheck, Progress, read_final_checkpoint
from flora_ray.training.sampling import build_sampler
from flora_ray.training.tasks import DenseTask, SupernetTask
from flora_ray.training.trainer import Session, Trainer
from flora_ray.training.worker import distributed_loader, loader_workers, setup_worker

logger = logging.getLogger(__name__)

TRAINING_STAGES = ("pretrain", "train")


def train_worker(payload: dict[str, Any], session: Session) -> None:
    """Train one stage (``payload["stage"]``: ``pretrain`` or ``train``) on this worker."""
    cfg: Config = build_dataclass(Config, payload["config"], "")
    stage, store = payload["stage"], RunStore(payload["run"])
    if stage not in TRAINING_STAGES:
        raise ValueError(f"stage {stage!r} is not one of {TRAINING_STAGES}")
    setup_worker(cfg.run.threads_per_worker, cfg.run.seed)
    opt = opt_of(cfg, stage)
    splits = build_datasets(cfg.data, pixels=("train",), listing=run_listing(cfg))
    probes = eval_subset(splits.search, getattr(opt, "eval_images", None), cfg.data.seed)  # stratified, seeded
    spec = resolve_model_spec(cfg)
    if spec.kwargs.get("num_classes") != splits.num_classes:
        raise InputError(
            f"model.kwargs.num_classes={spec.kwargs.get('num_classes')} but the data has {splits.num_classes} classes"
        )
    callbacks: list[Any] = []
    if stage == "pretrain":  # from model.pretrained when fine-tuning it to the data's classes, else from scratch
        net = spec.create(pretrained=pretrained_source(cfg) or False, device=session.device)
        task: Any = DenseTask(net, opt.label_smoothing, probes, splits.test)
        state = (lambda: (net.state_dict(), dense_checkpoint_metadata(spec)), net)
    else:
        if "space" not in payload:
            raise ValueError("a supernet worker needs the run's rank space in its payload (resolved by the driver)")
        space = RankSpace.from_dict(payload["space"], source="the driver's rank space")
        supernet, teacher = build_run_supernet(cfg, store, session.device, space)
        sampler = build_sampler(cfg.train.sampler, supernet.space)
        task = SupernetTask(
            supernet, teacher, sampler, cfg.run.seed, opt.temperature, opt.label_weight, opt.label_smoothing,
            probes, distill_from=opt.distill_from,
        )  # fmt: skip
        state = (lambda: (supernet.model.state_dict(), supernet.header()), supernet.model)
        callbacks.append(ConfigCheck())
    loader, train_sampler = training_batches(cfg, payload, session, splits.train, opt.batch_size, stage)
    model_state, module = state
    callbacks += [
        Progress(opt.log_every),
        Checkpoint(
            opt.checkpoint_every,
            model_state,
            lambda t, src: load_state_dict_strict(module, t, src),
            opt.checkpoint_every_steps,
        ),
    ]
    if enabled(cfg) and session.world_rank == 0:
        callbacks.append(EpochMetrics(cfg, stage))
    Trainer(task, opt, session, loader, stage, callbacks, train_sampler=train_sampler, prepare=splits.preprocess).fit()


def training_batches(cfg: Config, payload: dict[str, Any], session: Session, train, batch_size: int, stage: str):
    """``(batches, sampler)`` of this worker: its Ray Data shard (``data.pipeline=ray_data``) or a DataLoader with
    ``data.workers`` processes (``sampler``: the loader's, whose epoch the trainer sets)."""
    if cfg.data.pipeline == "ray_data":
        rows = payload["train_rows"] // session.world_size
        if rows < batch_size:
            raise InputError(f"{stage}.batch_size={batch_size} is larger than a worker's share ({rows} images)")
        return ShardBatches(session.dataset_shard("train"), batch_size, rows), None
    workers = loader_workers(cfg.data.workers, cfg.scaling.cpus_per_worker)
    return distributed_loader(
        train, batch_size, session.world_size, session.world_rank, cfg.run.seed, stage, workers, session.device,
        random_items=cfg.data.augment,
    )  # fmt: skip


def opt_of(cfg: Config, stage: str) -> Any:
    """The optimisation section of a training stage."""
    return cfg.pretrain if stage == "pretrain" else cfg.train


def save_stage_outputs(directory: Path, store: RunStore, stage: str) -> str:
    """Copy a stage's final model (with its metric history in the header) and the history into the run."""
    tensors, header, history = read_final_checkpoint(directory)
    name = ARTEFACTS.teacher if stage == "pretrain" else ARTEFACTS.supernet
    store.write_checkpoint(name, tensors, {**header, "history": history})
    store.write_json(ARTEFACTS.history(stage), history)
    return store.location(name)


def fit_stage(cfg: Config, backend: Backend, stage: str) -> dict[str, Any]:
    """Run ``pretrain`` or ``train`` on ``backend``; returns the final metrics, the output and the wall time."""
    store = open_run(cfg)
    preflight(cfg, stage, store)  # fail fast, before any worker starts
    payload: dict[str, Any] = {"config": config_to_dict(cfg), "stage": stage, "run": store.uri}
    if stage == "train":  # the driver decides the space once; workers never look for it themselves
        payload["space"] = resolve_space(cfg, store, full_space(cfg)).to_dict()
    datasets = None
    if cfg.data.pipeline == "ray_data":  # decoded by Ray Data tasks anywhere in the cluster, streamed to workers
        if backend.name != "ray":
            raise InputError(RAY_DATA_NEEDS_RAY)
        train_ds, payload["train_rows"] = train_dataset(cfg)
        datasets = lambda: {"train": train_ds}  # noqa: E731
    started = time.perf_counter()
    path, filesystem = ray_storage(store)
    metrics, output = backend.fit(
        TrainJob(
            train_worker,
            payload,
            cfg,
            name=f"{cfg.run.name}-{stage}",
            storage_path=path,
            collect=lambda directory: save_stage_outputs(directory, store, stage),
            storage_filesystem=filesystem,
            datasets=datasets,
        )
    )
    seconds = time.perf_counter() - started
    logger.info("%s finished in %.1f s: %s", stage, seconds, output)
    numbers = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
    return {"output": output, "metrics": numbers, "seconds": seconds}


def training_bundles(cfg: Config) -> list[dict[str, float]]:
    """What a training stage asks Ray for (``flora-ray plan``): ``scaling.num_workers`` Ray Train workers."""
    from flora_ray.backends.ray import worker_resources

    return [worker_resources(cfg.scaling)] * cfg.scaling.num_workers


def training_parallel(cfg: Config, *, workload: Any, cluster: bool) -> float:
    """Workers training at once (``flora-ray plan``)."""
    return cfg.scaling.num_workers


def pretrain_work(cfg: Config, *, workload: Any) -> float:
    """The teacher's MACs for ``flora-ray plan`` (``workload``: a ``plan.Workload``): forward + backward (3 forward
    passes) of the dense model per training image and epoch."""
    return cfg.pretrain.epochs * workload.train_images * 3 * workload.dense_macs


def train_work(cfg: Config, *, workload: Any) -> float:
    """The supernet's MACs for ``flora-ray plan``: the teacher's forward pass (once a step in every recipe) and
    forward + backward of each subnet a step trains, each counted at the mean uniform cost, per training image and
    epoch."""
    subnets = subnets_per_step(cfg.train.sampler, cfg.train.distill_from)
    return cfg.train.epochs * workload.train_images * (workload.dense_macs + 3 * subnets * workload.mean_macs)


def subnets_per_step(sampler: str, distill_from: str) -> int:
    """Subnets one supernet step trains: the sandwich's three (its largest is the in-place target too), else the
    draw, after the largest when distilling in place (one fewer when the draw is the largest)."""
    if sampler == "sandwich":
        return 3
    return 2 if distill_from == "largest" else 1


def pretrain_skipped(cfg: Config, *, workload: Any) -> str | None:
    """Why the pretrain stage will have nothing to do (``flora-ray plan``): ``model.pretrained`` weights for the
    data's classes (``workload.classes``) are the teacher."""
    teacher = bool(cfg.model.pretrained) and pretrained_classes(cfg) in (None, workload.classes)
    return "model.pretrained is the teacher" if teacher else None


def pretrain(cfg: Config, backend: Backend) -> dict[str, Any]:
    """Train the dense teacher: skipped when ``model.pretrained`` is the teacher as it is; weights whose classifier
    has another class count than the data are fine-tuned into the run's teacher."""
    if teacher_is_pretrained(cfg):
        return {"skipped": f"dense weights from model.pretrained={cfg.model.pretrained!r}"}
    summary = fit_stage(cfg, backend, "pretrain")
    if cfg.model.pretrained:
        summary["fine_tuned"] = {
            "from": cfg.model.pretrained,
            "pretrained_classes": pretrained_classes(cfg),
            "classes": resolve_model_spec(cfg).kwargs["num_classes"],
        }
    return summary


def train(cfg: Config, backend: Backend) -> dict[str, Any]:
    """Train the supernet on the run's (filtered) space by distillation from the teacher, or in place from the
    largest subnet (``train.distill_from``)."""
    return fit_stage(cfg, backend, "train")

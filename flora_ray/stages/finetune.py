"""``flora-ray finetune``: train an exported subnet further by distillation from the run's teacher, export it again.

The subnet (chosen by trial, MAC budget or as the knee of the front) is extracted from the run's supernet as a
static low-rank timm model and trained as the student of the run's teacher (``training.tasks.SubnetTask``: the
supernet's loss) by the one trainer, on the backend (in this process or on Ray Train), with the same data,
checkpoints, resume and progress as supernet training. A task then scores the subnet before and after on the test
split, writes the fine-tuned weights as an export (``flora_ray.load_subnet`` loads the folder) and the driver writes
``finetune/trial_N/`` (with ``finetune.json``) and ``finetune/trial_N.json`` into the run.

``finetune_subnet`` is the same fine-tuning in this process without any file (benchmarks fine-tune many subnets of
one run this way); ``finetune_model`` the same for any student model (a ViT pruned by another method).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flora_ray.backends.base import Backend, TrainJob
from flora_ray.backends.local import LocalBackend
from flora_ray.config import AFFECTS_RESULTS, Config, build_dataclass, config_to_dict
from flora_ray.core.models import load_state_dict_strict
from flora_ray.core.subnet import extract_subnet, load_subnet, package_versions, save_subnet
from flora_ray.core.supernet import Supernet
from flora_ray.data.datasets import build_datasets, eval_subset
from flora_ray.data.listing import run_listing
from flora_ray.data.ray_data import train_dataset
from flora_ray.errors import InputError, MissingInput
from flora_ray.records import FinetuneReport
from flora_ray.stages.export import data_geometry
from flora_ray.stages.formats import CONFIG_FILE, hf_config
from flora_ray.stages.inputs import load_teacher, open_run, ray_storage, working_dir
from flora_ray.stages.preflight import RAY_DATA_NEEDS_RAY
from flora_ray.stages.runs import budget_of, config_with_overrides, run_supernet, select_trial
from flora_ray.stages.search import trial_resources
from flora_ray.stages.training import training_batches
from flora_ray.storage.files import write_bytes, write_json
from flora_ray.storage.run_store import ARTEFACTS, RunStore
from flora_ray.tracking import EpochMetrics, enabled
from flora_ray.training.callbacks import Checkpoint, Progress, read_final_checkpoint
from flora_ray.training.tasks import SubnetTask, accuracy, correct_per_image
from flora_ray.training.trainer import LocalSession, Session, Trainer
from flora_ray.training.worker import distributed_loader, run_device, setup_worker

logger = logging.getLogger(__name__)

FINETUNE_FILE = "finetune.json"
STAGE = "finetune"
# Keys of the finetune section that choose the subnet or only change speed: not part of a fine-tune's identity.
_NOT_SETTINGS = ("enabled", "trial", "max_macs")


def finetune_settings(cfg: Config) -> dict[str, Any]:
    """The ``finetune`` keys that change a fine-tune's result (not the subnet's choice, not speed-only keys)."""
    fields = {f.name: f for f in dataclasses.fields(cfg.finetune)}
    return {
        k: v
        for k, v in config_to_dict(cfg.finetune).items()
        if k not in _NOT_SETTINGS and fields[k].metadata.get(AFFECTS_RESULTS, True)
    }


def checkpoint_name(cfg: Config, trial: int, ranks: Mapping[str, int]) -> str:
    """The Ray Train job name of a fine-tune: the trial and a digest of its ranks and settings, so that a re-run
    with the same settings resumes and one with other settings starts afresh."""
    text = json.dumps({"ranks": dict(ranks), "settings": finetune_settings(cfg)}, sort_keys=True)
    return f"{cfg.run.name}-{STAGE}-trial{trial}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def subnet_task(cfg: Config, student: nn.Module, teacher: nn.Module, search: Any) -> SubnetTask:
    """The fine-tuning task of ``cfg.finetune``: ``student`` distilled from the frozen ``teacher``."""
    opt = cfg.finetune
    probes = eval_subset(search, opt.eval_images, cfg.data.seed)  # stratified, seeded
    teacher.eval().requires_grad_(False)
    return SubnetTask(student, teacher, opt.temperature, opt.label_weight, opt.label_smoothing, probes)


def finetune_worker(payload: dict[str, Any], session: Session) -> None:
    """Fine-tune the subnet at ``payload["ranks"]`` of the run ``payload["run"]`` on this worker."""
    cfg: Config = build_dataclass(Config, payload["config"], "")
    store, opt = RunStore(payload["run"]), cfg.finetune
    setup_worker(cfg.run.threads_per_worker, cfg.run.seed)
    splits = build_datasets(cfg.data, pixels=("train",), listing=run_listing(cfg))
    student = extract_subnet(run_supernet(store), payload["ranks"]).to(session.device)
    (teacher,) = load_teacher(cfg, store, session.device)
    task = subnet_task(cfg, student, teacher, splits.search)
    loader, train_sampler = training_batches(cfg, payload, session, splits.train, opt.batch_size, STAGE)
    header = {"stage": STAGE, "trial": payload["trial"], "ranks": payload["ranks"]}
    callbacks = [
        Progress(opt.log_every),
        Checkpoint(
            opt.checkpoint_every,
            lambda: (student.state_dict(), header),
            lambda t, src: load_state_dict_strict(student, t, src),
            opt.checkpoint_every_steps,
        ),
    ]
    if enabled(cfg) and session.world_rank == 0:  # MLflow tracking, as the training stages
        callbacks.append(EpochMetrics(cfg, STAGE))
    Trainer(task, opt, session, loader, STAGE, callbacks, train_sampler=train_sampler,
            prepare=splits.preprocess).fit()  # fmt: skip


def finetune_subnet(
    cfg: Config,
    ranks: Mapping[str, int],
    *,
    run: str | os.PathLike | RunStore | None = None,
    supernet: Supernet | None = None,
    teacher: nn.Module | None = None,
    splits: Any = None,
    device: str | torch.device = "cpu",
    evaluate_before: bool = True,
    within_candidates: bool = True,
    **recipe: Any,
) -> dict[str, Any]:
    """Fine-tune one subnet of a run in this process, writing nothing (no checkpoint, no export).

    Args:
        cfg: The run's configuration (``Run.open(path).config``); ``cfg.finetune`` is the recipe.
        ranks: The subnet's per-layer ranks (a configuration of the supernet's space).
        run: Where the supernet and the teacher are read from when not given (default: ``cfg``'s run directory).
        supernet: The run's supernet (default: read from the run; pass it to fine-tune many subnets).
        teacher: The run's dense teacher (default: read from the run); it is put in eval mode and frozen.
        splits: ``data.datasets.build_datasets(cfg.data, pixels=("train",), listing=run_listing(cfg))`` (default: built here).
        device: Where to train and evaluate.
        evaluate_before: Also score the subnet on the test split before fine-tuning.
        within_candidates: ``False``: also a configuration the filtered space dropped (a uniform baseline).
        **recipe: ``finetune`` keys to change (``epochs=1``, ``lr=3e-4``, ...), validated like the config.

    Returns:
        ``test_accuracy_before`` (``None`` without ``evaluate_before``) and ``test_accuracy`` (%, whole test
        split), ``test_correct`` (whether each test image is right after, ``training.tasks.correct_per_image``),
        ``history`` (one dict per epoch: loss, search_acc, ...), ``epochs``, ``seconds`` (training) and
        ``model``: the fine-tuned subnet (a timm model in eval mode; ``model.state_dict()`` its weights).
    """
    store = run if isinstance(run, RunStore) else RunStore(run) if run is not None else RunStore.for_config(cfg)
    supernet = supernet if supernet is not None else run_supernet(store)
    teacher = teacher if teacher is not None else load_teacher(cfg, store, device)[0]
    student = extract_subnet(supernet, ranks, within_candidates)  # no random draws: finetune_model seeds after it
    return finetune_model(cfg, student, teacher, splits=splits, device=device, evaluate_before=evaluate_before,
                          **recipe)  # fmt: skip


def finetune_model(
    cfg: Config,
    student: nn.Module,
    teacher: nn.Module,
    *,
    splits: Any = None,
    device: str | torch.device = "cpu",
    evaluate_before: bool = True,
    **recipe: Any,
) -> dict[str, Any]:
    """Fine-tune any student model (a subnet, or a model compressed by other means) by distillation from
    ``teacher`` with ``cfg.finetune``'s recipe, in this process, writing nothing: ``finetune_subnet``'s loop, for
    students that are not a subnet of the run's supernet (benchmarks against other compression methods).

    Args:
        cfg: The configuration (its ``data`` and ``finetune`` sections, ``run.seed``).
        student: The model to train (modified in place).
        teacher: The dense teacher; it is put in eval mode and frozen.
        splits: ``data.datasets.build_datasets(cfg.data, pixels=("train",), listing=run_listing(cfg))`` (default:
            built here).
        device: Where to train and evaluate.
        evaluate_before: Also score the student on the test split before fine-tuning.
        **recipe: ``finetune`` keys to change (``epochs=1``, ``lr=3e-4``, ...), validated like the config.

    Returns:
        As ``finetune_subnet``.
    """
    cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, **recipe))
    splits = splits if splits is not None else build_datasets(cfg.data, pixels=("train",), listing=run_listing(cfg))
    device = torch.device(device)
    setup_worker(0, cfg.run.seed)  # the seed only: the caller's threads are left alone
    student = student.to(device)
    before = accuracy(student, splits.test, device) if evaluate_before else None
    opt = cfg.finetune
    loader, train_sampler = distributed_loader(splits.train, opt.batch_size, 1, 0, cfg.run.seed, STAGE,
                                               device=device, random_items=cfg.data.augment)  # fmt: skip
    trainer = Trainer(subnet_task(cfg, student, teacher.to(device), splits.search), opt, LocalSession(None, str(device)),
                      loader, STAGE, [Progress(opt.log_every)], train_sampler=train_sampler,
                      prepare=splits.preprocess)  # fmt: skip
    started = time.perf_counter()
    history = trainer.fit()
    seconds = time.perf_counter() - started
    correct = correct_per_image(student, dataset=splits.test, device=device)
    return {"test_accuracy_before": before, "test_accuracy": 100.0 * int(correct.sum()) / max(len(correct), 1),
            "test_correct": correct, "history": history, "epochs": opt.epochs, "seconds": seconds,
            "model": student.eval()}  # fmt: skip


# -- a run's subnet, fine-tuned and exported -------------------------------------------------------------------------


def check_finetune(
    run: str | os.PathLike | RunStore,
    *,
    trial: int | None = None,
    max_macs: float | None = None,
    knee: bool = False,
    overrides: Sequence[str] = (),
    config: Config | None = None,
) -> tuple[RunStore, Config, Any]:
    """``(store, configuration, trial row)`` of a fine-tune request, or the error naming what is wrong: not a
    searched run, the choice of subnet, an override that is not a ``finetune.*`` key or a speed-only key.
    ``config``: the configuration to start from (the pipeline's own) instead of the one the run recorded."""
    store = run if isinstance(run, RunStore) else RunStore(run)
    if not store.is_file(ARTEFACTS.trials):
        raise MissingInput(f"{store.location(ARTEFACTS.trials)!r} does not exist: run `flora-ray search` first")
    cfg = config_with_overrides(store, overrides=overrides, sections=(STAGE,), what="a fine-tune", config=config)
    return store, cfg, select_trial(store, trial=trial, budget=budget_of(max_macs=max_macs), knee=knee)


def finetune_export_task(
    run_uri: str, config: dict[str, Any], row: dict[str, Any], state: dict[str, Any]
) -> tuple[dict[str, bytes], dict[str, Any]]:
    """Score the subnet of ``row`` on the test split before fine-tuning, write the fine-tuned weights ``state``
    (numpy arrays) as an export, reload it from the files as a user would and score it again. Returns the export's
    files and the figures."""
    store, cfg = RunStore(run_uri), build_dataclass(Config, config, "")
    ranks = json.loads(row["ranks"])
    supernet = run_supernet(store)
    splits = build_datasets(cfg.data, listing=run_listing(cfg))
    device = run_device(cfg, "search.gpus_per_trial")
    before = accuracy(extract_subnet(supernet, ranks).to(device), splits.test, device)
    tuned = extract_subnet(supernet, ranks)
    load_state_dict_strict(tuned, {k: torch.tensor(v) for k, v in state.items()}, "the fine-tuned subnet")
    figures: dict[str, Any] = {
        "trial": int(row["trial"]),
        "ranks": ranks,
        "macs": supernet.cost.macs(ranks),
        "dense_macs": supernet.cost.dense_macs,
        "params": supernet.cost.params(ranks),
        "search_accuracy": float(row["accuracy"]),
        "test_accuracy_before": before,
    }
    with tempfile.TemporaryDirectory(prefix="flora-finetune-") as tmp:
        save_subnet(supernet, ranks, tmp, model=tuned, trial=figures["trial"], search_accuracy=figures["search_accuracy"],
                    fine_tuned=True)  # fmt: skip
        model = load_subnet(tmp, device=device)
        files = {path.name: path.read_bytes() for path in sorted(Path(tmp).iterdir()) if path.is_file()}
    figures.update(test_accuracy=accuracy(model, splits.test, device), device=str(device), versions=package_versions())
    return files, figures


def _train(store: RunStore, cfg: Config, row: Any, backend: Backend) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Fine-tune ``row``'s subnet on ``backend`` (resuming an interrupted run of the same settings); returns the
    final weights (numpy) and the metric history."""
    ranks, trial = json.loads(row["ranks"]), int(row["trial"])
    payload: dict[str, Any] = {"config": config_to_dict(cfg), "run": store.uri, "ranks": ranks, "trial": trial}
    datasets = None
    if cfg.data.pipeline == "ray_data":
        if backend.name != "ray":
            raise InputError(RAY_DATA_NEEDS_RAY)
        train_ds, payload["train_rows"] = train_dataset(cfg)
        datasets = lambda: {"train": train_ds}  # noqa: E731
    path, filesystem = ray_storage(store)
    job = TrainJob(finetune_worker, payload, cfg, name=checkpoint_name(cfg, trial, ranks), storage_path=path,
                   collect=read_final_checkpoint, storage_filesystem=filesystem, datasets=datasets)  # fmt: skip
    _, (tensors, _, history) = backend.fit(job)
    return {k: v.numpy() for k, v in tensors.items()}, history


def finetune_from_run(
    run: str | os.PathLike | RunStore,
    *,
    trial: int | None = None,
    max_macs: float | None = None,
    knee: bool = False,
    overrides: Sequence[str] = (),
    output: str | os.PathLike | None = None,
    backend: Backend | None = None,
    config: Config | None = None,
) -> dict[str, Any]:
    """Fine-tune one subnet of a searched run (``trial``, ``max_macs`` or ``knee``; ``overrides``: ``finetune.*``
    or speed-only ``key=value``) on ``backend`` (default: this process) and export it into
    ``finetune/trial_N/`` (or ``output``); returns (and writes to ``finetune.json``) its figures: test accuracy
    before and after, epochs, seconds, history. A run with a report gets its report rebuilt. ``config``: as
    ``check_finetune``."""
    store, cfg, row = check_finetune(run, trial=trial, max_macs=max_macs, knee=knee, overrides=overrides, config=config)
    backend = backend or LocalBackend()
    started = time.perf_counter()
    state, history = _train(store, cfg, row, backend)
    seconds = time.perf_counter() - started
    task_row = {"trial": int(row["trial"]), "ranks": row["ranks"], "accuracy": float(row["accuracy"])}
    files, figures = backend.call(finetune_export_task, store.uri, config_to_dict(cfg), task_row, state,
                                  resources=trial_resources(cfg), retries=cfg.run.max_failures)  # fmt: skip
    name = ARTEFACTS.finetune_dir(figures["trial"])
    out = Path(output) if output else store.local_path(name) if store.is_local else working_dir(cfg) / name
    report = FinetuneReport(**figures, epochs=cfg.finetune.epochs, seconds=seconds, settings=finetune_settings(cfg),
                            history=history, directory=str(out) if output or store.is_local else store.location(name))  # fmt: skip
    logger.info("finetune trial %d: test accuracy %.2f%% -> %.2f%% in %.0f s", report.trial,
                report.test_accuracy_before, report.test_accuracy, seconds)  # fmt: skip
    for file_name, data in files.items():
        write_bytes(out / file_name, data)
    write_json(out / CONFIG_FILE, hf_config(json.loads(files["subnet.json"]), data_geometry(cfg)))
    write_json(out / FINETUNE_FILE, report.to_dict())
    if not output and not store.is_local:
        for path in sorted(p for p in out.iterdir() if p.is_file()):
            store.write_bytes(f"{name}/{path.name}", path.read_bytes())
    report.write(store)
    if store.is_file(ARTEFACTS.report):
        from flora_ray.stages.report import write_report

        write_report(store)
    return report.to_dict()


def finetune_stage(cfg: Config, backend: Backend | None = None) -> dict[str, Any]:
    """The pipeline's fine-tune (``finetune.enabled``): ``finetune.trial``, the best front point within
    ``finetune.max_macs``, or the knee point, as ``flora-ray finetune`` does."""
    if not cfg.finetune.enabled:
        return {"skipped": "finetune.enabled is false"}
    store = open_run(cfg)
    knee = cfg.finetune.trial is None and cfg.finetune.max_macs is None
    report = finetune_from_run(
        store, trial=cfg.finetune.trial, max_macs=cfg.finetune.max_macs, knee=knee, backend=backend, config=cfg
    )
    return FinetuneReport.from_dict(report).stage_summary()

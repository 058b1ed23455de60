"""The Ray backend: Ray Train for the training stages, Ray tasks for the filter's blocks, Ray Tune for the search.

``init_ray`` joins a cluster (``--address``) or starts a local Ray bound to 127.0.0.1. Training runs a
``TorchTrainer`` (gloo on CPU, NCCL on CUDA) with ``FailureConfig(max_failures)``; re-running the same name resumes:
Ray Train finds the run's checkpoints in its storage path and hands the latest to the workers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from flora_ray.backends.base import Backend, SearchJob, TaskMap, TrainJob
from flora_ray.errors import InputError

logger = logging.getLogger(__name__)
T = TypeVar("T")


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join ``address`` (``auto``, ``ray://...``, ``host:port``), or start a new local Ray bound to 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return
    if address is None:
        # A new local instance on 127.0.0.1, whatever /tmp/ray/ray_current_cluster names (a stale head there would
        # otherwise be joined, and Ray retries a dead one for minutes).
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        ray.init(address="local", num_cpus=num_cpus, dashboard_host="127.0.0.1", log_to_driver=True)
        return
    check_reachable(address)
    try:
        ray.init(address=address, log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise InputError(f"cannot reach the Ray cluster at {address!r}: {str(exc).splitlines()[0]}") from exc


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, with one line, when nothing listens at ``host:port`` (Ray itself retries for minutes)."""
    if address == "auto":
        return
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise InputError(f"Ray address {address!r} is not auto, host:port or ray://host:port")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise InputError(
            f"cannot reach the Ray cluster at {address!r} ({exc.strerror or exc}): start it (`ray start --head`) "
            "or fix --address"
        ) from None


class RaySession:
    """``training.trainer.Session`` on Ray Train."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.world_rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device()

    def prepare_model(self, model):
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    @contextlib.contextmanager
    def checkpoint_dir(self) -> Iterator[Path | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as directory:
            yield Path(directory)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    def checkpoint_collected(self, metrics: dict[str, Any]) -> None:
        """Return once Ray Train's controller has collected the checkpoint just reported (every rank calls it).

        A second, metrics-only report: the worker's result queue holds one report, so it returns when the
        controller has taken the checkpoint's. Without it a worker lost right after a checkpoint would restart from
        the one before (up to two checkpoint intervals repeated instead of one). Costs up to one controller poll
        (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 2 s by default) per checkpoint.
        """
        import ray.train

        ray.train.report(metrics)

    def dataset_shard(self, name: str) -> Any:
        """This worker's share of the job's Ray Dataset ``name``."""
        import ray.train

        shard = ray.train.get_dataset_shard(name)
        if shard is None:
            raise ValueError(f"the training job has no Ray Dataset {name!r}")
        return shard


def _train_entry(config: dict[str, Any]) -> None:
    package_logger = logging.getLogger("flora_ray")
    if not package_logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        package_logger.addHandler(handler)
    package_logger.setLevel(logging.INFO)
    package_logger.propagate = False
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one line per report and checkpoint is noise here
    backend: Backend = config["backend"]
    config["worker"](config["payload"], backend.worker_session(RaySession()))


def worker_resources(scaling: Any) -> dict[str, float]:
    """What one Ray Train worker asks for: its CPUs, extra resources, and one accelerator (``GPU`` or a named
    custom resource) when ``scaling.use_gpu``."""
    resources = {"CPU": scaling.cpus_per_worker, **scaling.resources_per_worker}
    if scaling.use_gpu:
        resources[scaling.accelerator] = resources.get(scaling.accelerator, 1)
    return resources


def scaling_config(scaling: Any):
    """Ray Train's ``ScalingConfig`` from the run's scaling section (GPU or a named custom accelerator)."""
    from ray.train import ScalingConfig

    use_gpu = scaling.use_gpu and scaling.accelerator == "GPU"
    return ScalingConfig(
        num_workers=scaling.num_workers, use_gpu=use_gpu, resources_per_worker=worker_resources(scaling)
    )


def task_options(resources: dict[str, float], retries: int = 0) -> dict[str, Any]:
    """``ray.remote(...).options`` for a resource dict (``CPU``, ``GPU`` and custom resources) and the retries of
    a task whose node or worker process is lost (Ray's ``max_retries``: system failures only, ``-1`` always)."""
    rest = dict(resources)
    options: dict[str, Any] = {"num_cpus": rest.pop("CPU", 1), "max_retries": retries}
    if "GPU" in rest:
        options["num_gpus"] = rest.pop("GPU")
    if rest:
        options["resources"] = rest
    return options


class RayBackend(Backend):
    """Stages on Ray: Train, tasks, Tune (Ray must be initialised: ``init_ray``)."""

    name = "ray"

    def fit(self, job: TrainJob) -> tuple[dict[str, Any], Any]:
        from ray.train import CheckpointConfig, FailureConfig, RunConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        cfg = job.cfg
        use_cuda = cfg.scaling.use_gpu and cfg.scaling.accelerator == "GPU"
        trainer = TorchTrainer(
            _train_entry,
            train_loop_config={"worker": job.worker, "payload": job.payload, "backend": self},
            datasets=job.datasets() if job.datasets is not None else None,
            scaling_config=scaling_config(cfg.scaling),
            torch_config=TorchConfig(backend="nccl" if use_cuda else "gloo"),
            run_config=RunConfig(
                name=job.name,
                storage_path=job.storage_path,
                storage_filesystem=job.storage_filesystem,
                failure_config=FailureConfig(max_failures=cfg.run.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2),  # the latest, and the one before while it uploads
            ),
        )
        try:
            result = trainer.fit()
        except Exception as exc:  # Ray wraps worker errors; keep the first line, the workers' logs have the rest
            raise RuntimeError(f"{job.name} failed: {' '.join(str(exc).split())[:500]}") from exc
        if result.error is not None:
            raise RuntimeError(f"{job.name} failed: {result.error}") from result.error
        if result.checkpoint is None:
            raise RuntimeError(f"{job.name} finished without a checkpoint")
        with result.checkpoint.as_directory() as directory:
            return dict(result.metrics or {}), job.collect(Path(directory))

    def map(self, job: TaskMap) -> Iterator[tuple[Any, Any]]:
        import ray

        task = ray.remote(job.fn).options(**task_options(job.resources, job.retries))
        shared_ref = ray.put(job.shared)
        queue, pending = list(job.items), {}
        while queue or pending:
            while queue and len(pending) < job.concurrency:
                item = queue.pop(0)
                pending[task.remote(shared_ref, item)] = item
            ready, _ = ray.wait(list(pending), num_returns=1)
            item = pending.pop(ready[0])
            yield item, ray.get(ready[0])

    def call(self, fn: Callable[..., T], *args: Any, resources: dict[str, float], retries: int = 0) -> T:
        import ray

        return ray.get(ray.remote(fn).options(**task_options(resources, retries)).remote(*args))

    def search(self, job: SearchJob) -> dict[int, int]:
        # Tune's default per-trial CSV/JSON/TensorBoard loggers duplicate what the Parquet files hold and cost time,
        os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
        # so the result grid cannot read them back and would warn once per trial; the Optuna journal has them.
        logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
        from ray import tune
        from ray.tune.search import ConcurrencyLimiter

        from flora_ray.backends.ray_tune import (
            builds_per_process,
            optuna_searcher,
            progress_callback,
            remaining_trials,
            restore_tuner,
            start_tuner,
            tune_trial,
        )
        from flora_ray.tracking import trial_callbacks

        problem, fs = job.problem, job.storage_filesystem
        trainable = tune.with_parameters(tune_trial, problem=problem, backend=self)
        trainable = tune.with_resources(trainable, job.resources)
        experiment = f"{job.storage_path.rstrip('/')}/{problem.study_name}"
        callbacks = [progress_callback(problem.trials, job.after_trial, problem.objectives.cost)]
        callbacks += trial_callbacks(problem.config, problem.study_name)  # MLflow: one run per trial, when tracking
        tuner = restore_tuner(experiment, trainable, fs)
        if tuner is None and (remaining := remaining_trials(problem)) == 0:
            return {}  # the journal holds the whole budget already
        if tuner is None:
            tuner = start_tuner(experiment, fs, lambda: tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(
                    search_alg=ConcurrencyLimiter(optuna_searcher(problem), max_concurrent=job.concurrency),
                    num_samples=remaining,
                    reuse_actors=True,
                ),
                run_config=tune.RunConfig(
                    name=problem.study_name,
                    storage_path=job.storage_path,
                    storage_filesystem=fs,
                    verbose=0,
                    callbacks=callbacks,
                    # a trial errors only when its evaluator is lost (tune_trial reports its own errors as results)
                    failure_config=tune.FailureConfig(max_failures=job.retries),
                ),
            ))  # fmt: skip
        return builds_per_process(tuner.fit())

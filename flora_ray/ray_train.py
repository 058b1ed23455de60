"""Ray glue for training: local or cluster Ray, a ``TorchTrainer`` per stage, the run directory's outputs.

This is the only module of the training path that imports Ray. ``run_stage`` is what ``flora-ray pretrain`` and
``flora-ray train`` call: it writes the run's config, runs the workers (gloo on CPU, NCCL on CUDA) with
``FailureConfig(max_failures)``, and copies the final model out of the latest checkpoint. Re-running with the same
run name resumes: Ray Train finds the run's checkpoints in its storage path and hands the latest to the workers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flora_ray.config import Config, config_to_dict, dump_config
from flora_ray.storage.files import write_text
from flora_ray.training.trainer import STAGES, preflight, run_worker, save_stage_outputs

logger = logging.getLogger(__name__)


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join ``address`` (``auto``, ``ray://...``, ``host:port``) or start a local Ray bound to 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return
    if address is None:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every component on 127.0.0.1
        ray.init(num_cpus=num_cpus, dashboard_host="127.0.0.1", log_to_driver=True)
        return
    _check_reachable(address)
    try:
        ray.init(address=address, log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ValueError(f"cannot reach the Ray cluster at {address!r}: {str(exc).splitlines()[0]}") from exc


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, with one line, when nothing listens at ``host:port`` (Ray itself retries for minutes)."""
    if address == "auto":
        return
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"Ray address {address!r} is not auto, host:port or ray://host:port")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ValueError(
            f"cannot reach the Ray cluster at {address!r} ({exc.strerror or exc}): start it (`ray start --head`) "
            "or fix --address"
        ) from None


class _RaySession:
    """``training.Session`` on Ray Train."""

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


def _worker_entry(payload: dict[str, Any]) -> None:
    package_logger = logging.getLogger("flora_ray")
    if not package_logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        package_logger.addHandler(handler)
    package_logger.setLevel(logging.INFO)
    package_logger.propagate = False
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one line per report and checkpoint is noise here
    run_worker(payload, _RaySession())


def scaling_config(cfg: Config):
    """Ray Train's ``ScalingConfig`` from the run's scaling section (GPU or a named custom accelerator)."""
    from ray.train import ScalingConfig

    scaling = cfg.scaling
    resources = {"CPU": scaling.cpus_per_worker, **scaling.resources_per_worker}
    use_gpu = scaling.use_gpu and scaling.accelerator == "GPU"
    if use_gpu:
        resources["GPU"] = resources.get("GPU", 1)
    elif scaling.use_gpu:
        resources[scaling.accelerator] = resources.get(scaling.accelerator, 1)
    return ScalingConfig(num_workers=scaling.num_workers, use_gpu=use_gpu, resources_per_worker=resources)


def run_stage(
    cfg: Config,
    stage: str,
    *,
    fault_injection: dict[str, Any] | None = None,
    sample_log_dir: str | None = None,
) -> dict[str, Any]:
    """Run ``pretrain`` or ``train`` on Ray Train; returns the final metrics and the output path."""
    from ray.train import FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if stage not in STAGES:
        raise ValueError(f"stage {stage!r} is not one of {STAGES}")
    run_dir = cfg.run.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / f"{stage}_config.yaml", dump_config(cfg))
    preflight(cfg, stage)  # fail fast, before any worker starts
    payload = {
        "config": config_to_dict(cfg),
        "stage": stage,
        "run_dir": str(run_dir),
        "fault_injection": fault_injection,
        "sample_log_dir": sample_log_dir,
    }
    use_cuda = cfg.scaling.use_gpu and cfg.scaling.accelerator == "GPU"
    trainer = TorchTrainer(
        _worker_entry,
        train_loop_config=payload,
        scaling_config=scaling_config(cfg),
        torch_config=TorchConfig(backend="nccl" if use_cuda else "gloo"),
        run_config=RunConfig(
            name=f"{cfg.run.name}-{stage}",
            storage_path=cfg.run.storage_path,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
        ),
    )
    started = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray wraps worker errors; keep the first line, the workers' logs have the rest
        raise RuntimeError(f"{stage} failed: {' '.join(str(exc).split())[:500]}") from exc
    if result.error is not None:
        raise RuntimeError(f"{stage} failed: {result.error}") from result.error
    if result.checkpoint is None:
        raise RuntimeError(f"{stage} finished without a checkpoint")
    with result.checkpoint.as_directory() as directory:
        output = save_stage_outputs(Path(directory), run_dir, stage)
    seconds = time.perf_counter() - started
    logger.info("%s finished in %.1f s: %s", stage, seconds, output)
    return {"metrics": dict(result.metrics or {}), "output": str(output), "seconds": seconds}

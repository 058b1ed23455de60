"""The trainer's callbacks: checkpoint and report, progress lines, the cross-worker subnet check.

A checkpoint holds the model (safetensors), the optimiser and scheduler state, the epoch, the step within it (for a
mid-epoch checkpoint) and the metric history; the subnet sampler is stateless per step and every image's
augmentation is seeded by (seed, epoch, index), so a resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from flora_ray.storage.files import read_checkpoint, write_checkpoint
from flora_ray.training.sampling import config_digest
from flora_ray.training.trainer import STATE_FILE, Callback, Trainer

logger = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
STAGING_PREFIX = "flora-ckpt-"  # + "<pid>-": a checkpoint written locally before Ray Train copies it to storage


def staging_dir() -> Path:
    """A new local directory for one checkpoint report, named after this process. Directories that processes no
    longer running left behind (a worker killed while Ray Train collected its checkpoint: a spot reclaim, a stopped
    job) are removed first, so a node's temporary disk does not fill with one model copy per interruption."""
    remove_orphaned_staging(Path(tempfile.gettempdir()))
    return Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-"))


def remove_orphaned_staging(root: Path) -> list[Path]:
    """Remove the staging directories under ``root`` whose process is gone; returns them. A directory of a live
    process (or of a reused process id) is kept, as are names without a process id."""
    removed = []
    for path in root.glob(f"{STAGING_PREFIX}*-*"):
        pid = path.name.removeprefix(STAGING_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class Checkpoint(Callback):
    """Restores the session's latest checkpoint at the start; reports every epoch, with a checkpoint every
    ``every`` epochs and after the last one, and every ``every_steps`` optimiser steps within an epoch.

    Args:
        every: Epochs between checkpoints.
        model_state: ``() -> (tensors, header)`` of the model to save.
        load_model: ``(tensors, source)`` loads saved tensors into the model.
        every_steps: Optimiser steps between mid-epoch checkpoints (``None``: none).
    """

    def __init__(
        self,
        every: int,
        model_state: Callable[[], tuple[dict[str, torch.Tensor], dict[str, Any]]],
        load_model: Callable[[dict[str, torch.Tensor], Any], None],
        every_steps: int | None = None,
    ) -> None:
        self.every, self.model_state, self.load_model, self.every_steps = every, model_state, load_model, every_steps

    def on_fit_start(self, trainer: Trainer) -> None:
        with trainer.session.checkpoint_dir() as directory:
            if directory is None:
                return
            tensors, _ = read_checkpoint(Path(directory) / MODEL_FILE, device=trainer.device)
            self.load_model(tensors, directory)
            state = torch.load(Path(directory) / STATE_FILE, map_location=trainer.device, weights_only=True)
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.scheduler.load_state_dict(state["scheduler"])
        trainer.epoch, trainer.global_step = int(state["epoch"]), int(state["global_step"])
        trainer.step_in_epoch = int(state.get("step_in_epoch", 0))
        trainer.epoch_loss_sum = float(state.get("epoch_loss_sum", 0.0))
        trainer.epoch_images = int(state.get("epoch_images", 0))
        trainer.history = json.loads(state["history"])
        if trainer.is_main:
            logger.info(
                "%s: resumed from the checkpoint at epoch %d step %d (global step %d)",
                trainer.name, trainer.epoch, trainer.step_in_epoch, trainer.global_step,
            )  # fmt: skip

    def on_step_end(self, trainer: Trainer, step: int, images: int) -> None:
        if not self.every_steps or trainer.global_step % self.every_steps or step == trainer.steps_per_epoch:
            return  # the epoch's last step gets its checkpoint from on_epoch_end
        metrics = {"epoch": trainer.epoch, "step": step, "global_step": trainer.global_step}
        self._report(trainer, metrics)

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        due = trainer.epoch % self.every == 0 or trainer.epoch == trainer.opt.epochs
        if not due:
            trainer.session.report(metrics, None)
            return
        self._report(trainer, metrics)

    def _report(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        directory = staging_dir() if trainer.is_main else None
        try:
            if directory is not None:
                self._write(trainer, directory)
            trainer.session.report(metrics, directory)
            collected = getattr(trainer.session, "checkpoint_collected", None)
            if collected is not None:  # Ray: every rank waits until the checkpoint is registered
                collected(metrics)
        finally:
            if directory is not None:
                shutil.rmtree(directory, ignore_errors=True)

    def _write(self, trainer: Trainer, directory: Path) -> None:
        tensors, header = self.model_state()
        write_checkpoint(directory / MODEL_FILE, tensors, header)
        state = {
            "optimizer": trainer.optimizer.state_dict(),
            "scheduler": trainer.scheduler.state_dict(),
            "epoch": trainer.epoch,
            "global_step": trainer.global_step,
            "step_in_epoch": trainer.step_in_epoch,
            "epoch_loss_sum": trainer.epoch_loss_sum,
            "epoch_images": trainer.epoch_images,
            "history": json.dumps(trainer.history),
        }
        torch.save(state, directory / STATE_FILE)


def read_final_checkpoint(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[dict[str, Any]]]:
    """``(tensors, header, history)`` of a checkpoint this callback wrote."""
    tensors, header = read_checkpoint(directory / MODEL_FILE)
    state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    return tensors, header, json.loads(state["history"])


class Progress(Callback):
    """Rank 0 logs ``images/s`` and the ETA every ``every`` steps, and each epoch's metrics."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.start = self.t0 = 0.0
        self.start_epoch = 0

    def on_fit_start(self, trainer: Trainer) -> None:
        self.start, self.start_epoch = time.perf_counter(), trainer.epoch

    def on_epoch_start(self, trainer: Trainer) -> None:
        self.t0 = time.perf_counter()

    def on_step_end(self, trainer: Trainer, step: int, images: int) -> None:
        if not trainer.is_main or step % self.every:
            return
        now = time.perf_counter()
        done = (trainer.epoch - self.start_epoch) * trainer.steps_per_epoch + step
        left = (trainer.opt.epochs - trainer.epoch) * trainer.steps_per_epoch - step
        rate = images * trainer.session.world_size / max(now - self.t0, 1e-9)
        eta = (now - self.start) / max(done, 1) * left
        logger.info(
            "%s epoch %d/%d step %d/%d: %.0f img/s, ETA %s",
            trainer.name,
            trainer.epoch + 1,
            trainer.opt.epochs,
            step,
            trainer.steps_per_epoch,
            rate,
            duration(eta),
        )

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if trainer.is_main:
            logger.info("%s epoch %d/%d: %s", trainer.name, trainer.epoch, trainer.opt.epochs, format_metrics(metrics))


class ConfigCheck(Callback):
    """Workers agree on each step's subnet: an all-reduce (min and max) of the configuration's digest.

    The tensors live on the model's device, as NCCL requires (gloo takes CPU tensors too); this is the library's
    only collective outside Ray Train and DDP.
    """

    def __init__(self) -> None:
        self.checks = 0

    def on_configs(self, trainer: Trainer, step: int, configs: Sequence[dict[str, int]]) -> None:
        if trainer.session.world_size <= 1:
            return
        device = next(trainer.model.parameters()).device  # NCCL takes tensors on the model's GPU only
        low = torch.tensor([config_digest(configs[-1])], dtype=torch.int64, device=device)
        high = low.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        if low.item() != high.item():
            raise RuntimeError(f"workers sampled different subnets at epoch {trainer.epoch} step {step}")
        self.checks += 1

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        metrics["config_checks"] = self.checks


def format_metrics(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


def duration(seconds: float) -> str:
    """``1h02m`` or ``3m05s``."""
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"

"""One training loop for every task: the dense teacher, the supernet and the filter's local supernets.

Nothing in this file knows what is trained (minGPT's trainer is the model): a ``Task`` does the forward and
backward of one batch and evaluates at the end of an epoch; the ``Trainer`` owns the optimiser, the schedule, mixed
precision, gradient clipping and the epoch loop; extras are ``Callback`` s (checkpoint and report, progress lines,
the cross-worker check that every worker trains the same subnet). Everything distributed goes through a small
``Session`` (rank, device, model wrapping, checkpoint in / report out): ``LocalSession`` runs in-process, the Ray
backend implements it with Ray Train.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader

from flora_ray.errors import InputError
from flora_ray.training.optim import build_optimizer, build_scheduler

logger = logging.getLogger(__name__)

# The training state file of a checkpoint directory (written by ``callbacks.Checkpoint``, looked for by sessions).
STATE_FILE = "state.pt"


class Session(Protocol):
    """What the loop needs from the distributed runtime."""

    world_rank: int
    world_size: int
    device: torch.device

    def prepare_model(self, model: nn.Module) -> nn.Module: ...

    def checkpoint_dir(self) -> contextlib.AbstractContextManager[Path | None]: ...

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None: ...


class Task(Protocol):
    """What the trainer trains: ``net`` is optimised; ``train_step`` runs forward and backward of one batch."""

    net: nn.Module

    def train_step(self, trainer: Trainer, step: int, x: torch.Tensor, y: torch.Tensor) -> float: ...

    def evaluate(self, trainer: Trainer) -> dict[str, float]: ...


class Callback:
    """Hooks of the loop; each does nothing unless overridden."""

    def on_fit_start(self, trainer: Trainer) -> None: ...

    def on_epoch_start(self, trainer: Trainer) -> None: ...

    def on_configs(self, trainer: Trainer, step: int, configs: Sequence[dict[str, int]]) -> None: ...

    def on_step_end(self, trainer: Trainer, step: int, images: int) -> None: ...

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None: ...


class Trainer:
    """The epoch loop of one worker.

    Args:
        task: What to train.
        opt: The stage's optimiser section (``epochs``, ``lr``, ``amp``, ...).
        session: The distributed runtime (``LocalSession`` for one process).
        loader: The worker's training batches.
        name: Stage name for log lines.
        callbacks: Extras run at each hook, in order.
        train_sampler: A ``DistributedSampler`` whose epoch is set before each epoch (``None``: the loader shuffles).
        evaluate: Run ``task.evaluate`` on rank 0 after each epoch.
        prepare: ``prepare(x, train=True)`` turns a batch on the device into model inputs (``Preprocess`` of uint8
            pixel batches); ``None``: batches are model inputs already.

    With ``opt.accumulate = k > 1`` one optimiser step takes ``k`` consecutive batches (gradients averaged,
    cross-worker sync on the last one only), and the task sees the optimiser step's index for all ``k`` of them, so
    a supernet trains one sampled subnet per effective batch; an epoch's last ``len(loader) % k`` batches are
    skipped.
    """

    def __init__(
        self,
        task: Task,
        opt: Any,
        session: Session,
        loader: DataLoader,
        name: str,
        callbacks: Sequence[Callback] = (),
        train_sampler: Any = None,
        evaluate: bool = True,
        prepare: Any = None,
    ) -> None:
        self.task, self.opt, self.session, self.loader, self.name = task, opt, session, loader, name
        self.callbacks = [*callbacks, *getattr(session, "callbacks", ())]  # a test session may add its own
        self.train_sampler, self.do_evaluate, self.prepare = train_sampler, evaluate, prepare
        self.device = session.device
        self.is_main = session.world_rank == 0
        self.model = session.prepare_model(task.net)
        self.optimizer = build_optimizer(self.model, opt.lr, opt.weight_decay)
        self.accumulate = int(getattr(opt, "accumulate", 1))
        self.steps_per_epoch = len(loader) // self.accumulate
        if self.steps_per_epoch == 0:
            raise InputError(
                f"{name}: {len(loader)} batches per epoch cannot fill one step of accumulate={self.accumulate}; "
                "lower accumulate or the batch size"
            )
        self.scheduler = build_scheduler(
            self.optimizer,
            opt.epochs * self.steps_per_epoch,
            int(opt.warmup_epochs * self.steps_per_epoch),
            opt.min_lr,
        )
        self.autocast, self.scaler = self._amp()
        self.epoch, self.global_step = 0, 0
        # Within the current epoch: optimiser steps done, their summed loss and images (a mid-epoch checkpoint
        # saves them; a resumed run starts the epoch at ``step_in_epoch``).
        self.step_in_epoch, self.epoch_loss_sum, self.epoch_images = 0, 0.0, 0
        self.history: list[dict[str, Any]] = []

    def _amp(self):
        if self.device.type != "cuda" or self.opt.amp == "off":
            return contextlib.nullcontext, None
        dtype = torch.float16 if self.opt.amp == "fp16" else torch.bfloat16
        if self.opt.amp == "auto" and not torch.cuda.is_bf16_supported():
            dtype = torch.float16
        scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
        return (lambda: torch.autocast("cuda", dtype=dtype)), scaler

    def emit(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    # -- one step ----------------------------------------------------------------------------------------------

    def backward(self, loss: torch.Tensor) -> None:
        if self.accumulate > 1:
            loss = loss / self.accumulate
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def _optimizer_step(self) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.opt.clip_grad:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.opt.clip_grad)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        self.scheduler.step_update(self.global_step)

    # -- epochs ------------------------------------------------------------------------------------------------

    def fit(self) -> list[dict[str, Any]]:
        """Train from the current epoch (a callback may have restored one) to ``opt.epochs``; returns the history."""
        self.emit("on_fit_start")
        while self.epoch < self.opt.epochs:
            self.emit("on_epoch_start")
            loss, images, seconds = self._train_epoch()
            metrics = {
                "epoch": self.epoch + 1,
                "loss": loss,
                "images": images * self.session.world_size,
                "images_per_s": images * self.session.world_size / seconds,
                "lr": self.optimizer.param_groups[0]["lr"],
            }
            if self.is_main and self.do_evaluate:
                metrics.update(self.task.evaluate(self))
            self.epoch += 1
            self.history.append(metrics)
            self.emit("on_epoch_end", metrics)
        return self.history

    def _train_epoch(self) -> tuple[float, int, float]:
        start = self.step_in_epoch  # > 0 when resumed from a mid-epoch checkpoint
        self.model.train()
        t0 = time.perf_counter()
        batches = self._batches(start)
        for step in range(start, self.steps_per_epoch):
            for micro in range(self.accumulate):
                x, y = next(batches)
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                if self.prepare is not None:
                    x = self.prepare(x, train=True)
                with self._no_sync(last=micro == self.accumulate - 1):
                    self.epoch_loss_sum += self.task.train_step(self, step, x, y) / self.accumulate
                self.epoch_images += len(y)
            self._optimizer_step()
            self.step_in_epoch = step + 1
            self.emit("on_step_end", step + 1, self.epoch_images)
        seconds = max(time.perf_counter() - t0, 1e-9)
        loss, images = self.epoch_loss_sum / self.steps_per_epoch, self.epoch_images
        self.step_in_epoch, self.epoch_loss_sum, self.epoch_images = 0, 0.0, 0
        return loss, images, seconds

    def _batches(self, start: int) -> Iterator[Any]:
        """This epoch's batches from optimiser step ``start`` on: the sampler skips the items before it (nothing is
        decoded for them); a loader without such a sampler reads and drops the batches before it."""
        skip = start * self.accumulate
        if self.train_sampler is not None:
            self.train_sampler.set_epoch(self.epoch)
            if skip and hasattr(self.train_sampler, "set_start"):
                self.train_sampler.set_start(skip * self.opt.batch_size)
                return iter(self.loader)
        batches = iter(self.loader)
        for _ in range(skip):
            next(batches)
        return batches

    def _no_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """DDP's ``no_sync`` on every micro-batch of an accumulated step but the last."""
        no_sync = getattr(self.model, "no_sync", None)
        return no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()


class LocalSession:
    """A single-process session: checkpoints go to ``directory`` (the latest one is kept; ``None``: none kept)."""

    world_rank, world_size = 0, 1

    def __init__(self, directory: str | Path | None = None, device: str = "cpu") -> None:
        self.directory = Path(directory) if directory is not None else None
        self.device = torch.device(device)
        self.reports: list[dict[str, Any]] = []

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    @contextlib.contextmanager
    def checkpoint_dir(self) -> Iterator[Path | None]:
        latest = self.directory / "latest" if self.directory is not None else None
        yield latest if latest is not None and (latest / STATE_FILE).is_file() else None

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        import shutil

        self.reports.append(metrics)
        if checkpoint_dir is not None and self.directory is not None:
            target, tmp = self.directory / "latest", self.directory / "latest.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(checkpoint_dir, tmp)
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)

"""What the trainer trains: the dense teacher (cross-entropy) and a supernet distilled from the teacher.

``SupernetTask`` trains ONE sampled subnet per step (or a few, accumulated, for the sandwich sampler or in-place
distillation, which adds the largest subnet as the others' target), the same on every worker: each worker draws it
from a generator seeded by ``(seed, epoch, step)``. The filter's local supernets are ``SupernetTask`` s too, over a
space in which only one block varies.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from flora_ray.core.space import RankSpace
from flora_ray.core.supernet import Supernet
from flora_ray.data.datasets import eval_subset
from flora_ray.training.optim import distillation_loss, inplace_distillation_loss
from flora_ray.training.sampling import Sampler, step_generator
from flora_ray.training.trainer import Trainer


@torch.no_grad()
def correct_per_image(
    model: nn.Module, *, dataset, device: torch.device, max_images: int | None = None, batch_size: int = 256
) -> np.ndarray:
    """Whether ``model`` gets each image of ``dataset`` right (booleans in the dataset's order), or of a stratified
    seeded subset of ``max_images`` of its images: two models scored here are scored on the same images, so their
    difference can be compared paired (``results.paired_difference``)."""
    dataset = eval_subset(dataset, max_images, seed=0)
    was_training = model.training
    model.eval()
    correct = [(model(x.to(device)).argmax(-1).cpu() == y) for x, y in DataLoader(dataset, batch_size=batch_size)]
    model.train(was_training)
    return torch.cat(correct).numpy() if correct else np.zeros(0, dtype=bool)


def accuracy(
    model: nn.Module, dataset, device: torch.device, max_images: int | None = None, batch_size: int = 256
) -> float:
    """Top-1 accuracy (%) on ``dataset``, or on a stratified seeded subset of ``max_images`` of its images."""
    correct = correct_per_image(model, dataset=dataset, device=device, max_images=max_images, batch_size=batch_size)
    return 100.0 * int(correct.sum()) / max(len(correct), 1)


def probe_configs(space: RankSpace) -> dict[str, dict[str, int]]:
    """The largest, middle uniform and smallest configurations reported every epoch."""
    uniform = list(space.uniform_configs().values())
    probes = {"largest": space.largest()}
    if len(uniform) > 2:
        probes["middle"] = uniform[len(uniform) // 2]
    probes["smallest"] = space.smallest()
    return probes


class DenseTask:
    """Cross-entropy on the labels; evaluates on the search split, and on the test split after the last epoch."""

    def __init__(self, net: nn.Module, label_smoothing: float, search=None, test=None, eval_images=None) -> None:
        self.net, self.label_smoothing = net, label_smoothing
        self.search, self.test, self.eval_images = search, test, eval_images

    def train_step(self, trainer: Trainer, step: int, x: torch.Tensor, y: torch.Tensor) -> float:
        with trainer.autocast():
            logits = trainer.model(x).float()
            loss = nn.functional.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        trainer.backward(loss)
        return loss.item()

    def evaluate(self, trainer: Trainer) -> dict[str, float]:
        out = {"search_acc": accuracy(self.net, self.search, trainer.device, self.eval_images)}
        if trainer.epoch + 1 == trainer.opt.epochs:  # the dense teacher's final test accuracy, for the report
            out["test_acc"] = accuracy(self.net, self.test, trainer.device)
        return out


class SupernetTask:
    """Distillation of the sampled subnet(s) of each step from the frozen dense teacher, or in place.

    Args:
        supernet: The supernet (``net``).
        teacher: The frozen dense teacher.
        sampler: Draws the step's configurations from a ``step_generator``.
        seed: Seed of the per-step generators.
        temperature, label_weight, label_smoothing: The distillation loss (``optim.distillation_loss``).
        search: Search split for the per-epoch probe accuracies (``None``: no evaluation).
        eval_images: Images of ``search`` each probe is scored on.
        distill_from: ``teacher``: every configuration of the step distils from the teacher. ``largest``
            (in-place distillation): the largest configuration runs first, on the teacher loss, and the sampled
            ones distil from its detached logits (``optim.inplace_distillation_loss``); a draw of the largest is
            not run a second time. Either way the teacher runs once per step.
    """

    def __init__(
        self,
        supernet: Supernet,
        teacher: nn.Module,
        sampler: Sampler,
        seed: int,
        temperature: float = 1.0,
        label_weight: float = 0.0,
        label_smoothing: float = 0.0,
        search: Any = None,
        eval_images: int | None = None,
        distill_from: str = "teacher",
    ) -> None:
        if distill_from not in ("teacher", "largest"):
            raise ValueError(f"distill_from={distill_from!r} is not supported; use 'teacher' or 'largest'")
        self.net, self.supernet, self.teacher, self.sampler, self.seed = supernet, supernet, teacher, sampler, seed
        self.loss_args = (temperature, label_weight, label_smoothing)
        self.search, self.eval_images = search, eval_images
        self.largest = supernet.space.largest() if distill_from == "largest" else None

    def step_configs(self, epoch: int, step: int) -> list[dict[str, int]]:
        """The configurations trained at ``(epoch, step)``, in order: the sampler's draw, after the largest one
        (once) when distilling in place. The last is the sampler's own last draw, which ``ConfigCheck`` compares
        across workers."""
        configs = self.sampler.sample(step_generator(self.seed, epoch, step))
        if self.largest is None:
            return configs
        return [self.largest, *(c for c in configs if c != self.largest)]

    def train_step(self, trainer: Trainer, step: int, x: torch.Tensor, y: torch.Tensor) -> float:
        configs = self.step_configs(trainer.epoch, step)
        trainer.emit("on_configs", step, configs)
        with torch.no_grad(), trainer.autocast():
            teacher_logits = self.teacher(x)
        total, largest_logits = 0.0, None
        no_sync = getattr(trainer.model, "no_sync", None)
        for i, config in enumerate(configs):
            self.supernet.set_ranks(config)
            last = i == len(configs) - 1
            context = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
            with context:
                with trainer.autocast():
                    logits = trainer.model(x)
                if largest_logits is None:
                    loss = distillation_loss(logits, teacher_logits, y, *self.loss_args)
                else:
                    loss = inplace_distillation_loss(logits, largest_logits, self.loss_args[0])
                trainer.backward(loss / len(configs))
            if self.largest is not None and largest_logits is None:
                largest_logits = logits.detach()  # the targets of the step's other subnets
            total += loss.item() / len(configs)
        return total

    def evaluate(self, trainer: Trainer) -> dict[str, float]:
        out = {}
        for name, config in probe_configs(self.supernet.space).items():
            self.supernet.set_ranks(config)
            out[f"search_acc_{name}"] = accuracy(self.supernet, self.search, trainer.device, self.eval_images)
        return out


class SubnetTask:
    """Distillation of one static subnet (an extracted low-rank model) from the frozen dense teacher: the
    supernet's loss, with the subnet fixed (fine-tuning an export).

    Args:
        subnet: The student (``net``), e.g. ``core.subnet.extract_subnet(supernet, ranks)``.
        teacher: The frozen dense teacher.
        temperature, label_weight, label_smoothing: The distillation loss (``optim.distillation_loss``).
        search: Search split for the per-epoch accuracy (``None``: no evaluation).
        eval_images: Images of ``search`` it is scored on.
    """

    def __init__(
        self,
        subnet: nn.Module,
        teacher: nn.Module,
        temperature: float = 1.0,
        label_weight: float = 0.0,
        label_smoothing: float = 0.0,
        search: Any = None,
        eval_images: int | None = None,
    ) -> None:
        self.net, self.teacher = subnet, teacher.eval()
        self.loss_args = (temperature, label_weight, label_smoothing)
        self.search, self.eval_images = search, eval_images

    def train_step(self, trainer: Trainer, step: int, x: torch.Tensor, y: torch.Tensor) -> float:
        with torch.no_grad(), trainer.autocast():
            teacher_logits = self.teacher(x)
        with trainer.autocast():
            logits = trainer.model(x)
        loss = distillation_loss(logits, teacher_logits, y, *self.loss_args)
        trainer.backward(loss)
        return loss.item()

    def evaluate(self, trainer: Trainer) -> dict[str, float]:
        if self.search is None:
            return {}
        return {"search_acc": accuracy(self.net, self.search, trainer.device, self.eval_images)}

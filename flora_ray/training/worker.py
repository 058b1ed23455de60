"""Worker setup shared by every process that trains or evaluates: threads, seed, device, the training loader.

Training loaders decode and augment in ``workers`` DataLoader processes (pinned memory on CUDA, workers kept across
epochs). Every item's random draws (python ``random``, numpy and torch, which timm's and our transforms use) come
from a seed of ``(seed, epoch, index)`` only, so an epoch's batches are the same whatever the number of loader
workers, and a restarted run redraws exactly what the interrupted one drew.
"""

from __future__ import annotations

import contextlib
import random
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, get_worker_info

from flora_ray.errors import InputError


def device_for(
    accelerator: str, requested: bool, allow_cpu: bool = False, key: str = "scaling.use_gpu"
) -> torch.device:
    """The one device rule: CUDA when the work asked for the ``GPU`` accelerator, else CPU.

    Work that asked for a GPU (the config key ``key``) where torch sees no CUDA device fails, unless ``allow_cpu``
    (``scaling.allow_cpu``) says CPU is fine: it then runs on CPU. A custom accelerator resource
    (``scaling.accelerator: TPU`` or a test resource) runs CPU torch.
    """
    if not (requested and accelerator == "GPU"):
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if allow_cpu:
        return torch.device("cpu")
    raise RuntimeError(f"{no_cuda_message(key)} on {socket.gethostname()}")


def run_device(cfg: Any, key: str) -> torch.device:
    """``device_for`` of a run's work that asks for its accelerator by ``key``: ``scaling.use_gpu`` (training,
    filtering) or ``search.gpus_per_trial`` (search, export, fine-tuning)."""
    return device_for(cfg.scaling.accelerator, key in gpu_requests(cfg), cfg.scaling.allow_cpu, key)


def gpu_requests(cfg: Any) -> list[str]:
    """The configuration keys of a run that ask for a CUDA GPU (the ``GPU`` accelerator): ``scaling.use_gpu``,
    ``search.gpus_per_trial`` above 0."""
    if cfg.scaling.accelerator != "GPU":
        return []
    asked = (("scaling.use_gpu", cfg.scaling.use_gpu), ("search.gpus_per_trial", cfg.search.gpus_per_trial > 0))
    return [key for key, on in asked if on]


def no_cuda_message(key: str) -> str:
    """Why work that asked for a GPU by ``key`` cannot have one here, and the ways out."""
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
    return (
        f"{key} asks for a GPU but torch {torch.__version__} ({build}) sees no CUDA device: run on a GPU machine or "
        f"cluster (--address), set {key} to {'0' if 'gpus' in key else 'false'}, or set scaling.allow_cpu=true to run "
        "on CPU anyway"
    )


def setup_worker(threads: int, seed: int | None = None) -> None:
    """torch intra-op threads (0: leave torch's default) and the global seed (``None``: left as it is) of a worker
    process."""
    if threads:
        torch.set_num_threads(threads)
    if seed is not None:
        torch.manual_seed(seed)


@dataclass(frozen=True)
class Feed:
    """How a training loop is fed: ``workers`` loader processes, ``prepare(x, train=True)`` on the device (the
    data's ``Preprocess``; ``None``: batches are model inputs), ``random_items`` (items draw random numbers)."""

    workers: int = 0
    prepare: Callable[..., torch.Tensor] | None = None
    random_items: bool = True


def loader_workers(configured: int | None, cpus: float) -> int:
    """DataLoader worker processes: ``configured``, or by default one per CPU the process reserves beyond its own
    (``cpus - 1``; none with one CPU or less)."""
    return int(configured) if configured is not None else max(0, int(cpus) - 1)


_MASK64 = (1 << 64) - 1


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one item's random draws in one epoch: splitmix64 of the three numbers (a microsecond)."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 1  # 63 bits: a valid torch seed


@contextlib.contextmanager
def _kept_rng_state() -> Iterator[None]:
    """Restore python's and torch's global generators afterwards (items drawn in the training process, which
    draws from both: random erasing, dropout). numpy's global generator is left as the item seeded it: nothing in
    a training process draws from it, and saving and restoring it would cost 70 us per item."""
    states = random.getstate(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        torch.set_rng_state(states[1])


class SeededItems(Dataset):
    """``dataset`` indexed by ``(epoch, index)``: each item is drawn with every global generator seeded by
    ``item_seed(seed, epoch, index)``; in the training process itself python's and torch's are restored
    afterwards (about 30 us per item in all; a decoded JPEG costs milliseconds)."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        context = _kept_rng_state() if get_worker_info() is None else contextlib.nullcontext()
        with context:
            s = item_seed(self.seed, epoch, index)
            random.seed(s)
            np.random.seed(s & 0xFFFFFFFF)
            torch.default_generator.manual_seed(s)  # CPU draws only (torch.manual_seed would cost 150 us)
            return self.dataset[index]


class _EpochFree(Dataset):
    """``dataset`` indexed by ``(epoch, index)``, ignoring the epoch (items without random draws)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        return self.dataset[key[1]]


class EpochIndexSampler(Sampler):
    """A ``DistributedSampler`` whose indices carry their epoch: yields ``(epoch, index)`` for ``SeededItems``;
    ``set_start(k)`` skips this epoch's first ``k`` indices (a run resumed mid-epoch), until the next epoch."""

    def __init__(self, sampler: DistributedSampler) -> None:
        self.sampler, self.epoch, self.start = sampler, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.start = epoch, 0
        self.sampler.set_epoch(epoch)

    def set_start(self, start: int) -> None:
        self.start = start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(self.sampler)[self.start :]
        self.start = 0
        return ((self.epoch, int(i)) for i in indices)

    def __len__(self) -> int:
        return len(self.sampler)


def distributed_loader(
    dataset,
    batch_size: int,
    world_size: int,
    world_rank: int,
    seed: int,
    what: str,
    workers: int = 0,
    device: torch.device | None = None,
    random_items: bool = True,
) -> tuple[DataLoader, EpochIndexSampler]:
    """This worker's shard of ``dataset``, reshuffled each epoch (``sampler.set_epoch``), full batches only,
    decoded by ``workers`` loader processes (kept across epochs) into pinned memory when ``device`` is CUDA.
    ``random_items``: the items draw random numbers (augmentation), so each is drawn with its own seed (``False``:
    deterministic items, read as they are)."""
    sampler = EpochIndexSampler(
        DistributedSampler(dataset, num_replicas=world_size, rank=world_rank, shuffle=True, seed=seed, drop_last=True)
    )
    loader = DataLoader(
        SeededItems(dataset, seed) if random_items else _EpochFree(dataset),
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=workers,
        pin_memory=device is not None and device.type == "cuda",
        persistent_workers=workers > 0,
    )
    if len(loader) == 0:
        raise InputError(
            f"{what}.batch_size={batch_size} is larger than a worker's share of the training data "
            f"({len(sampler)} images); lower the batch size"
        )
    return loader, sampler

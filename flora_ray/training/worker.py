"""Worker setup shared by every process that trains or evaluates: threads, seed, device, the training loader."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, DistributedSampler


def device_for(accelerator: str, requested: bool) -> torch.device:
    """The one device rule: CUDA when the work asked for the ``GPU`` accelerator and CUDA is there, else CPU.

    A custom accelerator resource (``scaling.accelerator: TPU`` or a test resource) runs CPU torch.
    """
    return torch.device("cuda" if requested and accelerator == "GPU" and torch.cuda.is_available() else "cpu")


def setup_worker(threads: int, seed: int | None = None) -> None:
    """torch intra-op threads (0: leave torch's default) and the global seed (``None``: left as it is) of a worker
    process."""
    if threads:
        torch.set_num_threads(threads)
    if seed is not None:
        torch.manual_seed(seed)


def distributed_loader(
    dataset, batch_size: int, world_size: int, world_rank: int, seed: int, what: str
) -> tuple[DataLoader, DistributedSampler]:
    """This worker's shard of ``dataset``, reshuffled each epoch (``sampler.set_epoch``), full batches only."""
    sampler = DistributedSampler(
        dataset, num_replicas=world_size, rank=world_rank, shuffle=True, seed=seed, drop_last=True
    )
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True)
    if len(loader) == 0:
        raise ValueError(
            f"{what}.batch_size={batch_size} is larger than a worker's share of the training data "
            f"({len(sampler)} images); lower the batch size"
        )
    return loader, sampler

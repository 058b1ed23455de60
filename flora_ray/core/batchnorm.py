"""BatchNorm statistics per subnet: recalibrate a model's running statistics on a fixed set of images.

A supernet trained with BatchNorm in training mode (LeViT's ``LinearNorm``: a factorised Linear, then a
``BatchNorm1d``) keeps one set of running statistics averaged over every subnet it sampled; a subnet scored in
eval mode with those shared statistics normalises its own activations (those of rank-r products) with the wrong
mean and variance. Once-for-all recalibrates the statistics of each subnet before evaluating it
(``set_running_statistics``); ``recalibrate_batchnorm`` does the same for any ``nn.Module``: reset the running
statistics, switch every BatchNorm to a cumulative average (``momentum=None``) in training mode, run the images
forward without gradients, restore the momenta and modes. A model without BatchNorm is left untouched and nothing
runs (ViT and Swin: LayerNorm only).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def batchnorm_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The BatchNorm layers of ``model`` that keep running statistics, by FQN."""
    return {
        fqn: module
        for fqn, module in model.named_modules()
        if isinstance(module, BATCHNORM_TYPES) and module.track_running_stats and module.running_mean is not None
    }


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` has a BatchNorm with running statistics (whether recalibration would change anything)."""
    return bool(batchnorm_layers(model))


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module,
    images: torch.Tensor,
    batch_size: int,
    preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> bool:
    """Replace the running statistics of every BatchNorm of ``model`` by those of ``images`` under ``model``.

    Each BatchNorm ends with the mean over the batches of its inputs' batch means and unbiased batch variances
    (``momentum=None``); the batches are ``images`` in order, ``batch_size`` at a time, moved to the device of the
    model's first parameter and passed through ``preprocess`` when given (uint8 pixels). Only the BatchNorm layers
    run in training mode (dropout and the like stay as they are); every module's mode and every momentum are
    restored afterwards. Returns whether anything was recalibrated (``False``: no BatchNorm, nothing ran).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    layers = list(batchnorm_layers(model).values())
    if not layers or len(images) == 0:
        return False
    device = next(model.parameters()).device
    modes = {module: module.training for module in model.modules()}
    momenta = [layer.momentum for layer in layers]
    try:
        for layer in layers:
            layer.reset_running_stats()
            layer.momentum = None
            layer.train()
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size].to(device, non_blocking=True)
            model(preprocess(x) if preprocess is not None else x)
    finally:
        for layer, momentum in zip(layers, momenta, strict=True):
            layer.momentum = momentum
        for module, training in modes.items():
            module.training = training
    return True


def batchnorm_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the running statistics of ``model``'s BatchNorm layers (buffers by state-dict key)."""
    return {
        f"{fqn}.{name}": buffer.detach().clone()
        for fqn, layer in batchnorm_layers(model).items()
        for name, buffer in layer.named_buffers(recurse=False)
    }


def load_batchnorm_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy running statistics saved by ``batchnorm_state`` back into ``model``'s BatchNorm layers."""
    for fqn, layer in batchnorm_layers(model).items():
        for name, buffer in layer.named_buffers(recurse=False):
            buffer.copy_(state[f"{fqn}.{name}"])


@dataclass(frozen=True)
class BatchNormCalibration:
    """A fixed recalibration set: ``calibration(model)`` recalibrates ``model``'s BatchNorm statistics on it.

    Attributes:
        images: The images, in the order they are batched (uint8 pixels when ``preprocess`` is given).
        batch_size: Images per forward pass.
        preprocess: What makes a batch of ``images`` model inputs, on the model's device (``None``: they are).
    """

    images: torch.Tensor
    batch_size: int
    preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __call__(self, model: nn.Module) -> bool:
        """``recalibrate_batchnorm`` of ``model`` on these images; whether anything was recalibrated."""
        return recalibrate_batchnorm(model, self.images, self.batch_size, self.preprocess)

"""Shared test helpers: tiny models of each supported family and small utilities."""

from pathlib import Path

import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

REFERENCE_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference"

# Small models of each supported family, with the kwargs that make them fast on CPU.
TINY_MODELS = {
    "vit": ("test_vit", {"img_size": 64}),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {"img_size": 64, "depth": 2}),
    "swin": (
        "swin_tiny_patch4_window7_224",
        {"img_size": 64, "embed_dim": 32, "depths": (2, 2), "num_heads": (2, 4), "window_size": 4},
    ),
    # 72 px: stage resolutions 18 and 9 are not multiples of the window, so timm pads the windows.
    "swin_padded": (
        "swin_tiny_patch4_window7_224",
        {"img_size": 72, "embed_dim": 32, "depths": (2, 2), "num_heads": (2, 4), "window_size": 4},
    ),
    # LeViT (Linear form): conv stem, then stages of BatchNorm'd Linear blocks at 4x4, 2x2 and 1x1 tokens.
    "levit": (
        "levit_128s",
        {"img_size": 64, "embed_dim": (32, 48, 64), "key_dim": 8, "num_heads": (2, 3, 4), "depth": (1, 2, 1)},
    ),
}


def random_config(space, rng):
    """A random configuration from the space's block candidates."""
    return space.from_block_tuples([rng.choice(block.candidates) for block in space.blocks])


def input_for(model, batch=2):
    """A random input batch at the model's configured size (read from its registered family)."""
    from flora_ray.core.families import family_of

    height, width = family_of(model).img_size(model)
    in_chans = model.patch_embed.proj.in_channels if hasattr(model, "patch_embed") else model.in_chans
    return torch.randn(batch, in_chans, height, width)


def randomise_batchnorm(model, seed=0):
    """Random affine parameters and running statistics in every BatchNorm of ``model``, returned for chaining.

    timm initialises some of LeViT's BatchNorm scales to zero (``proj`` and ``mlp.ln2``), which zeroes the branches
    behind them; random values make every factorised layer count in an equivalence test.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                shape = module.running_mean.shape
                module.weight.copy_(torch.randn(shape, generator=generator))
                module.bias.copy_(0.1 * torch.randn(shape, generator=generator))
                module.running_mean.copy_(0.1 * torch.randn(shape, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(shape, generator=generator))
    return model


# MODEL.DEIT.SVD_CONFIG of the two subnets released with the paper (configs/lr_deit/subnet/ of the reference code).
DEIT_B_SVD_CONFIG = [
    [0.125, 0.25, 0.375], [0.125, 0.125, 0.125], [0.125, 0.375, 0.125], [0.375, 0.5, 0.25],
    [0.25, 0.125, 0.25], [0.5, 0.25, 0.375], [0.375, 0.5, 0.5], [0.375, 0.375, 0.25],
    [0.375, 0.375, 0.25], [0.375, 0.625, 0.125], [0.375, 0.5, 0.125], [0.375, 0.125, 0.125],
]  # fmt: skip
S1, S2, S3, S4, S5 = 1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6
DEIT_S_SVD_CONFIG = [
    [S1, S3, S2], [S1, S3, S2], [S2, S3, S3], [S3, S3, S1], [S3, S3, S2], [S3, S2, S2],
    [S2, S4, S3], [S2, S5, S2], [1.0, S3, S1], [S2, S3, S1], [S4, S3, S1], [S3, S1, S1],
]  # fmt: skip


def write_reference_yaml(tmp_path, rows, depth=12, dim=768):
    """Write a reference-format subnet YAML (MODEL.DEIT.SVD_CONFIG) into tmp_path."""
    path = tmp_path / "subnet.yml"
    doc = {"MODEL": {"DEIT": {"DEPTH": depth, "EMBED_DIM": dim, "SVD_CONFIG": rows}, "NAME": "x"}}
    path.write_text(yaml.safe_dump(doc))
    return path


def counted_macs(model, x):
    """Multiply-accumulates as counted by PyTorch's FlopCounterMode (flops / 2)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() // 2

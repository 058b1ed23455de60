"""Test configuration: loopback-only Ray, unfused timm attention (so FlopCounterMode sees it), small models."""

import os

# Must be set before timm and ray are imported anywhere.
os.environ.setdefault("TIMM_FUSED_ATTN", "0")
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest
import torch
from helpers import TINY_MODELS


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=sorted(TINY_MODELS))
def tiny_model(request):
    """(name, kwargs) of each tiny model family."""
    return TINY_MODELS[request.param]

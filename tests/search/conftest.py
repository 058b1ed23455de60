"""Fixtures for training tests: a tiny digits config and a dense teacher written by the test."""

import pytest

from flora_ray.config import load_config
from flora_ray.fileio import write_checkpoint
from flora_ray.models import dense_checkpoint_metadata
from flora_ray.training import TEACHER_FILE, resolve_model_spec

DIGITS_OVERRIDES = [
    "model.name=test_vit",
    "model.kwargs={patch_size: 2, embed_dim: 32, depth: 2, num_heads: 2, mlp_ratio: 2}",
    "model.ratios=[0.25, 0.5, 1.0]",
    "data.name=digits",
    "data.img_size=8",
    "data.in_chans=1",
    "data.augment=false",
    "pretrain.epochs=2",
    "pretrain.batch_size=128",
    "pretrain.warmup_epochs=0",
    "train.epochs=3",
    "train.batch_size=128",
    "train.warmup_epochs=0",
    "train.eval_images=100",
    "run.threads_per_worker=1",
]


@pytest.fixture
def digits_config(tmp_path):
    def make(*overrides):
        return load_config(None, [*DIGITS_OVERRIDES, f"run.output_dir={tmp_path / 'runs'}", *overrides])

    return make


@pytest.fixture
def with_teacher():
    """Write a (randomly initialised) dense teacher checkpoint into the run directory of a config."""

    def write(cfg):
        spec = resolve_model_spec(cfg)
        model = spec.create()
        cfg.run.run_dir.mkdir(parents=True, exist_ok=True)
        write_checkpoint(cfg.run.run_dir / TEACHER_FILE, model.state_dict(), dense_checkpoint_metadata(spec))
        return model

    return write

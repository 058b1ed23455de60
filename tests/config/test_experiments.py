"""Every experiment file in experiments/ loads, names a real timm model, and follows its recipe."""

from pathlib import Path

import pytest

from flora_ray.config import load_config
from flora_ray.core.space import EIGHTHS, SIXTHS
from flora_ray.stages.inputs import full_space

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
IMAGENET = {
    "deit_small_imagenet.yaml": ("deit_small_patch16_224", SIXTHS, 216, 300, 1.5e-4),
    "deit_base_imagenet.yaml": ("deit_base_patch16_224", EIGHTHS, 343, 150, 5e-5),
    "swin_tiny_imagenet.yaml": ("swin_tiny_patch4_window7_224", SIXTHS, 216, 300, 1.5e-4),
    "swin_base_imagenet.yaml": ("swin_base_patch4_window7_224", EIGHTHS, 343, 150, 5e-5),
}


@pytest.mark.parametrize("name", sorted(p.name for p in EXPERIMENTS.glob("*.yaml")))
def test_experiment_loads_and_builds_its_space(name):
    cfg = load_config(EXPERIMENTS / name)
    space = full_space(cfg)  # the timm model exists with these kwargs (built on the meta device)
    assert space.num_configs > 1 and cfg.run.name


@pytest.mark.parametrize("name", sorted(IMAGENET))
def test_imagenet_recipes_follow_the_paper(name):
    model, ratios, triples, epochs, lr = IMAGENET[name]
    cfg = load_config(EXPERIMENTS / name)
    assert cfg.model.name == model and cfg.model.pretrained is True
    assert cfg.model.ratios == pytest.approx(ratios)
    assert {len(b.candidates) for b in full_space(cfg).blocks} == {triples}
    assert cfg.train.epochs == epochs and cfg.train.lr == lr and cfg.train.weight_decay == 0.01
    assert cfg.train.warmup_epochs == 5 and cfg.train.clip_grad == 5 and cfg.train.sampler == "lowrank"
    assert cfg.train.batch_size * cfg.scaling.num_workers == 1024 and cfg.scaling.use_gpu
    assert cfg.filter.epochs == 20 and cfg.filter.subset == 0.35 and cfg.filter.keep_fraction == 0.3
    assert cfg.data.name == "imagefolder" and cfg.data.augment
    assert cfg.search.population == 50 and cfg.search.trials == 1000  # 20 generations of 50

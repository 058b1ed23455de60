"""Every experiment file in experiments/ loads, names a real timm model, and follows its recipe."""

from pathlib import Path

import pytest

from flora_ray.config import load_config
from flora_ray.core.space import EIGHTHS, SIXTHS
from flora_ray.stages.inputs import full_space

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
# model, ratios, triples per block, supernet epochs and peak lr, the filter's local-supernet peak lr
IMAGENET = {
    "deit_small_imagenet.yaml": ("deit_small_patch16_224", SIXTHS, 216, 300, 1.5e-4, 1.5e-4),
    "deit_base_imagenet.yaml": ("deit_base_patch16_224", EIGHTHS, 343, 150, 5e-5, 1.5e-5),
    "swin_tiny_imagenet.yaml": ("swin_tiny_patch4_window7_224", SIXTHS, 216, 300, 1.5e-4, 1.5e-4),
    "swin_base_imagenet.yaml": ("swin_base_patch4_window7_224", EIGHTHS, 343, 150, 5e-5, 1.5e-5),
}


def _load(name, root, *overrides):
    """An experiment, with ImageNet's class folders standing in for the cluster's data."""
    cfg = load_config(EXPERIMENTS / name, list(overrides))
    return load_config(EXPERIMENTS / name, [f"data.root={root}", *overrides]) if cfg.data.name == "imagefolder" else cfg


@pytest.mark.parametrize("name", sorted(p.name for p in EXPERIMENTS.glob("*.yaml")))
def test_experiment_loads_and_builds_its_space(name, imagenet_skeleton):
    cfg = _load(name, imagenet_skeleton)
    space = full_space(cfg)  # the timm model exists with these kwargs (built on the meta device)
    assert space.num_configs > 1 and cfg.run.name


@pytest.mark.parametrize("name", sorted(IMAGENET))
def test_imagenet_recipes_follow_the_paper(name, imagenet_skeleton):
    model, ratios, triples, epochs, lr, _ = IMAGENET[name]
    cfg = _load(name, imagenet_skeleton)
    assert cfg.model.name == model and cfg.model.pretrained is True
    assert cfg.model.ratios == pytest.approx(ratios)
    assert {len(b.candidates) for b in full_space(cfg).blocks} == {triples}
    assert cfg.train.epochs == epochs and cfg.train.lr == lr and cfg.train.weight_decay == 0.01
    assert cfg.train.warmup_epochs == 5 and cfg.train.clip_grad == 5 and cfg.train.sampler == "lowrank"
    assert cfg.train.batch_size * cfg.scaling.num_workers == 1024 and cfg.scaling.use_gpu
    assert cfg.filter.epochs == 20 and cfg.filter.subset == 0.35 and cfg.filter.keep_fraction == 0.3
    assert cfg.data.name == "imagefolder" and cfg.data.augment
    assert cfg.search.population == 50 and cfg.search.trials == 1000  # 20 generations of 50


@pytest.mark.parametrize("name", sorted(IMAGENET))
def test_imagenet_filter_follows_the_reference_local_supernet_recipe(name, imagenet_skeleton):
    """20 epochs on 35%, effective batch 1024 on the block's one GPU, the reference's peak lr, 3 warm-up epochs,
    cosine floor 1e-6, wd 0.01, drop-path 0, every triple scored on the 25,000 held-out images."""
    from flora_ray.core.models import create_model
    from flora_ray.stages.inputs import resolve_model_spec

    cfg = _load(name, imagenet_skeleton)
    f = cfg.filter
    assert f.mode == "local_supernet" and f.epochs == 20 and f.subset == 0.35
    assert f.batch_size * f.accumulate == 1024 and cfg.scaling.use_gpu  # one block = one task = one GPU
    assert f.lr == IMAGENET[name][5] and f.warmup_epochs == 3 and f.min_lr == 1e-6 and f.weight_decay == 0.01
    assert f.eval_images == cfg.data.search_per_class * 1000 == 25000
    spec = resolve_model_spec(cfg)
    model = create_model(spec.name, device="meta", **spec.kwargs)
    drop_paths = [m for m in model.modules() if type(m).__name__ == "DropPath"]
    assert not drop_paths  # timm builds these models without drop-path unless drop_path_rate is given


@pytest.mark.parametrize("name", sorted(IMAGENET))
def test_imagenet_recipes_pass_preflight_on_the_meta_device(name, imagenet_skeleton, tmp_path):
    """1000 classes from the class folders, the pretrained head fits them (no pretrain stage), the model builds on
    the meta device, and on a cluster the run must live where every node sees it."""
    from flora_ray.core.models import create_model
    from flora_ray.stages.inputs import resolve_model_spec, teacher_is_pretrained
    from flora_ray.stages.preflight import check_run_storage, preflight
    from flora_ray.storage.run_store import RunStore

    cfg = _load(name, imagenet_skeleton)
    spec = resolve_model_spec(cfg)
    assert spec.kwargs["num_classes"] == 1000 and teacher_is_pretrained(cfg)
    model = create_model(spec.name, device="meta", **spec.kwargs)
    assert model.get_classifier().out_features == 1000 and model.patch_embed.img_size == (224, 224)
    for stage in ("pretrain", "filter"):
        preflight(cfg, stage, RunStore.for_config(cfg))
    with pytest.raises(ValueError, match="with --address every node reads and writes the run"):
        check_run_storage(cfg, cluster=True)
    shared = _load(name, imagenet_skeleton, f"run.storage={tmp_path / 'nfs'}")
    check_run_storage(shared, cluster=True)
    assert RunStore.for_config(shared).root == str(tmp_path / "nfs" / cfg.run.name)

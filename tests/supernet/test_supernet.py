"""Surgery on live timm models: full-rank equivalence, target selection, checkpoints."""

import random
import re

import pytest
import torch
from helpers import TINY_MODELS, input_for, random_config
from torch import nn

import flora_ray as fr
from flora_ray.core.lowrank import ElasticLowRankLinear
from flora_ray.core.supernet import load_supernet, save_supernet


def _assert_close_rel(actual, expected, rel=1e-5):
    scale = expected.abs().max().item()
    assert (actual - expected).abs().max().item() <= rel * scale, (actual - expected).abs().max().item()


def test_full_rank_supernet_equals_dense_timm_model(tiny_model):
    name, kwargs = tiny_model
    dense = fr.create_model(name, **kwargs).eval()
    x = input_for(dense)
    with torch.no_grad():
        expected = dense(x)
        supernet = fr.build_supernet(dense, model_name=name, model_kwargs=kwargs)
        assert supernet.model is dense  # swapped in place
        _assert_close_rel(supernet(x), expected)


def test_full_rank_equivalence_also_without_merging_and_with_sqrt_split():
    name, kwargs = TINY_MODELS["vit"]
    dense = fr.create_model(name, **kwargs).eval()
    x = input_for(dense)
    with torch.no_grad():
        expected = dense(x)
    for placement in ("faithful", "sqrt"):
        copy = fr.create_model(name, **kwargs).eval()
        copy.load_state_dict(dense.state_dict())
        supernet = fr.build_supernet(copy, sv_placement=placement, merge_above_break_even=False)
        with torch.no_grad():
            _assert_close_rel(supernet(x), expected)


def test_default_targets_are_qkv_fc1_fc2_of_every_block():
    name, kwargs = TINY_MODELS["vit"]
    supernet = fr.build_supernet(name, model_kwargs=kwargs)
    depth = len(supernet.model.blocks)
    expected = [f"blocks.{i}.{layer}" for i in range(depth) for layer in ("attn.qkv", "mlp.fc1", "mlp.fc2")]
    assert list(supernet.space.fqns) == expected
    assert [b.name for b in supernet.space.blocks] == [f"blocks.{i}" for i in range(depth)]
    assert isinstance(supernet.model.blocks[0].attn.proj, nn.Linear)
    assert isinstance(supernet.model.head, nn.Linear)
    elastic = [fqn for fqn, m in supernet.model.named_modules() if isinstance(m, ElasticLowRankLinear)]
    assert elastic == expected


def test_swin_targets_and_include_proj():
    name, kwargs = TINY_MODELS["swin"]
    supernet = fr.build_supernet(name, model_kwargs=kwargs, include_proj=True)
    assert supernet.space.blocks[0].name == "layers.0.blocks.0"
    assert supernet.space.blocks[0].fqns == tuple(
        f"layers.0.blocks.0.{n}" for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    )
    assert len(supernet.space.blocks) == 4
    # Patch merging and the head stay dense.
    assert isinstance(supernet.model.layers[1].downsample.reduction, nn.Linear)
    assert isinstance(supernet.model.head.fc, nn.Linear)


def test_generic_regex_targets_with_block_group():
    name, kwargs = TINY_MODELS["vit"]
    supernet = fr.build_supernet(name, model_kwargs=kwargs, targets=r"^(?P<block>blocks\.[0-2])\.mlp\.fc\d$")
    assert supernet.space.fqns == tuple(f"blocks.{i}.mlp.fc{j}" for i in range(3) for j in (1, 2))
    assert [b.name for b in supernet.space.blocks] == ["blocks.0", "blocks.1", "blocks.2"]


def test_unsupported_model_and_empty_pattern_are_clear_errors():
    resnet = fr.create_model("test_resnet")
    with pytest.raises(ValueError, match="has no flora-ray preset .* targets=REGEX"):
        fr.build_supernet(resnet)
    name, kwargs = TINY_MODELS["vit"]
    with pytest.raises(ValueError, match=re.escape("target pattern 'nothing_here' matches no Linear layer")):
        fr.build_supernet(name, model_kwargs=kwargs, targets="nothing_here")
    with pytest.raises(ValueError, match="is a LayerNorm, not an nn.Linear"):
        fr.build_supernet(name, model_kwargs=kwargs, targets=r"blocks\.0\.norm1$")
    with pytest.raises(ValueError, match="invalid target regex"):
        fr.build_supernet(name, model_kwargs=kwargs, targets="(")
    with pytest.raises(ValueError, match="unknown timm model 'deit_smal_patch16_224': did you mean deit_small"):
        fr.build_supernet("deit_smal_patch16_224")
    with pytest.raises(ValueError, match="invalid kwargs for timm model"):
        fr.build_supernet("test_vit", model_kwargs={"no_such_kwarg": 1})


def test_set_ranks_validates_and_activates():
    name, kwargs = TINY_MODELS["vit"]
    supernet = fr.build_supernet(name, model_kwargs=kwargs)
    config = random_config(supernet.space, random.Random(1))
    supernet.set_ranks(config)
    assert supernet.active_ranks() == config
    bad = dict(config)
    bad["blocks.0.attn.qkv"] = 7
    with pytest.raises(ValueError, match=r"rank 7 for layer 'blocks.0.attn.qkv' is not one of its choices"):
        supernet.set_ranks(bad)
    assert supernet.active_ranks() == config  # nothing half-applied


def test_supernet_checkpoint_round_trip(tmp_path, tiny_model):
    name, kwargs = tiny_model
    supernet = fr.build_supernet(name, model_kwargs=kwargs).eval()
    config = random_config(supernet.space, random.Random(2))
    supernet.set_ranks(config)
    x = input_for(supernet.model)
    path = tmp_path / "supernet.safetensors"
    save_supernet(supernet, path)
    loaded = load_supernet(path).eval()
    assert loaded.space == supernet.space and loaded.spec == supernet.spec
    loaded.set_ranks(config)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), supernet(x), rtol=0, atol=0)


def test_supernet_checkpoint_errors(tmp_path):
    name, kwargs = TINY_MODELS["vit"]
    module_only = fr.build_supernet(fr.create_model(name, **kwargs))
    with pytest.raises(ValueError, match="pass model_name="):
        save_supernet(module_only, tmp_path / "x.safetensors")
    supernet = fr.build_supernet(name, model_kwargs=kwargs)
    good = tmp_path / "good.safetensors"
    save_supernet(supernet, good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(ValueError, match="truncated|corrupt"):
        load_supernet(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="corrupt or not safetensors"):
        load_supernet(garbage)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_supernet(tmp_path / "missing.safetensors")
    other = fr.build_supernet("deit_tiny_patch16_224", model_kwargs={"img_size": 32, "depth": 1})
    with pytest.raises(ValueError, match="was made for another model"):
        load_supernet(good, space=other.space)

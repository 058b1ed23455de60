"""RankSpace: presets, candidate triples, uniform/extreme configs, validation, JSON and reference YAML."""

import json

import pytest
from helpers import DEIT_B_SVD_CONFIG, DEIT_S_SVD_CONFIG, TINY_MODELS, write_reference_yaml

import flora_ray as fr
from flora_ray.core.space import EIGHTHS, SIXTHS, RankSpace, load_rank_file, load_reference_yaml, rank_for_ratio
from flora_ray.core.supernet import build_space


def _space(name, kwargs=None):
    return build_space(fr.create_model(name, device="meta", **(kwargs or {})), model_name=name)


def test_deit_presets_match_the_design_doc():
    base = _space("deit_base_patch16_224")
    assert base.ratios == EIGHTHS and len(EIGHTHS) == 7
    assert all(len(b.candidates) == 343 for b in base.blocks) and len(base.blocks) == 12
    assert base.layer("blocks.0.attn.qkv").rank_choices == (96, 192, 288, 384, 480, 576, 768)
    assert base.layer("blocks.0.mlp.fc2").rank_choices == (96, 192, 288, 384, 480, 576, 768)
    assert base.num_configs == 343**12
    small = _space("deit_small_patch16_224")
    assert small.ratios == SIXTHS
    assert all(len(b.candidates) == 216 for b in small.blocks)
    assert small.layer("blocks.5.mlp.fc1").rank_choices == (64, 128, 192, 256, 320, 384)
    assert _space("swin_tiny_patch4_window7_224").ratios == SIXTHS  # default for other models


def test_rank_for_ratio_rounds_half_up_and_clamps():
    assert rank_for_ratio(1 / 6, 384) == 64
    assert rank_for_ratio(0.5, 5) == 3
    assert rank_for_ratio(0.01, 10) == 1
    for bad in (0, -0.5, 1.5, "0.5", True):
        with pytest.raises(ValueError, match="out of range: ratios must be in"):
            rank_for_ratio(bad, 10)


def test_uniform_largest_smallest():
    space = _space(*TINY_MODELS["vit"])
    assert space.largest() == {layer.fqn: layer.max_rank for layer in space.layers}
    assert space.smallest() == {layer.fqn: min(layer.rank_choices) for layer in space.layers}
    assert space.uniform(1.0) == space.largest()
    assert space.uniform(0.5) == {layer.fqn: rank_for_ratio(0.5, layer.max_rank) for layer in space.layers}
    assert list(space.uniform_configs()) == list(SIXTHS)


def test_validation_errors_name_the_problem():
    space = _space(*TINY_MODELS["vit"])
    config = space.largest()
    with pytest.raises(ValueError, match=r"unknown layer 'blocks.0.attn.qvk'; did you mean 'blocks.0.attn.qkv'"):
        space.validate({**config, "blocks.0.attn.qvk": 64})
    with pytest.raises(ValueError, match=r"rank 63 for layer 'blocks.1.mlp.fc1' is not one of its choices \[11, "):
        space.validate({**config, "blocks.1.mlp.fc1": 63})
    with pytest.raises(ValueError, match=r"no rank for layer 'blocks.5.mlp.fc2' \(1 missing\)"):
        space.validate({k: v for k, v in config.items() if k != "blocks.5.mlp.fc2"})
    with pytest.raises(ValueError, match="is a mapping"):
        space.validate([64, 64])
    with pytest.raises(ValueError, match="rank '64' for layer"):
        space.validate({**config, "blocks.0.attn.qkv": "64"})


def test_restrict_keeps_only_given_triples():
    space = _space(*TINY_MODELS["vit"])
    block = space.blocks[0]
    kept = [block.candidates[0], block.candidates[-1]]
    filtered = space.restrict({block.name: kept})
    assert filtered.blocks[0].candidates == tuple(kept)
    assert filtered.blocks[1] == space.blocks[1]
    config = filtered.largest()
    config.update(dict(zip(block.fqns, block.candidates[1], strict=True)))
    with pytest.raises(ValueError, match="are not among its kept candidates"):
        filtered.validate(config)
    assert not filtered.contains(config) and space.contains(config)
    with pytest.raises(ValueError, match="is not in block"):
        space.restrict({block.name: [(1, 2, 3)]})
    with pytest.raises(ValueError, match="unknown block 'blocks.99'"):
        space.restrict({"blocks.99": kept})


def test_json_round_trip(tmp_path):
    space = _space(*TINY_MODELS["swin"]).restrict({"layers.0.blocks.0": [(5, 21, 16), (32, 32, 32)]})
    path = tmp_path / "space.json"
    space.save(path)
    assert RankSpace.load(path) == space
    data = json.loads(path.read_text())
    assert data["format"] == "flora-ray/space" and data["version"] == 1
    assert data["blocks"][0]["candidates"] == [[5, 21, 16], [32, 32, 32]]


def test_corrupt_or_foreign_space_files(tmp_path):
    space = _space(*TINY_MODELS["vit"])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        RankSpace.load(bad)
    bad.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="is not a flora-ray space file"):
        RankSpace.load(bad)
    data = space.to_dict()
    del data["layers"][0]["rank_choices"]
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="is malformed"):
        RankSpace.load(bad)
    other = _space("deit_tiny_patch16_224", {"img_size": 32, "depth": 2})
    with pytest.raises(ValueError, match="was made for another model"):
        space.check_compatible(other)


def test_reference_yaml_import_maps_triples_to_fqns(tmp_path):
    space = _space("deit_base_patch16_224")
    config = load_reference_yaml(write_reference_yaml(tmp_path, DEIT_B_SVD_CONFIG), space)
    assert config["blocks.0.attn.qkv"] == 96 and config["blocks.0.mlp.fc1"] == 192 and config["blocks.0.mlp.fc2"] == 288
    assert config["blocks.9.mlp.fc1"] == 480
    small = _space("deit_small_patch16_224")
    config = load_reference_yaml(write_reference_yaml(tmp_path, DEIT_S_SVD_CONFIG, dim=384), small)
    assert config["blocks.8.attn.qkv"] == 384 and config["blocks.7.mlp.fc1"] == 320


def test_reference_yaml_errors(tmp_path):
    space = _space("deit_base_patch16_224")
    with pytest.raises(ValueError, match="is for a 11-block model; this one has 12"):
        load_reference_yaml(write_reference_yaml(tmp_path, DEIT_B_SVD_CONFIG[:11], depth=11), space)
    with pytest.raises(ValueError, match="is for embed dim 384"):
        load_reference_yaml(write_reference_yaml(tmp_path, DEIT_S_SVD_CONFIG, dim=384), space)
    rows = [list(r) for r in DEIT_B_SVD_CONFIG]
    rows[3][1] = 0.875  # 7/8 is not among DeiT-B's ratios
    with pytest.raises(ValueError, match=r"rank 672 for layer 'blocks.3.mlp.fc1' is not one of its choices"):
        load_reference_yaml(write_reference_yaml(tmp_path, rows), space)
    broken = tmp_path / "broken.yml"
    broken.write_text("MODEL: [unclosed")
    with pytest.raises(ValueError, match="is not valid YAML"):
        load_reference_yaml(broken, space)
    broken.write_text("MODEL: {}")
    with pytest.raises(ValueError, match="has no MODEL.DEIT.SVD_CONFIG"):
        load_reference_yaml(broken, space)


def test_rank_json_files(tmp_path):
    space = _space(*TINY_MODELS["vit"])
    path = tmp_path / "ranks.json"
    config = space.uniform(0.5)
    path.write_text(json.dumps({"ranks": config}))
    assert load_rank_file(path, space) == config
    path.write_text(json.dumps(config))
    assert load_rank_file(path, space) == config
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="must hold a JSON object"):
        load_rank_file(path, space)

"""Subnet extraction and export: equality with the supernet, a save/load round trip in a fresh process."""

import json
import random
import subprocess
import sys

import pytest
import torch
from helpers import TINY_MODELS, input_for, random_config
from safetensors.torch import save_file
from torch import nn

import flora_ray as fr
from flora_ray.core.lowrank import ElasticLowRankLinear
from flora_ray.core.subnet import SPEC_FILE, WEIGHTS_FILE


def test_extracted_subnet_equals_supernet_and_leaves_it_intact(tiny_model):
    name, kwargs = tiny_model
    supernet = fr.build_supernet(name, model_kwargs=kwargs).eval()
    rng = random.Random(3)
    x = input_for(supernet.model)
    for _ in range(3):
        config = random_config(supernet.space, rng)
        supernet.set_ranks(config)
        subnet = fr.extract_subnet(supernet, config).eval()
        with torch.no_grad():
            torch.testing.assert_close(subnet(x), supernet(x), rtol=1e-6, atol=1e-6)
        assert not any(isinstance(m, ElasticLowRankLinear) for m in subnet.modules())
        assert type(subnet) is type(supernet.model)
    assert sum(isinstance(m, ElasticLowRankLinear) for m in supernet.model.modules()) == len(supernet.space.fqns)
    # The subnet owns its weights: training it does not touch the supernet.
    before = supernet.model.blocks[0].norm1.weight.clone() if hasattr(supernet.model, "blocks") else None
    for p in subnet.parameters():
        p.data.add_(1.0)
    if before is not None:
        torch.testing.assert_close(supernet.model.blocks[0].norm1.weight, before)


def test_extract_uses_the_cheaper_form_per_layer():
    name, kwargs = TINY_MODELS["vit"]
    supernet = fr.build_supernet(name, model_kwargs=kwargs)
    config = supernet.space.uniform(1 / 6)
    config["blocks.0.attn.qkv"] = 64  # full rank: merged dense layer
    subnet = fr.extract_subnet(supernet, config)
    assert isinstance(subnet.blocks[0].attn.qkv, nn.Linear)
    assert isinstance(subnet.blocks[0].mlp.fc1, nn.Sequential)
    assert subnet.blocks[0].mlp.fc1[0].weight.shape == (11, 64)


def test_extract_outside_a_filtered_space_only_when_asked():
    name, kwargs = TINY_MODELS["vit"]
    supernet = fr.build_supernet(name, model_kwargs=kwargs).eval()
    full = supernet.space
    # Keep only each block's full-rank tuple: every uniform configuration but full rank falls outside.
    supernet.space = full.restrict({b.name: [b.candidates[-1]] for b in full.blocks})
    cheapest = full.uniform(min(full.uniform_all()))
    with pytest.raises(ValueError, match="not among its kept candidates"):
        fr.extract_subnet(supernet, cheapest)
    subnet = fr.extract_subnet(supernet, cheapest, within_candidates=False).eval()
    supernet.set_ranks(cheapest, within_candidates=False)
    x = input_for(supernet.model)
    with torch.no_grad():
        torch.testing.assert_close(subnet(x), supernet(x), rtol=1e-6, atol=1e-6)
    partial = dict(list(cheapest.items())[:-1])
    with pytest.raises(ValueError, match="no rank for layer"):
        fr.extract_subnet(supernet, partial, within_candidates=False)
    with pytest.raises(ValueError, match="not one of its choices"):
        fr.extract_subnet(supernet, {**cheapest, next(iter(cheapest)): 5}, within_candidates=False)


LOAD_IN_FRESH_PROCESS = """
import sys, torch
from safetensors.torch import load_file, save_file
from flora_ray.core.subnet import load_subnet
model = load_subnet(sys.argv[1])
assert not any(type(m).__module__.startswith("flora_ray") for m in model.modules()), "flora_ray module in export"
x = load_file(sys.argv[2])["x"]
with torch.no_grad():
    save_file({"y": model(x)}, sys.argv[3])
print("supernet built:", "flora_ray.core.supernet" in sys.modules and "build_supernet" in dir(sys.modules["flora_ray.core.supernet"]))
"""


@pytest.mark.parametrize("family", ["vit", "swin_padded"])
def test_save_load_round_trip_in_a_new_process(tmp_path, family):
    from safetensors.torch import load_file

    name, kwargs = TINY_MODELS[family]
    supernet = fr.build_supernet(name, model_kwargs=kwargs).eval()
    config = random_config(supernet.space, random.Random(4))
    out = fr.save_subnet(supernet, config, tmp_path / "subnet")
    spec = json.loads((out / SPEC_FILE).read_text())
    assert spec["ranks"] == config and spec["model"] == {"name": name, "kwargs": json.loads(json.dumps(kwargs))}
    assert spec["macs"] == supernet.cost.macs(config) and spec["params"] == supernet.cost.params(config)
    x = input_for(supernet.model)
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    subprocess.run(
        [
            sys.executable,
            "-c",
            LOAD_IN_FRESH_PROCESS,
            str(out),
            str(tmp_path / "x.safetensors"),
            str(tmp_path / "y.safetensors"),
        ],
        check=True,
        env={**__import__("os").environ, "TIMM_FUSED_ATTN": "0"},
    )
    supernet.set_ranks(config)
    with torch.no_grad():
        expected = supernet(x)
    torch.testing.assert_close(load_file(str(tmp_path / "y.safetensors"))["y"], expected, rtol=1e-6, atol=1e-6)
    # In this process too, the loaded model equals the extracted one exactly.
    loaded = fr.load_subnet(out)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), fr.extract_subnet(supernet, config).eval()(x), rtol=0, atol=0)


def test_load_subnet_errors(tmp_path):
    name, kwargs = TINY_MODELS["vit"]
    supernet = fr.build_supernet(name, model_kwargs=kwargs)
    out = fr.save_subnet(supernet, supernet.space.uniform(0.5), tmp_path / "subnet")
    weights = out / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum differs"):
        fr.load_subnet(out)
    (out / SPEC_FILE).write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        fr.load_subnet(out)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fr.load_subnet(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="rank 5 for layer 'blocks.0.attn.qkv' is not one of its choices"):
        fr.extract_subnet(supernet, {**supernet.space.largest(), "blocks.0.attn.qkv": 5})


def test_overwriting_an_export_is_atomic(tmp_path):
    name, kwargs = TINY_MODELS["vit"]
    supernet = fr.build_supernet(name, model_kwargs=kwargs)
    out = tmp_path / "subnet"
    fr.save_subnet(supernet, supernet.space.uniform(0.5), out)
    fr.save_subnet(supernet, supernet.space.uniform(1 / 6), out)
    assert sorted(p.name for p in out.iterdir()) == [WEIGHTS_FILE, SPEC_FILE]  # no temp files left behind
    assert json.loads((out / SPEC_FILE).read_text())["ranks"] == supernet.space.uniform(1 / 6)
    fr.load_subnet(out)


def test_a_format_whose_exporter_is_missing_names_the_extra(monkeypatch):
    from flora_ray.stages import formats

    assert formats.check_formats(["onnx", "pt2", "onnx"]) == ("safetensors", "onnx", "pt2")
    real = formats.importlib.util.find_spec
    monkeypatch.setattr(formats.importlib.util, "find_spec", lambda n: None if n == "onnxruntime" else real(n))
    with pytest.raises(ValueError, match=r"--format onnx needs onnxruntime: pip install 'flora-ray\[export\]'"):
        formats.check_formats(["onnx"])
    assert formats.check_formats(["pt2"]) == ("safetensors", "pt2")

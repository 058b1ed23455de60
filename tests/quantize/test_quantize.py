"""int8 quantization of an exported subnet: the stored file rebuilds exactly the model quantized at export, it is
smaller than the fp32 weights, and a file that does not belong to the subnet is refused."""

import random

import pytest
import torch
from helpers import input_for, random_config

import flora_ray as fr
from flora_ray.core.quantize import load_int8, quantize_int8, save_int8
from flora_ray.core.subnet import INT8_WEIGHTS_FILE, WEIGHTS_FILE, save_subnet_int8, subnet_skeleton
from flora_ray.storage.files import read_json


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """An exported test_vit subnet (low-rank and merged layers) and its fp32 model."""
    torch.manual_seed(0)
    supernet = fr.build_supernet("test_vit", model_kwargs={"img_size": 32, "num_classes": 10}).eval()
    config = random_config(supernet.space, random.Random(3))
    directory = tmp_path_factory.mktemp("export")
    fr.save_subnet(supernet, config, directory)
    return directory, fr.load_subnet(directory)


def test_int8_file_loads_the_model_quantized_at_export(export):
    directory, fp32 = export
    quantized = save_int8(fp32, directory / INT8_WEIGHTS_FILE)
    loaded = fr.load_subnet(directory, int8=True)
    linear = [fqn for fqn, m in fp32.named_modules() if isinstance(m, torch.nn.Linear)]
    first = quantized.get_submodule(linear[0])
    assert first._get_name() == "DynamicQuantizedLinear"
    qtype = type(first)
    assert all(isinstance(loaded.get_submodule(fqn), qtype) for fqn in linear)
    x = input_for(fp32, batch=4)
    with torch.no_grad():
        assert torch.equal(loaded(x), quantized(x))  # the same integers and scales: bit-identical outputs
        assert 0 < (loaded(x) - fp32(x)).abs().max() < 0.1 * fp32(x).abs().max()
    assert (directory / INT8_WEIGHTS_FILE).stat().st_size < 0.5 * (directory / WEIGHTS_FILE).stat().st_size


def test_quantize_leaves_the_fp32_model_alone(export):
    _, fp32 = export
    before = {fqn: type(m) for fqn, m in fp32.named_modules()}
    quantized = quantize_int8(fp32)
    assert {fqn: type(m) for fqn, m in fp32.named_modules()} == before
    assert type(quantized.head) is not torch.nn.Linear


def test_a_foreign_or_missing_file_is_refused(export, tmp_path):
    directory, _ = export
    spec = read_json(directory / "subnet.json")
    with pytest.raises(ValueError, match="is not a flora-ray int8 subnet"):
        load_int8(subnet_skeleton(spec), directory / WEIGHTS_FILE)
    dense = fr.create_model("test_vit", img_size=32, num_classes=10)
    save_int8(dense, tmp_path / "dense.safetensors")
    with pytest.raises(ValueError, match="does not match the subnet: it has no Linear layer 'blocks.0.attn.qkv'"):
        load_int8(subnet_skeleton(spec), tmp_path / "dense.safetensors")  # the dense model's qkv is not factorised
    larger = fr.build_supernet("test_vit", model_kwargs={"img_size": 64, "num_classes": 10})
    save_int8(fr.extract_subnet(larger, spec["ranks"]), tmp_path / "larger.safetensors")
    with pytest.raises(ValueError, match="does not match the model: 1 wrong shape .e.g. pos_embed"):
        load_int8(subnet_skeleton(spec), tmp_path / "larger.safetensors")  # same layers, another image size
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "subnet.json").write_bytes((directory / "subnet.json").read_bytes())
    with pytest.raises(FileNotFoundError, match="export it with --format int8"):
        fr.load_subnet(empty, int8=True)
    with pytest.raises(ValueError, match="CPU only"):
        fr.load_subnet(directory, device="meta", int8=True)


def test_the_export_records_the_int8_files_checksum(export, tmp_path):
    """``save_subnet_int8`` (what ``--format int8`` writes) records the file's SHA-256; an int8 file of the same
    shapes but other weights, which the layer checks cannot tell apart, is refused."""
    directory, fp32 = export
    copy = tmp_path / "export"
    copy.mkdir()
    for name in ("subnet.json", WEIGHTS_FILE):
        (copy / name).write_bytes((directory / name).read_bytes())
    save_subnet_int8(fp32, copy)
    assert read_json(copy / "subnet.json")["int8_weights_sha256"]
    x = input_for(fp32, batch=2)
    with torch.no_grad():
        assert torch.equal(fr.load_subnet(copy, int8=True)(x), quantize_int8(fp32)(x))
        other = fr.load_subnet(copy)
        for p in other.parameters():
            p.add_(0.01)
    save_int8(other, copy / INT8_WEIGHTS_FILE)  # the same shapes, other weights, spec not updated
    with pytest.raises(ValueError, match="checksum differs"):
        fr.load_subnet(copy, int8=True)
    assert fr.load_subnet(copy) is not None  # the fp32 weights still load

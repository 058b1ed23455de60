"""Real dense-weight loading paths of ``flora_ray.models.create_model`` and ``build_supernet``, on timm's tiny
``test_vit`` (embed 64, 6 blocks, 160 px, 1000 classes) with weight files written by the tests.

Covered: timm's file overlay (.safetensors and .pth, num_classes / img_size adaptation), SVD surgery on loaded
weights, the Hugging Face hub cache offline (in a subprocess: huggingface_hub reads its env at import), flora-ray
dense checkpoints, error reporting for wrong / corrupt / missing files, and that pickled objects never load.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from flora_ray import build_supernet, create_model
from flora_ray.core.models import ModelSpec, dense_checkpoint_metadata
from flora_ray.storage.files import write_checkpoint

NAME = "test_vit"
HUB_REPO_DIR = "models--timm--test_vit.r160_in1k"


def _distinct_state_dict(seed: int, **kwargs) -> dict[str, torch.Tensor]:
    """A test_vit state dict that no fresh init reproduces: timm's init plus seeded noise on every tensor."""
    torch.manual_seed(seed)
    model = timm.create_model(NAME, **kwargs)
    gen = torch.Generator().manual_seed(seed + 1)
    return {k: v.detach() + 0.05 * torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()}


def _assert_state_equal(model: torch.nn.Module, expected: dict[str, torch.Tensor], skip: tuple[str, ...] = ()) -> None:
    got = model.state_dict()
    keys = set(expected) - set(skip)
    assert keys <= set(got)
    for key in sorted(keys):
        assert torch.equal(got[key], expected[key]), key


def _images(size: int = 160, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    return _distinct_state_dict(0)


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory, weights) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("weights")
    files = {"safetensors": root / "vit.safetensors", "pth": root / "vit.pth"}
    save_file(weights, str(files["safetensors"]))
    torch.save(weights, files["pth"])
    return files


# --- timm file overlay ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["safetensors", "pth"])
def test_overlay_file_loads_exactly(weight_files, weights, kind):
    model = create_model(NAME, pretrained=weight_files[kind])
    assert set(model.state_dict()) == set(weights)
    _assert_state_equal(model, weights)


@pytest.mark.parametrize("kind", ["safetensors", "pth"])
def test_overlay_adapts_num_classes(weight_files, weights, kind):
    model = create_model(NAME, pretrained=weight_files[kind], num_classes=10)
    assert model.head.weight.shape == (10, 64)
    assert model.head.bias.shape == (10,)
    _assert_state_equal(model, weights, skip=("head.weight", "head.bias"))
    assert model(_images()).shape == (2, 10)


@pytest.mark.parametrize("kind", ["safetensors", "pth"])
def test_overlay_resamples_pos_embed(weight_files, weights, kind):
    model = create_model(NAME, pretrained=weight_files[kind], img_size=96)
    # 160 px / 16 = 10x10 patches + cls token in the file; 96 px / 16 = 6x6 + cls in the model
    assert weights["pos_embed"].shape == (1, 101, 64)
    assert model.pos_embed.shape == (1, 37, 64)
    # the class token's embedding is carried over and the grid is resampled from the file's, not re-initialised:
    # it matches a plain smooth downsampling of the file's 10x10 grid to 6x6 (up to the interpolation kernel)
    assert torch.equal(model.pos_embed[:, 0], weights["pos_embed"][:, 0])
    grid = weights["pos_embed"][:, 1:].reshape(1, 10, 10, 64).permute(0, 3, 1, 2)
    smooth = F.interpolate(grid, size=(6, 6), mode="bilinear", antialias=True, align_corners=False)
    got = model.pos_embed[:, 1:].detach().reshape(1, 6, 6, 64).permute(0, 3, 1, 2)
    assert F.cosine_similarity(got.flatten(), smooth.flatten(), dim=0) > 0.95
    _assert_state_equal(model, weights, skip=("pos_embed",))
    assert model(_images(96)).shape == (2, 1000)


# --- supernet surgery on loaded weights -------------------------------------------------------------------------


def test_supernet_at_full_rank_reproduces_loaded_dense_model(weight_files, weights):
    dense = create_model(NAME, pretrained=weight_files["safetensors"]).eval()
    supernet = build_supernet(NAME, pretrained=weight_files["safetensors"]).eval()
    supernet.set_max_ranks()
    layers = supernet.elastic_layers()
    assert len(layers) == 18  # qkv, fc1, fc2 in 6 blocks
    for fqn, layer in layers.items():
        rebuilt = layer.u.detach() @ layer.vt.detach()
        assert torch.allclose(rebuilt, weights[f"{fqn}.weight"], atol=1e-5), fqn
    x = _images()
    with torch.no_grad():
        want = dense(x)
        got = supernet(x)
        scale = want.abs().max()
        assert (got - want).abs().max() <= 1e-5 * scale + 1e-6
        # the file's weights, not a fresh init, went through the SVD
        random_init = build_supernet(NAME).eval()
        assert (random_init(x) - want).abs().max() > 1e-2 * scale
        # and the rank really acts: truncating every layer changes the function
        for layer in layers.values():
            layer.set_rank(8)
        assert (supernet(x) - want).abs().max() > 1e-3 * scale


# --- Hugging Face hub cache, offline ---------------------------------------------------------------------------

_HUB_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from safetensors.torch import load_file
    import flora_ray

    expected = load_file(sys.argv[1]) if len(sys.argv) > 1 else None
    try:
        model = flora_ray.create_model("test_vit", pretrained=True)
    except ValueError as exc:
        print(json.dumps({"error": "ValueError", "message": str(exc)}))
        sys.exit(0)
    state = model.state_dict()
    print(json.dumps({
        "same_keys": set(state) == set(expected),
        "equal": sorted(k for k in expected if torch.equal(state[k], expected[k])) == sorted(expected),
    }))
    """
)


def _run_offline(tmp_path: Path, *args: str) -> dict:
    env = dict(os.environ)
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "HF_ENDPOINT", "TIMM_USE_OLD_CACHE"):
        env.pop(var, None)
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"), HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run(
        [sys.executable, "-c", _HUB_SCRIPT, *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_hub_cache_offline(tmp_path):
    # timm resolves test_vit to hf_hub_id timm/test_vit.r160_in1k and asks the hub for pytorch_model.bin, trying
    # its safetensors alternative model.safetensors first (timm.models._hub.load_state_dict_from_hf); no
    # config.json is read for a plain timm name.
    assert timm.create_model(NAME, pretrained=False).pretrained_cfg["hf_hub_id"] == "timm/test_vit.r160_in1k"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / HUB_REPO_DIR
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    expected = _distinct_state_dict(3)
    save_file(expected, str(snapshot / "model.safetensors"))
    result = _run_offline(tmp_path, str(snapshot / "model.safetensors"))
    assert result == {"same_keys": True, "equal": True}


def test_hub_cache_offline_empty_cache_says_pass_a_file(tmp_path):
    (tmp_path / "hub").mkdir()
    result = _run_offline(tmp_path)
    assert result["error"] == "ValueError"
    assert "pass a local weight file" in result["message"]
    assert "\n" not in result["message"]


# --- flora-ray dense checkpoints -------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{}, {"num_classes": 10, "img_size": 96}])
def test_dense_checkpoint_loads_exactly(tmp_path, kwargs):
    tensors = _distinct_state_dict(5, **kwargs)
    path = tmp_path / "dense.safetensors"
    write_checkpoint(path, tensors, dense_checkpoint_metadata(ModelSpec(NAME, kwargs)))
    model = create_model(NAME, pretrained=path, **kwargs)
    assert set(model.state_dict()) == set(tensors)
    _assert_state_equal(model, tensors)
    # ModelSpec.create takes the same path
    _assert_state_equal(ModelSpec(NAME, kwargs).create(pretrained=path), tensors)


@pytest.mark.parametrize(
    ("saved", "wanted"),
    [
        (ModelSpec(NAME, {"num_classes": 10}), ModelSpec(NAME, {})),
        (ModelSpec(NAME, {}), ModelSpec(NAME, {"num_classes": 10})),
        (ModelSpec("deit_tiny_patch16_224", {}), ModelSpec(NAME, {})),
    ],
)
def test_dense_checkpoint_of_another_model_names_both(tmp_path, saved, wanted):
    tensors = _distinct_state_dict(6, **saved.kwargs) if saved.name == NAME else _distinct_state_dict(6)
    path = tmp_path / "dense.safetensors"
    write_checkpoint(path, tensors, dense_checkpoint_metadata(saved))
    with pytest.raises(ValueError) as info:
        create_model(wanted.name, pretrained=path, **wanted.kwargs)
    message = str(info.value)
    assert json.dumps(saved.to_dict()) in message
    assert json.dumps(wanted.to_dict()) in message
    assert str(path) in message


def test_dense_checkpoint_with_wrong_tensors_is_one_line_error(tmp_path):
    tensors = _distinct_state_dict(8)
    del tensors["blocks.5.mlp.fc2.weight"]
    path = tmp_path / "dense.safetensors"
    write_checkpoint(path, tensors, dense_checkpoint_metadata(ModelSpec(NAME, {})))
    with pytest.raises(ValueError, match="does not match the model") as info:
        create_model(NAME, pretrained=path)
    assert "blocks.5.mlp.fc2.weight" in str(info.value)
    assert "\n" not in str(info.value)


# --- broken, missing and mismatched files ----------------------------------------------------------------------


def _truncated(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


def test_corrupt_files_are_value_errors_naming_the_path(tmp_path, weight_files):
    dense = tmp_path / "dense.safetensors"
    write_checkpoint(dense, _distinct_state_dict(9), dense_checkpoint_metadata(ModelSpec(NAME, {})))
    random_bytes = random.Random(0).randbytes(4096)
    cases = {
        "random.safetensors": random_bytes,
        "random.pth": random_bytes,
        "random.bin": random_bytes,
    }
    paths = []
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        paths.append(tmp_path / name)
    paths.append(_truncated(weight_files["safetensors"], tmp_path / "cut.safetensors"))
    paths.append(_truncated(weight_files["pth"], tmp_path / "cut.pth"))
    paths.append(_truncated(dense, tmp_path / "cut_dense.safetensors"))
    for path in paths:
        with pytest.raises(ValueError) as info:
            create_model(NAME, pretrained=path)
        message = str(info.value)
        assert str(path) in message, path
        assert "\n" not in message, path
        if path.suffix == ".safetensors":
            assert "corrupt" in message, path


def test_missing_file_is_file_not_found_naming_it(tmp_path):
    path = tmp_path / "nowhere" / "vit.safetensors"
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        create_model(NAME, pretrained=path)
    assert str(path) in str(info.value)
    with pytest.raises(FileNotFoundError):
        build_supernet(NAME, pretrained=str(path))


@pytest.mark.parametrize(
    ("file_kwargs", "model_kwargs"),
    [
        ({"embed_dim": 96}, {}),  # every weight has the wrong shape
        ({"depth": 3}, {}),  # blocks 3-5 missing
        ({}, {"embed_dim": 96}),  # a file of the default model into a wider one
    ],
)
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_of_another_architecture_are_rejected(tmp_path, file_kwargs, model_kwargs, suffix):
    tensors = _distinct_state_dict(10, **file_kwargs)
    path = tmp_path / f"other{suffix}"
    if suffix == ".pth":
        torch.save(tensors, path)
    else:
        save_file(tensors, str(path))
    with pytest.raises(ValueError) as info:
        create_model(NAME, pretrained=path, **model_kwargs)
    message = str(info.value)
    assert message.startswith(f"cannot load pretrained weights for {NAME!r} from {path}")
    assert "\n" not in message


def test_deit_tiny_weights_into_test_vit_are_rejected(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "deit_tiny.safetensors"
    save_file(timm.create_model("deit_tiny_patch16_224").state_dict(), str(path))
    with pytest.raises(ValueError, match="cannot load pretrained weights") as info:
        create_model(NAME, pretrained=path)
    assert "\n" not in str(info.value)


# --- pickle safety ---------------------------------------------------------------------------------------------


def _leave_marker(path: str) -> str:
    Path(path).write_text("unpickled")
    return "payload"


class ReducePayload:
    """Unpickling calls ``_leave_marker``, which writes a file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (_leave_marker, (self.marker,))


class StatePayload:
    """Unpickling constructs an instance and calls ``__setstate__``, which writes a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __getstate__(self):
        return {"marker": self.marker}

    def __setstate__(self, state):
        self.marker = state["marker"]
        Path(self.marker).write_text("constructed")


@pytest.mark.parametrize("payload_cls", [ReducePayload, StatePayload])
@pytest.mark.parametrize("suffix", [".pth", ".bin"])
def test_pickled_objects_are_never_unpickled(tmp_path, weights, payload_cls, suffix):
    marker = tmp_path / "marker"
    path = tmp_path / f"evil{suffix}"
    torch.save({**weights, "x": payload_cls(marker)}, path)
    with pytest.raises(ValueError) as info:
        create_model(NAME, pretrained=path)
    assert str(path) in str(info.value)
    assert not marker.exists()
    with pytest.raises(ValueError):
        build_supernet(NAME, pretrained=path)
    assert not marker.exists()
    # the payload is live: an unsafe load does run it (so the checks above can fail)
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("payload_cls", [ReducePayload, StatePayload])
def test_pickled_objects_rejected_when_timm_lets_unpickling_error_through(monkeypatch, tmp_path, weights, payload_cls):
    """Older timm releases call ``torch.load(weights_only=True)`` without wrapping torch's ``UnpicklingError``."""
    import timm.models._builder as builder

    def plain_torch_load(path, *args, **kwargs):
        return torch.load(path, map_location="cpu", weights_only=True)

    monkeypatch.setattr(builder, "load_state_dict", plain_torch_load)
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    torch.save({**weights, "x": payload_cls(marker)}, path)
    with pytest.raises(ValueError, match="cannot load pretrained weights") as info:
        create_model(NAME, pretrained=path)
    assert str(path) in str(info.value)
    assert not marker.exists()
    random_bytes = tmp_path / "random.pth"
    random_bytes.write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(ValueError, match="cannot load pretrained weights"):
        create_model(NAME, pretrained=random_bytes)

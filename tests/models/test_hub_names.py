"""Teachers named by timm's ``hf-hub:`` ids, resolved from a local Hugging Face cache the test writes (no network).

The cache holds a timm hub repo as ``huggingface-cli download`` leaves it: ``config.json`` (architecture, classes,
model arguments) and ``model.safetensors``. A digits run names the teacher ``hf-hub:timm/flora-tiny-vit``: the
pretrain stage is skipped, the teacher is exactly the cached weights, the run's artefacts name the architecture
(``test_vit`` with the repo's model arguments), so an export loads without the cache.
"""

import json

import pytest
import timm
import torch
from conftest import DIGITS_OVERRIDES
from safetensors.torch import save_file

import flora_ray as fr
from flora_ray.cli import main
from flora_ray.stages.inputs import load_teacher, resolve_model_spec

REPO = "timm/flora-tiny-vit"
MODEL_ARGS = {"patch_size": 2, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}
NO_MODEL_KWARGS = [o for o in DIGITS_OVERRIDES if not o.startswith(("model.kwargs", "model.name"))]


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A hub cache with one timm repo (a digits-sized test_vit, distinct weights); returns those weights."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / f"models--{REPO.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    kwargs = {**MODEL_ARGS, "img_size": 8, "in_chans": 1, "num_classes": 10}
    torch.manual_seed(7)
    weights = {k: v + 0.01 for k, v in timm.create_model("test_vit", **kwargs).state_dict().items()}
    save_file(weights, str(snapshot / "model.safetensors"))
    config = {"architecture": "test_vit", "num_classes": 10, "model_args": MODEL_ARGS,
              "pretrained_cfg": {"num_classes": 10, "input_size": [1, 8, 8]}}  # fmt: skip
    (snapshot / "config.json").write_text(json.dumps(config))
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return weights


@pytest.mark.slow
def test_a_hub_teacher_runs_from_the_cache(hub_cache, tmp_path, monkeypatch):
    overrides = [*NO_MODEL_KWARGS, "run.name=hub", "model.pretrained=true", "filter.mode=zero_training",
                 "filter.eval_images=100", "train.epochs=1", "search.trials=8", "search.population=4",
                 "search.eval_images=100", "search.concurrency=1"]  # fmt: skip
    run = fr.run({"model": {"name": f"hf-hub:{REPO}"}, "data": {"name": "digits"}}, overrides, backend="local",
                 output=tmp_path / "runs")  # fmt: skip
    assert "skipped" in run.store.read_json("stages/pretrain.json")["summary"]  # the hub weights are the teacher
    spec = resolve_model_spec(run.config)
    assert spec.name == "test_vit" and {k: spec.kwargs[k] for k in MODEL_ARGS} == MODEL_ARGS
    (teacher,) = load_teacher(run.config, run.store)
    state = teacher.state_dict()
    assert set(state) == set(hub_cache) and all(torch.equal(state[k], hub_cache[k]) for k in hub_cache)
    assert run.supernet.spec.name == "test_vit"  # the artefacts name the architecture, not the repo
    report = run.export(run.knee(), output=tmp_path / "export", evaluate=False, backend="local")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))  # the export needs no hub cache
    assert fr.load_subnet(report["directory"])(torch.zeros(1, 1, 8, 8)).shape == (1, 10)


def test_a_hub_name_missing_from_the_cache_is_one_line_exit_2(hub_cache, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("model: {name: 'hf-hub:timm/not-downloaded', pretrained: true}\ndata: {name: digits}\n")
    assert main(["pretrain", str(config), *NO_MODEL_KWARGS, "--output", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'hf-hub:timm/not-downloaded' is not in the local Hugging Face cache" in err
    assert "huggingface-cli download timm/not-downloaded" in err and str(tmp_path / "hub") in err

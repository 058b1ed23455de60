"""Pretrained weights as the teacher: kept when their classifier fits the data, fine-tuned when it does not."""

import pytest
import torch
from safetensors.torch import save_file

from flora_ray.backends.local import LocalBackend
from flora_ray.config import load_config
from flora_ray.core.models import create_model, pretrained_num_classes
from flora_ray.stages.inputs import resolve_model_spec, teacher_is_pretrained
from flora_ray.stages.preflight import preflight
from flora_ray.stages.training import pretrain
from flora_ray.storage.run_store import ARTEFACTS, RunStore
from flora_ray.testing.imagefolder import write_image_folder

KWARGS = {"img_size": 32, "in_chans": 3, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2}


def _weights(tmp_path, classes):
    """A timm-format weight file (no flora-ray header), as downloaded weights would be."""
    torch.manual_seed(classes)
    model = create_model("test_vit", **{**KWARGS, "num_classes": classes})
    path = tmp_path / f"vit_{classes}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path, model.state_dict()


@pytest.fixture
def config(tmp_path):
    data = write_image_folder(tmp_path / "data", classes=5, train_per_class=16, val_per_class=4, size=32)

    def make(weights):
        kwargs = "{" + ", ".join(f"{k}: {v}" for k, v in KWARGS.items() if k not in ("img_size", "in_chans")) + "}"
        return load_config(
            None,
            [
                "model.name=test_vit", f"model.kwargs={kwargs}", f"model.pretrained={weights}",
                "data.name=imagefolder", f"data.root={data}", "data.img_size=32", "data.in_chans=3",
                "data.search_per_class=4", "data.augment=false", "pretrain.epochs=1", "pretrain.batch_size=16",
                "pretrain.warmup_epochs=0", f"run.output_dir={tmp_path / 'runs'}", "scaling.num_workers=1",
            ],
        )  # fmt: skip

    return make


def test_weights_for_other_classes_are_fine_tuned_into_the_teacher(config, tmp_path):
    path, state = _weights(tmp_path, classes=10)
    cfg = config(path)
    assert resolve_model_spec(cfg).kwargs["num_classes"] == 5  # from the class folders
    assert pretrained_num_classes("test_vit", str(path)) == 10 and not teacher_is_pretrained(cfg)
    preflight(cfg, "pretrain")
    start = create_model("test_vit", pretrained=str(path), **resolve_model_spec(cfg).kwargs)
    assert torch.equal(start.state_dict()["blocks.0.attn.qkv.weight"], state["blocks.0.attn.qkv.weight"])
    assert start.head.out_features == 5  # the body from the weights, a new head for the data's classes
    summary = pretrain(cfg, LocalBackend())
    assert summary["fine_tuned"] == {"from": str(path), "pretrained_classes": 10, "classes": 5}
    _, header = RunStore.for_config(cfg).read_checkpoint(ARTEFACTS.teacher)
    assert header["model"]["kwargs"]["num_classes"] == 5


def test_weights_that_fit_the_data_are_the_teacher_as_they_are(config, tmp_path):
    path, state = _weights(tmp_path, classes=5)
    cfg = config(path)
    assert teacher_is_pretrained(cfg)
    assert "skipped" in pretrain(cfg, LocalBackend())
    model = create_model("test_vit", pretrained=str(path), **resolve_model_spec(cfg).kwargs)
    assert torch.equal(model.state_dict()["head.weight"], state["head.weight"])  # the file's own 5-class head

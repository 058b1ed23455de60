"""The int8 export of a trained digits subnet (with and without token merging) keeps the fp32 export's accuracy
within ``INT8_TOLERANCE``, loads from its file, and is timed against fp32 as ``flora-ray export --format int8``
records it (``stages.export.int8_figures``)."""

import json

import pytest
import torch
from conftest import DIGITS_OVERRIDES
from torch.utils.data import DataLoader

import flora_ray as fr
from flora_ray.config import load_config
from flora_ray.core.tome import token_merging_r
from flora_ray.data.datasets import build_datasets
from flora_ray.stages.export import int8_figures
from flora_ray.stages.formats import write_formats
from flora_ray.stages.inputs import factorize_model, resolve_model_spec
from flora_ray.training.tasks import accuracy

# Percentage points of test accuracy the int8 subnet may lose against the fp32 one on digits. Per-channel int8 weights
# with per-batch int8 activations typically cost ViTs well under half a point; the digits test split has 359
# images, so one image is 0.28 points: 2 points (7 images) leaves room for borderline images to flip, while a
# broken quantization (wrong scales, rows or layers) falls towards chance (10%) from the trained model's 75%+.
INT8_TOLERANCE = 2.0


def _trained_dense(cfg, splits):
    torch.manual_seed(0)
    model = resolve_model_spec(cfg).create()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(12):
        for x, y in DataLoader(splits.train, batch_size=64, shuffle=True):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@pytest.mark.parametrize("tome_r", [0, 3])
def test_int8_subnet_keeps_the_fp32_accuracy_on_digits(tmp_path, tome_r):
    cfg = load_config(None, [*DIGITS_OVERRIDES, "data.augment=false", f"model.tome_r={tome_r}"])
    splits = build_datasets(cfg.data)
    supernet = factorize_model(cfg, _trained_dense(cfg, splits))
    ranks = supernet.space.uniform_configs()[0.5]
    fr.save_subnet(supernet, ranks, tmp_path)
    fp32 = fr.load_subnet(tmp_path)
    x = torch.stack([splits.test[i][0] for i in range(32)])
    formats = write_formats(fp32, x, tmp_path, ["int8"])
    int8 = fr.load_subnet(tmp_path, int8=True)
    assert token_merging_r(int8) == token_merging_r(fp32) == tome_r
    fp32_accuracy = accuracy(fp32, splits.test, torch.device("cpu"))
    figures = int8_figures(int8, fp32, splits.test, x, 1, fp32_accuracy)
    assert fp32_accuracy >= 75, "the model did not train: the tolerance would say nothing"
    assert abs(figures["accuracy_drop"]) <= INT8_TOLERANCE, figures
    assert formats["int8"]["bytes"] < 0.6 * formats["int8"]["fp32_bytes"]
    assert json.loads((tmp_path / "subnet.json").read_text())[
        "int8_weights_sha256"
    ]  # the export's file, checked at load
    assert all(ms > 0 for ms in figures["latency"].values())

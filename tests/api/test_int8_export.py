"""``--format int8`` on the finished digits run: the int8 file loads with ``load_subnet(int8=True)``, its test
accuracy is within ``INT8_TOLERANCE`` of the fp32 export, and its accuracy and CPU latency against fp32 are recorded.
"""

import json

import torch
from helpers import input_for

import flora_ray as fr
from flora_ray.data.datasets import build_datasets
from flora_ray.training.tasks import accuracy

# Percentage points of test accuracy the int8 subnet may lose against fp32 on digits. Per-channel int8 weights with
# per-batch int8 activations typically cost ViTs well under half a point (PyTorch's dynamic quantization on DeiT);
# the digits test split has 360 images, so one image is 0.28 points: 2 points (7 images) leaves room for
# borderline images to flip while a broken quantization (wrong scales or layers: chance is 10%) fails by far.
INT8_TOLERANCE = 2.0


def test_int8_export_loads_and_keeps_the_accuracy(finished, tmp_path, capsys):
    from flora_ray.cli import main

    run, *_ = finished
    knee = int(run.knee()["trial"])
    out = tmp_path / "int8"
    assert main(["export", run.location, "--trial", str(knee), "--format", "int8", "--backend", "local",
                 "--output", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    report = json.loads((out / "export.json").read_text())
    int8, fp32 = fr.load_subnet(out, int8=True), fr.load_subnet(out)
    figures = report["int8"]
    assert figures["fp32_test_accuracy"] == report["test_accuracy"]
    assert abs(figures["accuracy_drop"]) <= INT8_TOLERANCE, figures
    assert figures["test_accuracy"] == figures["fp32_test_accuracy"] - figures["accuracy_drop"]
    for key in ("int8_batch1_ms", "fp32_batch1_ms", "int8_batch32_ms", "fp32_batch32_ms"):
        assert figures["latency"][key] > 0
    formats = report["formats"]["int8"]
    assert formats["file"] == "model.int8.safetensors" and formats["bytes"] < formats["fp32_bytes"]
    assert formats["top1_agreement"] >= 0.9 and "int8: test acc" in printed
    x = torch.randn(3, *input_for(fp32).shape[1:])
    with torch.no_grad():
        assert (int8(x) - fp32(x)).abs().max() < 0.1 * fp32(x).abs().max()
    # the loaded file scores what the export recorded
    assert accuracy(int8, build_datasets(run.config.data).test, torch.device("cpu")) == figures["test_accuracy"]

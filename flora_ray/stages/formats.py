"""Deployable export formats of a subnet, and the Hugging Face folder layout around them.

``safetensors`` (always: ``model.safetensors`` + ``subnet.json``, loaded by ``flora_ray.load_subnet``), ``pt2``
(``torch.export``, loaded by ``torch.export.load``: no flora-ray, no timm), ``onnx`` (the dynamo ONNX exporter;
run by onnxruntime) and ``int8`` (``model.int8.safetensors``: the subnet's Linear layers quantized to int8 after
training, ``core.quantize``; ``flora_ray.load_subnet(folder, int8=True)``, CPU). The batch dimension is dynamic in
pt2 and onnx. Each written file is loaded back and run on a batch against the PyTorch subnet; the largest absolute
difference goes into ``export.json`` (for int8 a quantization error, not a check of the file, with the top-1
agreement on the batch and both file sizes). The folder also gets a
``config.json`` (timm's hub keys plus the ranks) and a model card ``README.md``.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flora_ray.core.subnet import INT8_WEIGHTS_FILE, WEIGHTS_FILE, load_subnet, save_subnet_int8
from flora_ray.errors import InputError
from flora_ray.records import ExportReport

FORMATS = ("safetensors", "pt2", "onnx", "int8")
FORMAT_FILES = {"safetensors": "model.safetensors", "pt2": "model.pt2", "onnx": "model.onnx", "int8": INT8_WEIGHTS_FILE}
NEEDS = {"onnx": ("onnx", "onnxscript", "onnxruntime")}  # modules of the optional extra `export`
MAX_BATCH = 4096
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"


def check_formats(formats: Iterable[str]) -> tuple[str, ...]:
    """The requested formats, ``safetensors`` first (always written), or a one-line error: an unknown format, or
    one whose exporter is not installed."""
    requested = list(dict.fromkeys(formats))
    unknown = [f for f in requested if f not in FORMATS]
    if unknown:
        raise InputError(f"unknown export format {unknown[0]!r}: choose from {', '.join(FORMATS)}")
    for name in requested:
        missing = [m for m in NEEDS.get(name, ()) if importlib.util.find_spec(m) is None]
        if missing:
            raise InputError(
                f"--format {name} needs {', '.join(missing)}: pip install 'flora-ray[export]' (or pip install "
                f"{' '.join(missing)})"
            )
    return ("safetensors", *(f for f in requested if f != "safetensors"))


@torch.no_grad()
def write_formats(model: nn.Module, x: torch.Tensor, directory: Path, formats: Iterable[str]) -> dict[str, Any]:
    """Write ``model`` in every format of ``formats`` but safetensors (written by ``save_subnet``) into
    ``directory``, load each back and compare it with ``model`` on ``x`` and on its first image (the batch is
    dynamic); per format: file name and max absolute difference."""
    model = model.eval()
    expected = model(x)
    writers = {"pt2": _pt2, "onnx": _onnx, "int8": _int8}
    out: dict[str, Any] = {}
    for name in formats:
        if name == "safetensors":
            continue
        path = directory / FORMAT_FILES[name]
        run = writers[name](model, x, path)
        got = run(x)
        diff = max(float((got - expected).abs().max()), float((run(x[:1]) - expected[:1]).abs().max()))
        out[name] = {"file": path.name, "max_abs_diff": diff, "checked_batches": [len(x), 1]}
        if name == "int8":
            agreement = float((got.argmax(-1) == expected.argmax(-1)).float().mean())
            sizes = {"bytes": path.stat().st_size, "fp32_bytes": (directory / WEIGHTS_FILE).stat().st_size}
            out[name].update({"top1_agreement": agreement, **sizes})
    return out


def _batch_dim() -> Any:
    return torch.export.Dim("batch", min=1, max=MAX_BATCH)


def _pt2(model: nn.Module, x: torch.Tensor, path: Path):
    program = torch.export.export(model, (x,), dynamic_shapes=({0: _batch_dim()},))
    torch.export.save(program, str(path))
    loaded = torch.export.load(str(path)).module()
    return lambda batch: loaded(batch)


def _onnx(model: nn.Module, x: torch.Tensor, path: Path):
    import onnxruntime

    torch.onnx.export(model, (x,), str(path), dynamo=True, dynamic_shapes=({0: _batch_dim()},), verbose=False,
                      external_data=False)  # fmt: skip
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda batch: torch.from_numpy(session.run(None, {name: batch.cpu().numpy()})[0])


def _int8(model: nn.Module, x: torch.Tensor, path: Path):
    save_subnet_int8(model, path.parent)  # model.int8.safetensors, its checksum into subnet.json
    loaded = load_subnet(path.parent, int8=True)  # as a user loads it, from subnet.json and the int8 file
    return lambda batch: loaded(batch.cpu())


def hf_config(spec: Mapping[str, Any], data: Mapping[str, Any]) -> dict[str, Any]:
    """``config.json``: timm's hub keys (architecture, classes, model arguments, input size and normalisation)
    plus the factorisation (``flora_ray``: ranks per layer and how to load the weights)."""
    model = spec["model"]
    kwargs = dict(model.get("kwargs", {}))
    channels, size = data["in_chans"], data["img_size"]
    return {
        "architecture": model["name"],
        "num_classes": kwargs.get("num_classes"),
        "model_args": kwargs,
        "pretrained_cfg": {
            "input_size": [channels, size, size],
            "mean": list(data["mean"]),
            "std": list(data["std"]),
            "num_classes": kwargs.get("num_classes"),
        },
        "flora_ray": {
            "format": spec["format"],
            "ranks": spec["ranks"],
            "macs": spec["macs"],
            "params": spec["params"],
            "load": "flora_ray.load_subnet(folder); model.pt2: torch.export.load; model.onnx: onnxruntime; "
            "model.int8.safetensors: flora_ray.load_subnet(folder, int8=True)",
        },
    }


def model_card(spec: Mapping[str, Any], report: ExportReport, context: Mapping[str, Any]) -> str:
    """The folder's ``README.md``: what the model is, its cost and accuracy, where it sits on the front, its
    ranks per layer, its files and its provenance."""
    macs, dense = spec["macs"], spec["dense_macs"]
    name = spec["model"]["name"]
    lines = [
        "---",
        "library_name: timm",
        "tags: [image-classification, timm, flora-ray, low-rank]",
        "---",
        f"# {name}, FLORA low-rank subnet (trial {report.trial})",
        "",
        f"A subnet of `{name}` whose Linear layers are SVD low-rank factors at the ranks below, found by flora-ray's "
        f"architecture search on `{context['dataset']}` ({context['run']}). Base model: {context['base_model']}.",
        "",
        "| | subnet | dense |",
        "| --- | ---: | ---: |",
        f"| MACs per image | {macs / 1e6:.2f} M ({100 * macs / dense:.1f}%) | {dense / 1e6:.2f} M |",
        f"| parameters | {spec['params'] / 1e6:.3f} M | {spec['dense_params'] / 1e6:.3f} M |",
        f"| search-split accuracy | {report.search_accuracy:.2f}% | |",
    ]
    if report.test_accuracy is not None:
        lines.append(f"| test accuracy | {report.test_accuracy:.2f}% | {report.dense_test_accuracy:.2f}% |")
    if report.latency:
        lat = report.latency
        lines.append(f"| CPU latency, batch 1 | {lat.subnet_batch1_ms:.2f} ms | {lat.dense_batch1_ms:.2f} ms |")
    if report.int8:
        q = report.int8
        lines.append(f"| int8 (`model.int8.safetensors`): test accuracy, CPU batch 1 | {q.test_accuracy:.2f}%, "
                     f"{q.latency.int8_batch1_ms:.2f} ms | fp32 subnet: {q.fp32_test_accuracy:.2f}%, "
                     f"{q.latency.fp32_batch1_ms:.2f} ms |")  # fmt: skip
    for batch, b in (report.target_latency.batches if report.target_latency else {}).items():
        lines.append(f"| latency on {context['target_device']}, batch {batch} | {b.measured_ms:.3f} ms "
                     f"(predicted {b.predicted_ms:.3f}) | {b.dense_measured_ms:.3f} ms |")  # fmt: skip
    lines += ["", f"Front: {context['front_position']}.", "", "## Files", ""]
    lines.append("- `model.safetensors` + `subnet.json`: `flora_ray.load_subnet(folder)` (timm + torch modules)")
    for fmt, f in report.formats.items():
        lines.append(f"- `{f['file']}` ({fmt}): max abs difference to PyTorch {f['max_abs_diff']:.2e}")
    lines += ["- `config.json`: timm's hub keys and the ranks; `export.json`: every figure", "", "## Ranks per layer"]
    lines += ["", "| layer | rank | of | form |", "| --- | ---: | ---: | --- |"]
    lines += [f"| `{fqn}` | {la['rank']} | {la['max_rank']} | {la['form']} |" for fqn, la in spec["layers"].items()]
    lines += ["", "## Provenance", "", f"- run: `{context['run']}`, seed {context['seed']}"]
    lines += [
        f"- versions: {json.dumps(spec['versions'])}",
        f"- evaluated on: {report.device if report.evaluated else 'not evaluated'}",
    ]
    return "\n".join(lines) + "\n"

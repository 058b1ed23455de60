"""Training throughput of a model on a GPU, each figure with its source, for ``flora-ray plan``.

Two kinds of figures, best first:

- **measured**: JSON files written by ``experiments/gpu_check.py`` (``make gpu-check``) on a CUDA machine: DeiT-S
  supernet training images/s per GPU of this code, with the GPU's name, the date and the MACs one training image
  costs; ``plan`` reads those in ``experiments/benchmarks/results/gpu_check*.json`` and any given with
  ``--throughput FILE``.
- **published**: timm's own training benchmark (the only published training throughput per timm model that names
  its GPU, batch and precision; ``PUBLISHED`` below quotes each row exactly).

A figure is turned into multiply-accumulates per second of training (images/s x MACs per training image), which
``plan`` divides every stage's work by. No figure for a model and GPU: ``plan`` falls back to the GPU's datasheet
peak times an assumed utilisation and says so in its output.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flora_ray.errors import InputError

# GPU names as torch.cuda.get_device_name() and the cloud catalogues spell them, most specific first
# ("A100" before "A10", "A10G" before "A10").
GPU_NAMES = ("H200", "H100", "A100", "A10G", "A10", "L40S", "L4", "T4", "V100", "RTX 4090", "RTX 3090")
MEASURED_GLOB = "gpu_check*.json"
MEASURED_DIR = Path(__file__).resolve().parents[1] / "experiments" / "benchmarks" / "results"

TIMM_TRAIN_3090 = (
    "timm's training benchmark, huggingface/pytorch-image-models results/benchmark-train-amp-nchw-pt112-cu113-"
    "rtx3090.csv (commit bd6d377c74ef), {model} train_samples_per_sec {rate} at batch {batch}, 224 px: a dense "
    "training step (forward, backward, optimizer) on synthetic inputs, AMP, NCHW, PyTorch 1.12 / CUDA 11.3, "
    "one GeForce RTX 3090"
)


@dataclass(frozen=True)
class TrainingRate:
    """Training images per second of ``model`` on one ``gpu``, and what one such image costs.

    Attributes:
        model: timm model name (without a pretrained tag).
        gpu: Normalised GPU name (one of ``GPU_NAMES``).
        images_per_s: Training images per second on one GPU.
        macs_per_image: Multiply-accumulates one of those training images costs (a dense step: 3 forward passes;
            a supernet step: the teacher's forward plus 3 of the sampled subnet's). ``None``: 3 dense forwards.
        source: Where the figure is from, and what was measured.
    """

    model: str
    gpu: str
    images_per_s: float
    source: str
    macs_per_image: float | None = None

    def macs_per_s(self, dense_macs: float) -> float:
        """Multiply-accumulates per second of training on one GPU."""
        return self.images_per_s * (self.macs_per_image if self.macs_per_image else 3 * dense_macs)


def _timm(model: str, rate: float, batch: int) -> TrainingRate:
    return TrainingRate(model, "RTX 3090", rate, TIMM_TRAIN_3090.format(model=model, rate=rate, batch=batch))


# Published rows, quoted from the file named in TIMM_TRAIN_3090 (timm publishes training figures for the RTX 3090
# only; none for the GPUs of cloud node types).
PUBLISHED = (
    _timm("deit_tiny_patch16_224", 2290.53, 512),
    _timm("deit_small_patch16_224", 1053.64, 384),
    _timm("deit_base_patch16_224", 390.88, 192),
    _timm("swin_tiny_patch4_window7_224", 646.76, 256),
    _timm("swin_base_patch4_window7_224", 279.66, 128),
)


def normalise_gpu(name: str) -> str | None:
    """``"NVIDIA A100-SXM4-40GB"`` -> ``"A100"``; ``None`` for a GPU not in ``GPU_NAMES``."""
    for gpu in GPU_NAMES:
        spelled = "[ _-]?".join(re.escape(part) for part in gpu.split())  # "RTX 3090", "RTX3090", "rtx_3090"
        if re.search(rf"(?<![A-Za-z0-9]){spelled}(?![A-Za-z0-9])", name, re.I):
            return gpu
    return None


def base_model(name: str) -> str:
    """timm's architecture name without a pretrained tag (``deit_small_patch16_224.fb_in1k``)."""
    return name.split(".", 1)[0]


def read_measured(path: str | Path) -> TrainingRate:
    """One ``gpu_check`` result file as a rate (its ``throughput`` section)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
        part = data["throughput"]
        gpu = normalise_gpu(part["gpu"]) or part["gpu"]
        rate = TrainingRate(
            base_model(part["model"]),
            gpu,
            float(part["images_per_s_per_gpu"]),
            f"measured by experiments/gpu_check.py on {part['gpus']} x {part['gpu']} ({data['provenance']['date']}, "
            f"{p.name}): {part['what']}",
            float(part["train_macs_per_image"]),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(
            f"--throughput {str(p)!r}: not a gpu_check result file ({type(exc).__name__}: {exc})"
        ) from None
    if data.get("smoke"):
        raise InputError(f"--throughput {str(p)!r} is a --smoke run (a tiny model on CPU), not a GPU measurement")
    return rate


def is_smoke(path: Path) -> bool:
    try:
        return bool(json.loads(path.read_text()).get("smoke"))
    except (OSError, ValueError, AttributeError):
        return False


def known_rates(extra: list[str] | tuple[str, ...] = ()) -> list[TrainingRate]:
    """Measured files (``extra``, then the repository's GPU runs), then the published rows: the first match wins."""
    found = sorted(MEASURED_DIR.glob(MEASURED_GLOB)) if MEASURED_DIR.is_dir() else []
    measured = [read_measured(p) for p in found if not is_smoke(p)]
    return [*[read_measured(p) for p in extra], *measured, *PUBLISHED]


def find_rate(rates: list[TrainingRate], model: str, gpu: str) -> TrainingRate | None:
    """The first rate for ``model`` (pretrained tag ignored) on ``gpu``, or ``None``."""
    for rate in rates:
        if rate.model == base_model(model) and rate.gpu == gpu:
            return rate
    return None


def describe(rates: list[TrainingRate]) -> list[dict[str, Any]]:
    """The rates as rows (for ``plan --json``)."""
    return [{"model": r.model, "gpu": r.gpu, "images_per_s": r.images_per_s, "source": r.source} for r in rates]

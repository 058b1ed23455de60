"""``experiments/gpu_check.py`` (``make gpu-check``): its smoke run on the CPU, its one-line refusal without CUDA, and
the GPU run's configuration checked on the meta device (no GPU here: the CUDA path itself is not run by the tests)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flora_ray.api import resolve_config
from flora_ray.cli import main
from flora_ray.core.models import create_model
from flora_ray.core.supernet import build_space
from flora_ray.plan import stage_bundles

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "experiments" / "gpu_check.py"
ENV = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_writes_every_figure(tmp_path, capsys):
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--workdir", str(tmp_path / "work"), "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=ENV,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["smoke"] is True and f"gpu-check: wrote {out}" in proc.stdout
    throughput = result["throughput"]
    assert throughput["images_per_s"] > 0 and throughput["images_per_s_per_gpu"] == throughput["images_per_s"]
    assert throughput["train_macs_per_image"] > 0 and "one process, no Ray" in throughput["what"]
    assert result["gpu"] is None  # no GPU figures on the CPU
    loader = result["loader"]
    assert loader["training_processes"] == 1 and loader["busy_cores_mean"] is not None
    assert set(result["stages_s"]) == {"filter", "train", "search", "export"}
    assert result["search"]["trials"] == 20
    onnx = result["export"]["formats"]["onnx"]
    assert onnx["max_abs_diff"] < 1e-4 and (Path(result["export"]["directory"]) / onnx["file"]).is_file()
    provenance = result["provenance"]
    assert provenance["torch"] == torch.__version__ and provenance["seed"] == 0
    assert provenance["config"]["model"]["targets"] == _module().ONE_BLOCK
    assert provenance["config"]["train"]["epochs"] == 1 and provenance["config"]["search"]["trials"] == 20
    # A smoke result is no GPU measurement: plan refuses it as a rate.
    code = main(["plan", str(ROOT / "experiments/deit_small_imagenet.yaml"), "--cluster", str(ROOT / "cluster/aws.yaml"),
                 "--classes", "1000", "--train-images", "1256167", "--throughput", str(out)])  # fmt: skip
    assert code == 2 and "is a --smoke run" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the check would run")
def test_without_cuda_it_refuses_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--workdir", str(tmp_path)], capture_output=True, text=True,
                          timeout=120, env=ENV)  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("gpu-check: error: no CUDA device here") and proc.stderr.count("\n") == 1
    assert not any(tmp_path.iterdir())  # refused before writing anything


@pytest.mark.parametrize(("gpus", "cpus"), [(1, 16), (2, 16), (8, 96)])
def test_the_gpu_run_is_the_recipe_shortened_and_fits_the_machine(tmp_path, monkeypatch, gpus, cpus):
    """The overrides of a GPU run resolve against the DeiT-S recipe: one worker per GPU on NCCL with AMP, one block
    of 216 triples, one epoch, 20 trials; every stage's concurrent demand fits the machine's CPUs and GPUs."""
    module = _module()
    monkeypatch.setattr(module.os, "cpu_count", lambda: cpus)
    args = module.parse_args(["--workdir", str(tmp_path)])
    cfg = resolve_config(module.RECIPE, module.overrides(args, tmp_path / "images", tmp_path / "t.safetensors", gpus))
    assert (cfg.scaling.num_workers, cfg.scaling.use_gpu, cfg.train.amp) == (gpus, True, "auto")
    assert (cfg.train.epochs, cfg.filter.epochs, cfg.search.trials, cfg.train.batch_size) == (1, 1, 20, 128)
    assert cfg.model.name == "deit_small_patch16_224" and cfg.profile.enabled is False
    meta = create_model(cfg.model.name, device="meta", num_classes=module.CLASSES)
    space = build_space(meta, ratios=cfg.model.ratios, include_proj=cfg.model.include_proj, targets=cfg.model.targets)
    assert [b.name for b in space.blocks] == ["blocks.0"] and len(space.blocks[0].candidates) == 216
    for stage, bundles in stage_bundles(cfg).items():
        assert sum(b.get("CPU", 0) for b in bundles) <= cpus, stage
        assert sum(b.get("GPU", 0) for b in bundles) <= gpus, stage
    # What a training image of this run costs (plan's count): the teacher plus 3 x the mean subnet, between 3 and 4
    # dense forwards since only block 0's three layers shrink. DeiT-S with a 100-class head: 4,598,536,704 MACs
    # (flora-ray inspect's 4,598,882,304 for 1000 classes, less 900 x 384 of the head).
    macs = module.train_macs_per_image(cfg, cfg.model.name, {"img_size": 224, "num_classes": module.CLASSES})
    assert 3.9 * 4_598_536_704 < macs < 4 * 4_598_536_704


def test_gpu_samples_are_read_and_summarised_per_gpu_within_the_train_window():
    """The GPU path's sampling arithmetic on nvidia-smi lines as its CSV query prints them (no GPU needed)."""
    module = _module()
    lines = [
        "2026/12/07 10:00:00.000, 0, 0, 500",  # before the window
        "2026/12/07 10:00:01.000, 0, 90, 20000",
        "2026/12/07 10:00:01.000, 1, 40, 18000",
        "2026/12/07 10:00:01.500, 0, 0, 21000",
        "2026/12/07 10:00:01.500, 1, 60, 19000",
        "2026/12/07 10:00:03.000, 0, 100, 30000",  # after the window
    ]
    samples = [module.parse_smi_line(line) for line in lines]
    assert samples[1][1:] == (0, 90.0, 20000.0) and samples[2][0] - samples[0][0] == pytest.approx(1.0)
    sampler = module.Sampler(gpus=False)
    sampler.gpu = samples
    figures = module.gpu_figures(sampler, (samples[1][0], samples[3][0]), gpus=2)
    assert figures["busy_share_per_gpu"] == [0.45, 0.5]  # (90 + 0) / 2 and (40 + 60) / 2, in percent / 100
    assert figures["busy_share_per_gpu_while_busy"] == [0.9, 0.5]
    assert figures["peak_memory_mib_per_gpu"] == [21000.0, 19000.0] and figures["samples_per_gpu"] == [2, 2]

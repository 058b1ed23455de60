"""GPU check: the DeiT-S recipe shortened to minutes on this machine's GPUs, with what a plan needs to know.

    python experiments/gpu_check.py [--out FILE] [--workdir DIR] [--train-per-class N]   # make gpu-check
    python experiments/gpu_check.py --smoke                                                # make gpu-check-smoke

On a machine with CUDA: writes an ImageNet-shaped JPEG folder (100 classes, 320 px images, ``--train-per-class``
training and 10 validation images per class, in parallel on every core), saves a randomly initialised DeiT-S with a
100-class head as the teacher (so ``pretrain`` is skipped, as the recipe skips it with timm's weights), and runs
``experiments/deit_small_imagenet.yaml`` through ``flora_ray.run`` on local Ray with overrides that shorten it: the
rank space of block 0 only (one filter block, the recipe's 216 triples; the other eleven blocks stay dense, so a
training image costs about as much as the recipe's full-rank subnets), one filter epoch, one epoch of supernet
training (the recipe's AMP and batch of 128 per GPU, one Ray Train worker per GPU found, NCCL between them), 20
search trials, the export stage, then the knee subnet exported again with ONNX (in this process). Meanwhile it
samples every GPU's utilisation and memory with ``nvidia-smi`` (pynvml is not in the lock; ``nvidia-smi`` ships
with the driver) and the machine's busy CPU cores with psutil. The JSON (``--out``, written atomically) holds
supernet training images/s per GPU (the trainer's figure for the epoch: loader start and data loading included),
the GPUs' busy share and peak memory during the train stage, the loader processes and the CPU cores busy meanwhile,
the stage times, the export's ONNX check, and the provenance (resolved configuration, seed, versions, GPUs).
``flora-ray plan --throughput FILE`` reads it as a measured training rate for DeiT-S on that GPU; copied to
``experiments/benchmarks/results/gpu_check_<gpu>.json`` it is read by every plan.

Without CUDA it refuses in one line (exit 2). ``--smoke`` runs the same steps on the CPU with a tiny ViT and a few
32 px images (no GPU figures), for ``make test``; in this process (``--backend local``) unless ``--backend ray``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "experiments" / "deit_small_imagenet.yaml"
CLASSES = 100
SMOKE_CLASSES = 4
ONE_BLOCK = r"^blocks\.0\.(attn\.qkv|mlp\.fc1|mlp\.fc2)$"
SMOKE_MODEL = "{patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2, mlp_ratio: 2}"
SAMPLE_S = 0.5


class Refusal(Exception):
    """Why the check cannot run here: printed as one line, exit 2."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model, few images, CPU (for make test)")
    parser.add_argument("--out", type=Path, help="result JSON (default: WORKDIR/gpu_check.json)")
    parser.add_argument("--workdir", type=Path, help="images, teacher and run (default: runs/gpu_check[_smoke])")
    parser.add_argument("--train-per-class", type=int, default=300, help="training JPEG files per class (GPU run)")
    parser.add_argument("--backend", choices=("ray", "local"), help="default: ray (--smoke: local, for speed)")
    args = parser.parse_args(argv)
    args.backend = args.backend or ("local" if args.smoke else "ray")
    if args.train_per_class < 20:
        raise Refusal(f"--train-per-class {args.train_per_class}: give at least 20")
    args.workdir = args.workdir or REPO / "runs" / ("gpu_check_smoke" if args.smoke else "gpu_check")
    args.out = args.out or args.workdir / "gpu_check.json"
    return args


def cuda_devices() -> list[str]:
    """The CUDA devices torch sees; a refusal where there are none."""
    import torch

    if not torch.cuda.is_available():
        raise Refusal(
            f"no CUDA device here (torch {torch.__version__}, CUDA build {torch.version.cuda}): run it on a GPU "
            "machine, or with --smoke for the CPU smoke run"
        )
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


# --- inputs ------------------------------------------------------------------------------------------------------


def write_images(root: Path, classes: int, train_per_class: int, size: int) -> Path:
    """The JPEG folder, classes split over every core (the files do not depend on how they are split)."""
    from flora_ray.testing.imagefolder import write_image_folder

    if (root / "done.json").is_file() and json.loads((root / "done.json").read_text()) == [classes, train_per_class,
                                                                                           size]:  # fmt: skip
        return root
    shutil.rmtree(root, ignore_errors=True)
    jobs = max(1, min(os.cpu_count() or 1, classes))
    parts = [list(range(classes))[i::jobs] for i in range(jobs)]
    spawn = multiprocessing.get_context("spawn")  # this process may hold a CUDA context: no fork
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=spawn) as pool:
        futures = [pool.submit(write_image_folder, root, classes, train_per_class=train_per_class, val_per_class=10,
                               size=size, class_indices=part) for part in parts]  # fmt: skip
        for future in futures:
            future.result()
    (root / "done.json").write_text(json.dumps([classes, train_per_class, size]))
    return root


def write_random_teacher(path: Path, name: str, kwargs: dict) -> Path:
    """A randomly initialised model with the data's classes: the teacher as it is (no pretrain stage)."""
    import torch
    from safetensors.torch import save_file

    from flora_ray.core.models import create_model

    torch.manual_seed(0)
    model = create_model(name, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def overrides(args: argparse.Namespace, data: Path, teacher: Path, gpus: int) -> list[str]:
    """The recipe shortened to minutes (the module docstring says what each change keeps)."""
    cpus = os.cpu_count() or 1
    common = [
        "run.name=gpu-check", f"run.output_dir={args.workdir / 'runs'}", "run.max_failures=0",
        f"data.root={data}", f"model.pretrained={teacher}", f"model.targets={ONE_BLOCK}",
        "profile.enabled=false",
        "filter.epochs=1", "filter.warmup_epochs=0", "filter.concurrency=1", "train.epochs=1", "train.warmup_epochs=0",
        "search.trials=20", "search.population=10",
    ]  # fmt: skip
    if args.smoke:
        return [
            *common, "model.name=test_vit", f"model.kwargs={SMOKE_MODEL}", "data.img_size=32",
            "data.search_per_class=4", "filter.batch_size=8", "filter.accumulate=1", "filter.eval_images=16",
            "filter.cpus_per_task=1", "train.batch_size=16", "train.eval_images=16", "search.eval_images=16",
            "search.batch_size=16", "search.bn_recalibration_images=16", "search.concurrency=1",
            "search.gpus_per_trial=0", "search.cpus_per_trial=1", "scaling.num_workers=1", "scaling.use_gpu=false",
            "scaling.cpus_per_worker=1", "run.threads_per_worker=1",
        ]  # fmt: skip
    per_worker = max(2, min(8, cpus // gpus))
    return [
        *common, "data.search_per_class=10", "filter.eval_images=500", f"filter.cpus_per_task={per_worker}",
        "train.eval_images=500", "search.eval_images=1000", f"search.concurrency={2 * gpus}",
        "search.gpus_per_trial=0.5", f"search.cpus_per_trial={max(1, min(4, cpus // (2 * gpus)))}",
        f"scaling.num_workers={gpus}", f"scaling.cpus_per_worker={per_worker}",
    ]  # fmt: skip


# --- sampling ----------------------------------------------------------------------------------------------------


class Sampler:
    """Every ``SAMPLE_S``: busy CPU cores (psutil) and, with GPUs, each GPU's utilisation and memory in use
    (``nvidia-smi --query-gpu ... -lms``), each sample stamped with this process's wall clock."""

    def __init__(self, gpus: bool) -> None:
        self.cpu: list[tuple[float, float]] = []
        self.gpu: list[tuple[float, int, float, float]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._cpu, daemon=True)]
        self._smi = None
        if gpus:
            query = "timestamp,index,utilization.gpu,memory.used"
            command = ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits",
                       f"--loop-ms={int(SAMPLE_S * 1000)}"]  # fmt: skip
            if shutil.which("nvidia-smi") is None:
                raise Refusal("nvidia-smi is not on PATH (it ships with the NVIDIA driver): the GPU sampler needs it")
            self._smi = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
            self._threads.append(threading.Thread(target=self._gpu, daemon=True))

    def __enter__(self) -> Sampler:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._smi is not None:
            self._smi.terminate()
            self._smi.wait(timeout=10)
        for thread in self._threads:
            thread.join(timeout=10)

    def _cpu(self) -> None:
        import psutil

        cores = psutil.cpu_count() or 1
        psutil.cpu_percent()
        while not self._stop.wait(SAMPLE_S):
            self.cpu.append((time.time(), psutil.cpu_percent() / 100 * cores))

    def _gpu(self) -> None:
        for line in self._smi.stdout:
            self.gpu.append(parse_smi_line(line))


def parse_smi_line(line: str) -> tuple[float, int, float, float]:
    """``timestamp, index, utilization.gpu, memory.used`` as (wall-clock seconds, GPU, percent, MiB): nvidia-smi's own
    timestamp (local time) dates the sample, since a pipe may hand lines over in bursts."""
    stamp, index, util, memory = (part.strip() for part in line.split(","))
    try:
        when = datetime.strptime(stamp, "%Y/%m/%d %H:%M:%S.%f").timestamp()
    except ValueError:
        when = time.time()
    return when, int(index), float(util), float(memory)


def stage_window(marker: dict) -> tuple[float, float]:
    """Wall-clock start and end of a finished stage (its marker: end, to the microsecond in markers written since
    2026-12-07 and to the second before, and duration); a second of margin on both sides covers the older ones."""
    end = datetime.fromisoformat(marker["finished_at"]).timestamp() + 1.0
    return end - marker["seconds"] - 1.0, end


def mean_share(samples: list[tuple[float, int, float, float]]) -> float | None:
    """Mean utilisation of GPU samples as a share (0-1), ``None`` without samples."""
    return round(sum(s[2] for s in samples) / len(samples) / 100, 3) if samples else None


def gpu_figures(sampler: Sampler, window: tuple[float, float], gpus: int) -> dict:
    """Per GPU within ``window``: mean busy share (all samples, and samples with any work), peak memory."""
    inside = [s for s in sampler.gpu if window[0] <= s[0] <= window[1]]
    per_gpu = [[s for s in inside if s[1] == i] for i in range(gpus)]
    return {
        "sampler": f"nvidia-smi --query-gpu=timestamp,index,utilization.gpu,memory.used every {SAMPLE_S} s",
        "window": "the train stage (worker start, one epoch, evaluation, checkpoint)",
        "busy_share_per_gpu": [mean_share(g) for g in per_gpu],
        "busy_share_per_gpu_while_busy": [mean_share([s for s in g if s[2] > 0]) for g in per_gpu],
        "peak_memory_mib_per_gpu": [max((s[3] for s in g), default=None) for g in per_gpu],
        "samples_per_gpu": [len(g) for g in per_gpu],
    }


def cpu_figures(sampler: Sampler, window: tuple[float, float], cfg) -> dict:
    from flora_ray.training.worker import loader_workers

    busy = [c for t, c in sampler.cpu if window[0] <= t <= window[1]]
    per_process = loader_workers(cfg.data.workers, cfg.scaling.cpus_per_worker)
    return {
        "loader_processes_per_training_process": per_process,
        "training_processes": cfg.scaling.num_workers,
        "loader_processes": per_process * cfg.scaling.num_workers,
        "cpus_reserved_per_training_process": cfg.scaling.cpus_per_worker,
        "machine_cpus": os.cpu_count(),
        "busy_cores_mean": round(sum(busy) / len(busy), 2) if busy else None,
        "busy_cores_max": round(max(busy), 2) if busy else None,
        "sampler": f"psutil.cpu_percent() x cores every {SAMPLE_S} s, whole machine, the train stage",
    }


# --- the check ---------------------------------------------------------------------------------------------------


def run_check(args: argparse.Namespace) -> dict:
    import ray
    import torch

    import flora_ray
    from flora_ray.api import resolve_config
    from flora_ray.config import config_to_dict
    from flora_ray.storage.run_store import ARTEFACTS

    devices = [] if args.smoke else cuda_devices()
    classes = SMOKE_CLASSES if args.smoke else CLASSES
    data = write_images(args.workdir / "images", classes, 30 if args.smoke else args.train_per_class,
                        40 if args.smoke else 320)  # fmt: skip
    name, kwargs = ("test_vit", {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2,
                                 "mlp_ratio": 2}) if args.smoke else ("deit_small_patch16_224", {"img_size": 224})  # fmt: skip
    teacher = write_random_teacher(args.workdir / "teacher_random.safetensors", name,
                                   {**kwargs, "num_classes": classes, "drop_path_rate": 0.0})  # fmt: skip
    items = overrides(args, data, teacher, max(1, len(devices)))
    cfg = resolve_config(RECIPE, items)
    shutil.rmtree(cfg.run.run_dir, ignore_errors=True)  # a fresh run: every stage runs and is timed
    with Sampler(gpus=bool(devices)) as sampler:
        run = flora_ray.run(RECIPE, items, backend=args.backend)
        onnx = run.export(run.knee(), formats=["onnx"], evaluate=False, backend="local")  # in this process
    markers = {s: run.store.read_json(ARTEFACTS.stage_marker(s)) for s in ("filter", "train", "search", "export")}
    history = run.store.read_json(ARTEFACTS.history("train"))
    window = stage_window(markers["train"])
    images_per_s = history[-1]["images_per_s"]
    result = {
        "smoke": args.smoke,
        "throughput": {
            "model": cfg.model.name if not args.smoke else name,
            "gpu": devices[0] if devices else "none (CPU smoke run)",
            "gpus": len(devices),
            "images_per_s": images_per_s,
            "images_per_s_per_gpu": images_per_s / max(1, len(devices)),
            "train_macs_per_image": train_macs_per_image(cfg, name, {**kwargs, "num_classes": classes}),
            "what": (
                f"supernet training of this code, one epoch of {history[-1]['images']} images "
                f"({cfg.train.batch_size} per worker, amp {cfg.train.amp}, "
                f"{backend_words(args.backend, bool(devices), cfg.scaling.num_workers)}): teacher forward + "
                "sampled subnet forward/backward, data loading and augmentation included"
            ),
        },
        "gpu": gpu_figures(sampler, window, len(devices)) if devices else None,
        "loader": cpu_figures(sampler, window, cfg),
        "stages_s": {stage: round(m["seconds"], 1) for stage, m in markers.items()},
        "search": {"trials": len(run.trials), "front": len(run.front)},
        "export": {"trial": int(onnx["trial"]), "formats": onnx["formats"], "directory": onnx["directory"]},
        "provenance": {
            "date": time.strftime("%Y-%m-%d"),
            "host": platform.node(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "ray": ray.__version__,
            "flora_ray": flora_ray.__version__,
            "devices": devices,
            "seed": cfg.run.seed,
            "overrides": items,
            "config": config_to_dict(run.config),
        },
    }
    return result


def train_macs_per_image(cfg, name: str, kwargs: dict) -> float:
    """Multiply-accumulates of one supernet training image in this run, as ``flora-ray plan`` counts them: the
    teacher's forward pass plus 3 forward passes of the mean uniform subnet of the run's space (meta device)."""
    from flora_ray.core.models import ModelSpec
    from flora_ray.plan import build_workload

    workload = build_workload(cfg, ModelSpec(name, kwargs), 1)
    return workload.dense_macs + 3 * workload.mean_macs


def backend_words(backend: str, cuda: bool, workers: int) -> str:
    if backend == "local":
        return "one process, no Ray"
    return f"{workers} Ray Train workers, {'NCCL' if cuda else 'gloo'}"


def write_json(path: Path, data: dict) -> None:
    """Atomically: a temporary file next to it, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    from flora_ray.errors import InputError

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        args = parse_args(argv)
        if not args.smoke:  # before any file is written
            cuda_devices()
            if shutil.which("nvidia-smi") is None:
                raise Refusal("nvidia-smi is not on PATH (it ships with the NVIDIA driver): the GPU sampler needs it")
        result = run_check(args)
    except (Refusal, InputError) as exc:
        print(f"gpu-check: error: {exc}", file=sys.stderr)
        return 2
    write_json(args.out, result)
    print(json.dumps(result["throughput"] | {"gpu_busy": result["gpu"], "loader": result["loader"]}, indent=2))
    print(f"gpu-check: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

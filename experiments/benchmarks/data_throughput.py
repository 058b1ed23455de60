"""Data throughput: decode + augment images/s per DataLoader worker on ImageNet-sized JPEG files, and how many CPU
cores one GPU needs to keep DeiT-S supernet training fed.

A folder of 500x375 JPEG files (ImageNet's median size, quality 90, image-like content: colour gradients, soft blobs,
multi-scale texture and pixel noise, about 100 KB each, near ImageNet's average file size) is written to a temporary
directory and read with ``torchvision.datasets.ImageFolder`` and the project's transforms
(``data.transforms.folder_transforms(224, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, augment=True, pixels=...)``):
the train transform (RandomResizedCrop, flip, RandAugment ``rand-m9-mstd0.5-inc1``; with ``pixels=False`` also
to-float, normalisation and random erasing 0.25 on the CPU; with ``pixels=True`` the loader yields uint8 and
``data.transforms.Preprocess`` does the float work on the device) and the eval transform (resize 256 + centre crop
224). Rows: {train, eval} x {pixels False, True} x {0, 1, 2} loader workers (persistent workers off), one warm-up pass
of each, then passes timed in interleaved rounds (each configuration once per round) so that load changes on a shared
machine hit all alike; images/s per worker process = images/s / max(workers, 1). A single-process split times the
decode and every transform of the chain per image, and ``Preprocess(mean, std, erase_prob=0.25)`` is timed on CPU
batches of uint8 images (what moves to the device with ``pixels=True``).

Every row also records the CPU time of the benchmark's processes and of the whole machine (``getrusage``,
``/proc/stat``): images per CPU second is what a core free of other jobs delivers. Cores per GPU = the GPU's training
images/s / images per CPU second of one loader worker (train transform), with a published GPU figure
(``PUBLISHED_GPU`` below, timm's own training benchmark) and the supernet step's teacher forward.
Prints tables, writes ``results/data_throughput.json``.

    .venv/bin/python experiments/benchmarks/data_throughput.py            # full run (about 3.5 minutes on 2 cores)
    .venv/bin/python experiments/benchmarks/data_throughput.py --smoke --output /tmp/bench   # seconds
"""

from __future__ import annotations

import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from harness import EXPERIMENTS, bench_parser, environment, write_result
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import default_loader

from flora_ray.config import load_config
from flora_ray.data.transforms import RE_PROB, Preprocess, folder_transforms

RECIPE = EXPERIMENTS / "deit_small_imagenet.yaml"
WIDTH, HEIGHT = 500, 375  # ImageNet's median image size
JPEG_QUALITY = 90
IMG_SIZE = 224
WORKERS = (0, 1, 2)

# Published GPU training throughput of DeiT-S, from timm's own benchmark results (train step: forward, backward,
# optimiser step, synthetic input, AMP). File results/benchmark-train-amp-nchw-pt112-cu113-rtx3090.csv of
# https://github.com/huggingface/pytorch-image-models, last changed in commit c865028c34fc05cc7deea8e753b30d8cd1952591
# (2022-07-27) and unchanged at aa4b5850c1543fa488abf260f18390eda46cf85d (2026-08-08); its row:
#   deit_small_patch16_224,1053.64,363.563,384,224,22.05
#   (model, train_samples_per_sec, train_step_time ms, train_batch_size, train_img_size, param_count M)
# timm publishes training figures only for the RTX 3090 (no A100 / H100 training benchmark in results/).
PUBLISHED_GPU = {
    "model": "deit_small_patch16_224",
    "gpu": "NVIDIA GeForce RTX 3090",
    "precision": "AMP float16, NCHW, PyTorch 1.12, CUDA 11.3",
    "batch_size": 384,
    "img_size": 224,
    "train_samples_per_sec": 1053.64,
    "train_step_time_ms": 363.563,
    "repo": "huggingface/pytorch-image-models",
    "path": "results/benchmark-train-amp-nchw-pt112-cu113-rtx3090.csv",
    "commit": "c865028c34fc05cc7deea8e753b30d8cd1952591",
    "checked_at_commit": "aa4b5850c1543fa488abf260f18390eda46cf85d",
}
# A newer GPU, scaled (an estimate, not a published training figure): timm's inference benchmarks at the same
# PyTorch 2.4.0 / CUDA 12.4, AMP, NCHW, batch 1024, deit_small_patch16_224 infer_samples_per_sec:
#   results/benchmark-infer-amp-nchw-pt240-cu124-rtx4090.csv: 7687.89; ...-rtx3090.csv: 4586.09
# (both at commit 5c33776aa59f0f05bfb8008ff546ed4c09083f1a). Ratio 1.676, applied to the RTX 3090 training figure.
SCALED_GPU = {
    "gpu": "NVIDIA GeForce RTX 4090 (estimate)",
    "inference_ratio_to_published_gpu": 7687.89 / 4586.09,
    "inference_files": [
        "results/benchmark-infer-amp-nchw-pt240-cu124-rtx4090.csv",
        "results/benchmark-infer-amp-nchw-pt240-cu124-rtx3090.csv",
    ],
    "commit": "5c33776aa59f0f05bfb8008ff546ed4c09083f1a",
}
# The supernet step (train.sampler lowrank, pure distillation) runs the dense teacher's forward pass besides the
# subnet's forward and backward. A training step costs about 3 forward passes (backward ~ 2 x forward), so with the
# subnet at the dense model's cost the step is 4/3 of dense training and images/s are 3/4 of it. Smaller sampled
# subnets make the step cheaper, up to about the dense step: the dense figure is the upper end.
SUPERNET_STEP_FACTOR = 3 / 4


def jpeg_pixels(rng: np.random.Generator) -> np.ndarray:
    """One 500x375 RGB image with photo-like statistics for a JPEG coder: a bilinear colour gradient, soft coloured
    blobs, texture at four scales and pixel noise (not flat colour: decode cost grows with the coded detail)."""
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    yy, xx = (yy / HEIGHT)[..., None], (xx / WIDTH)[..., None]
    corners = rng.uniform(0, 255, (4, 3)).astype(np.float32)
    img = (
        corners[0] * (1 - xx) * (1 - yy)
        + corners[1] * xx * (1 - yy)
        + corners[2] * (1 - xx) * yy
        + corners[3] * xx * yy
    )
    for _ in range(int(rng.integers(3, 8))):
        cx, cy, r = rng.uniform(0, WIDTH), rng.uniform(0, HEIGHT), rng.uniform(20, 150)
        mask = np.exp(-((xx * WIDTH - cx) ** 2 + (yy * HEIGHT - cy) ** 2) / (2 * r * r))
        img = img * (1 - mask) + mask * rng.uniform(0, 255, 3).astype(np.float32)
    for cell, amplitude in ((32, 30.0), (8, 20.0), (2, 22.0), (1, 10.0)):
        coarse = rng.normal(0, 1, (HEIGHT // cell + 2, WIDTH // cell + 2, 3))
        coarse_u8 = np.clip(coarse * 40 + 128, 0, 255).astype(np.uint8)
        size = (WIDTH + 2 * cell, HEIGHT + 2 * cell)
        fine = np.asarray(Image.fromarray(coarse_u8).resize(size, Image.BICUBIC), np.float32)[:HEIGHT, :WIDTH]
        img = img + (fine - 128) / 40 * amplitude
    img = img + rng.normal(0, 5, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def write_jpeg_folder(root: Path, classes: int, per_class: int, seed: int = 0) -> dict:
    """``root/<class>/<i>.JPEG`` files; returns their count and mean size."""
    sizes = []
    for c in range(classes):
        folder = root / f"n{c:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            path = folder / f"n{c:08d}_{i:05d}.JPEG"
            pixels = jpeg_pixels(np.random.default_rng([seed, c, i]))
            Image.fromarray(pixels, mode="RGB").save(path, format="JPEG", quality=JPEG_QUALITY)
            sizes.append(path.stat().st_size)
    return {
        "images": len(sizes),
        "classes": classes,
        "width": WIDTH,
        "height": HEIGHT,
        "jpeg_quality": JPEG_QUALITY,
        "mean_kb": sum(sizes) / len(sizes) / 1e3,
    }


def transforms() -> dict[tuple[str, bool], object]:
    """(kind, pixels): the project's transform."""
    out = {}
    for pixels in (False, True):
        train_tf, eval_tf = folder_transforms(
            IMG_SIZE, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, augment=True, pixels=pixels
        )
        out[("train", pixels)], out[("eval", pixels)] = train_tf, eval_tf
    return out


def cpu_counters() -> tuple[float, float, float]:
    """Wall seconds, the machine's busy CPU seconds (``/proc/stat``, all processes) and this process's CPU seconds
    with its waited-for children (the loader workers of finished passes)."""
    fields = [float(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    tick = os.sysconf("SC_CLK_TCK")
    own = sum(
        u.ru_utime + u.ru_stime for u in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    )
    return time.perf_counter(), (sum(fields) - idle) / tick, own


def cpu_share(before: tuple[float, float, float], after: tuple[float, float, float]) -> dict:
    """Average cores busy over the interval: on the whole machine, in this benchmark, and the difference (other
    processes: what a shared machine took from the measurement)."""
    wall = after[0] - before[0]
    machine, own = (after[1] - before[1]) / wall, (after[2] - before[2]) / wall
    return {"wall_s": wall, "machine_cores_busy": machine, "benchmark_cores": own, "other_cores": machine - own}


def one_pass(loader: DataLoader) -> tuple[int, float, float]:
    """Images, seconds of a full pass (worker start included) and seconds to the first batch."""
    started = time.perf_counter()
    first = None
    images = 0
    for _, labels in loader:
        if first is None:
            first = time.perf_counter() - started
        images += len(labels)
    return images, time.perf_counter() - started, first or 0.0


def loader_rows(root: Path, tfs: dict, batch: int, rounds: int) -> list[dict]:
    """Images/s of every (transform, pixels, workers) configuration: a warm-up pass each, then ``rounds`` rounds of
    one timed pass of each configuration in turn."""
    loaders = {}
    for (kind, pixels), tf in tfs.items():
        dataset = ImageFolder(str(root), transform=tf)
        for workers in WORKERS:
            loaders[(kind, pixels, workers)] = DataLoader(
                dataset, batch_size=batch, shuffle=False, num_workers=workers, persistent_workers=False
            )
    for loader in loaders.values():
        one_pass(loader)  # warm-up: page cache, allocator, lazy imports
    passes: dict[tuple, list[tuple[int, float, float]]] = {key: [] for key in loaders}
    cpu: dict[tuple, list[dict]] = {key: [] for key in loaders}
    for _ in range(rounds):
        for key, loader in loaders.items():
            before = cpu_counters()
            passes[key].append(one_pass(loader))
            cpu[key].append(cpu_share(before, cpu_counters()))
    rows = []
    for key, timed in passes.items():
        kind, pixels, workers = key
        images = sum(p[0] for p in timed)
        seconds = sum(p[1] for p in timed)
        rows.append(
            {
                "transform": kind,
                "pixels": pixels,
                "output": "uint8" if pixels else "float32",
                "workers": workers,
                "batch": batch,
                "passes": len(timed),
                "images": images,
                "seconds": seconds,
                "images_per_s": images / seconds,
                "images_per_s_per_worker": images / seconds / max(workers, 1),
                "median_pass_s": statistics.median(p[1] for p in timed),
                "median_first_batch_s": statistics.median(p[2] for p in timed),
                # Average cores busy during the timed passes: whole machine, this benchmark, other processes.
                "machine_cores_busy": statistics.mean(c["machine_cores_busy"] for c in cpu[key]),
                "benchmark_cores": statistics.mean(c["benchmark_cores"] for c in cpu[key]),
                # Images per CPU second of this benchmark's processes (loader workers and the main process): what
                # one fully available core would deliver, less sensitive to other jobs than images/s.
                "images_per_cpu_s": images / sum(c["benchmark_cores"] * c["wall_s"] for c in cpu[key]),
                "other_cores": statistics.mean(c["other_cores"] for c in cpu[key]),
            }
        )
        print_row(rows[-1])
    return rows


def stage_split(root: Path, tfs: dict, images: int) -> list[dict]:
    """Single process: mean CPU ms per image (``time.process_time``: this process only, one torch thread) of the
    decode (``default_loader``: open + convert to RGB) and of each transform in the chain, over the first ``images``
    files."""
    paths = [path for path, _ in ImageFolder(str(root)).samples][:images]
    rows = []
    for (kind, pixels), tf in tfs.items():
        stages: dict[str, float] = {"decode": 0.0}
        for path in paths:
            started = time.process_time()
            x = default_loader(path)
            stages["decode"] += time.process_time() - started
            for t in tf.transforms:
                started = time.process_time()
                x = t(x)
                name = type(t).__name__
                stages[name] = stages.get(name, 0.0) + time.process_time() - started
        ms = {name: 1e3 * s / len(paths) for name, s in stages.items()}
        rows.append({"transform": kind, "pixels": pixels, "images": len(paths), "ms": ms, "total_ms": sum(ms.values())})
        parts = ", ".join(f"{name} {v:.2f}" for name, v in ms.items())
        print(f"  split {kind:<5} pixels={pixels!s:<5}: {sum(ms.values()):6.2f} ms/image ({parts})", flush=True)
    return rows


def preprocess_cost(root: Path, tfs: dict, batch: int, repeats: int) -> dict:
    """CPU ms per image (``time.process_time``, one thread) of ``Preprocess(mean, std, erase_prob=0.25)`` on a uint8
    train batch (train=True: normalise
    and erase; train=False: normalise only), median over ``repeats`` calls; at the loader's batch size and at 8
    (fresh float tensors of a 64-image batch are 38 MB each: allocation and memory traffic weigh more)."""
    loader = DataLoader(ImageFolder(str(root), transform=tfs[("train", True)]), batch_size=batch, num_workers=0)
    x, _ = next(iter(loader))
    assert x.dtype == torch.uint8
    pre = Preprocess(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, erase_prob=RE_PROB)
    by_batch = {}
    for size in sorted({len(x), min(8, len(x))}):
        xb = x[:size].contiguous()
        timed = {}
        for train in (True, False):
            pre(xb, train=train)  # warm-up
            times = []
            for _ in range(repeats):
                started = time.process_time()
                pre(xb, train=train)
                times.append(time.process_time() - started)
            timed["train_ms_per_image" if train else "eval_ms_per_image"] = 1e3 * statistics.median(times) / size
        by_batch[size] = timed
        print(
            f"  Preprocess on CPU (batch {size}): train {timed['train_ms_per_image']:.3f} ms/image (normalise + "
            f"erase {RE_PROB}), eval {timed['eval_ms_per_image']:.3f} ms/image (normalise)",
            flush=True,
        )
    return {"batch": len(x), "erase_prob": RE_PROB, "repeats": repeats, **by_batch[len(x)], "by_batch": by_batch}


def cores_per_gpu(rows: list[dict]) -> dict:
    """Cores one GPU needs: its training images/s over one loader worker's train-transform images per CPU second
    (the 1-worker row; its images/s per wall second, lowered by other jobs on a shared machine, too)."""
    recipe = load_config(RECIPE)
    dense = PUBLISHED_GPU["train_samples_per_sec"]
    gpus = {
        PUBLISHED_GPU["gpu"]: dense,
        SCALED_GPU["gpu"]: dense * SCALED_GPU["inference_ratio_to_published_gpu"],
    }
    one_worker = [r for r in rows if r["transform"] == "train" and r["workers"] == 1]
    per_core = {r["output"]: r["images_per_cpu_s"] for r in one_worker}  # one loader process on one core
    per_core_wall = {r["output"]: r["images_per_s"] for r in one_worker}
    estimates = []
    for gpu, images_per_s in gpus.items():
        for step, factor in (
            ("supernet step (teacher forward + subnet at dense cost)", SUPERNET_STEP_FACTOR),
            ("dense training", 1.0),
        ):
            gpu_images_per_s = images_per_s * factor
            estimates.append(
                {
                    "gpu": gpu,
                    "published": gpu == PUBLISHED_GPU["gpu"],
                    "step": step,
                    "gpu_images_per_s": gpu_images_per_s,
                    "cores_needed": {out: gpu_images_per_s / v for out, v in per_core.items()},
                    "cores_needed_from_wall_rate": {out: gpu_images_per_s / v for out, v in per_core_wall.items()},
                }
            )
    return {
        "recipe": str(RECIPE.relative_to(EXPERIMENTS.parent)),
        "recipe_batch_per_gpu": recipe.train.batch_size,
        "recipe_cpus_per_worker": recipe.scaling.cpus_per_worker,
        "published_gpu": PUBLISHED_GPU,
        "scaled_gpu": SCALED_GPU,
        "supernet_step_factor": SUPERNET_STEP_FACTOR,
        "per_core_train_images_per_s": per_core,
        "per_core_train_images_per_s_wall": per_core_wall,
        "estimates": estimates,
        "assumptions": [
            "the GPU figure is timm's at batch 384; the recipe's 128 per GPU is assumed to run at the same images/s",
            "supernet step = dense training step + the teacher's forward pass (+1/3), subnet at the dense cost",
            "per core = images per CPU second of one DataLoader worker process (train transform, with the main "
            "process's small share) on this machine's CPU; the training process itself needs its own core on top",
        ],
    }


def print_row(r: dict) -> None:
    print(
        f"{r['transform']:<5} {r['output']:<7} workers {r['workers']}  {r['images_per_s']:8.1f} images/s  "
        f"{r['images_per_s_per_worker']:7.1f} per worker  {r['images_per_cpu_s']:7.1f} per CPU s  (median pass "
        f"{r['median_pass_s']:.2f} s, first batch {r['median_first_batch_s']:.2f} s; cores busy: benchmark "
        f"{r['benchmark_cores']:.2f}, other processes {r['other_cores']:.2f})",
        flush=True,
    )


def print_cores(c: dict) -> None:
    g = c["published_gpu"]
    print(
        f"GPU: {g['model']} training on {g['gpu']}, {g['precision']}, batch {g['batch_size']}: "
        f"{g['train_samples_per_sec']} images/s ({g['repo']} {g['path']} @ {g['commit'][:12]})"
    )
    print(
        "per core (1 loader worker, train transform, images per CPU second): "
        + ", ".join(f"{k} {v:.1f} images/s" for k, v in c["per_core_train_images_per_s"].items())
    )
    for e in c["estimates"]:
        cores = ", ".join(f"{k} {v:.1f}" for k, v in e["cores_needed"].items())
        print(f"  {e['gpu']:<36} {e['step']:<55} {e['gpu_images_per_s']:7.1f} images/s -> cores per GPU: {cores}")
    print(f"recipe: batch {c['recipe_batch_per_gpu']} per GPU, scaling.cpus_per_worker {c['recipe_cpus_per_worker']}")


def main() -> None:
    parser = bench_parser(
        __doc__,
        smoke={"classes": 2, "per_class": 12, "batch": 8, "rounds": 1, "split_images": 8},
        smoke_help="24 images, batch 8, one timed round: seconds",
    )
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--per-class", type=int, default=64, help="JPEG files per class")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="timed passes per configuration")
    parser.add_argument("--split-images", type=int, default=128, help="images of the single-process split")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the 0-worker rows use one core, as each worker process does
    torch.manual_seed(0)
    env_before = environment(1)
    started = time.perf_counter()
    tfs = transforms()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "train"
        folder = write_jpeg_folder(root, args.classes, args.per_class)
        print(
            f"{folder['images']} JPEG files {WIDTH}x{HEIGHT}, quality {JPEG_QUALITY}, mean {folder['mean_kb']:.1f} KB "
            f"({time.perf_counter() - started:.1f} s to write)",
            flush=True,
        )
        rows = loader_rows(root, tfs, args.batch, args.rounds)
        split = stage_split(root, tfs, args.split_images)
        preprocess = preprocess_cost(root, tfs, args.batch, repeats=5 if args.smoke else 20)
    cores = cores_per_gpu(rows)
    print_cores(cores)
    result = {
        "smoke": args.smoke,
        "folder": folder,
        "transforms": {f"{k} pixels={p}": repr(tf) for (k, p), tf in tfs.items()},
        "rows": rows,
        "split": split,
        "preprocess": preprocess,
        "cores_per_gpu": cores,
        "rounds": args.rounds,
        "seconds": time.perf_counter() - started,
        **environment(1),
        "loadavg_before": env_before["loadavg"],
    }
    print(f"wrote {write_result(args.output / 'data_throughput.json', result)}")


if __name__ == "__main__":
    main()

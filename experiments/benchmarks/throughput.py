"""Throughput: supernet training and subnet evaluation images/s, as achieved GMAC/s next to the dense matmul peak.

Training runs flora-ray's own training loop (``training.trainer.Trainer`` on a ``training.tasks.SupernetTask`` with a
``LocalSession``, one process): batches from its Fashion-MNIST loader, the teacher's forward pass, one sampled
subnet's forward and backward pass with the distillation loss, gradient clipping and the AdamW step; a callback
times each step (from the end of the previous one, so data loading is included) after the warm-up steps. Achieved GMAC/s counts the teacher forward (dense MACs)
plus three times the sampled subnet's forward MACs (forward, and a backward pass of twice the forward's work).
Evaluation runs the search's ``Evaluator`` (inherited supernet weights, fixed search images) on random
configurations; GMAC/s is images x subnet MACs / seconds. The physical limit is the best GMAC/s of large square
float32 ``torch.mm`` on the same thread count. The supernet-step / subnet-step ratio of the training issue is
re-measured as ``supernet_step.py`` measures it (``harness_workloads``). Weights are random (the teacher is a
random-init model).
Prints a table, writes ``results/throughput.json``.

    .venv/bin/python experiments/benchmarks/throughput.py            # full run (a few minutes on 2 CPU cores)
    .venv/bin/python experiments/benchmarks/throughput.py --smoke    # quickstart model, a few steps, seconds
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from harness import EXPERIMENTS, bench_parser, environment, write_result
from harness_workloads import STEP_WORKLOADS, configs_for, interleaved_step_times

import flora_ray as fr
from flora_ray.config import Config, load_config
from flora_ray.core.models import dense_checkpoint_metadata
from flora_ray.data.datasets import DataSplits, build_datasets
from flora_ray.search.evaluator import Evaluator, search_batch
from flora_ray.stages.inputs import build_run_supernet, resolve_model_spec
from flora_ray.storage.run_store import ARTEFACTS, RunStore
from flora_ray.training.sampling import build_sampler
from flora_ray.training.tasks import SupernetTask
from flora_ray.training.trainer import Callback, LocalSession, Trainer
from flora_ray.training.worker import distributed_loader

# name: dotted overrides of experiments/quickstart.yaml
WORKLOADS = {
    "quickstart-vit": ["search.eval_images=2000"],
    "deit-tiny-224": [
        "model.name=deit_tiny_patch16_224",
        "model.kwargs={}",
        "model.ratios=null",
        "data.img_size=224",
        "data.in_chans=3",
        "train.batch_size=16",
        "search.eval_images=128",
        "search.batch_size=64",
    ],
}


def matmul_peak_gmacs_per_s(sizes: tuple[int, ...], repeats: int) -> dict:
    """Best GMAC/s of ``torch.mm`` on square float32 matrices of each size (the machine's dense peak)."""
    best = {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - start)
        best[n] = n**3 / min(times) / 1e9
    return {"by_size": best, "peak_gmacs_per_s": max(best.values())}


@dataclasses.dataclass
class Workload:
    """A supernet training run of the quickstart config, ready to train (``task``) and evaluate (``splits``)."""

    cfg: Config
    splits: DataSplits
    task: SupernetTask
    session: LocalSession


def build_workload(overrides: list[str], run_dir: Path) -> Workload:
    """flora-ray's supernet task for a run of the quickstart config (random-init teacher written first), as the
    ``train`` stage's worker builds it."""
    cfg: Config = load_config(
        EXPERIMENTS / "quickstart.yaml", [*overrides, f"run.output_dir={run_dir}", "run.name=throughput"]
    )
    spec = resolve_model_spec(cfg)
    store = RunStore.for_config(cfg)
    store.write_checkpoint(ARTEFACTS.teacher, spec.create().state_dict(), dense_checkpoint_metadata(spec))
    session = LocalSession()  # one process, no checkpoints
    supernet, teacher = build_run_supernet(cfg, store, session.device)
    opt = cfg.train
    task = SupernetTask(
        supernet,
        teacher,
        build_sampler(opt.sampler, supernet.space),
        cfg.run.seed,
        opt.temperature,
        opt.label_weight,
        opt.label_smoothing,
        distill_from=opt.distill_from,
    )
    return Workload(cfg, build_datasets(cfg.data), task, session)


class FirstBatches:
    """The first ``n`` batches of a loader, loaded as the trainer iterates (data loading stays in the step time)."""

    def __init__(self, loader, n: int) -> None:
        self.loader, self.n = loader, min(n, len(loader))

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return itertools.islice(iter(self.loader), self.n)


class StepTimer(Callback):
    """Wall time of each training step after ``warmup`` ones, and the MACs of its work (teacher + 3 x subnet)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.times: list[float] = []
        self.macs: list[float] = []
        self.last = 0.0

    def on_epoch_start(self, trainer: Trainer) -> None:
        self.last = time.perf_counter()

    def on_step_end(self, trainer: Trainer, step: int, images: int) -> None:
        now = time.perf_counter()
        if step > self.warmup:
            cost = trainer.task.supernet.cost
            self.times.append(now - self.last)
            self.macs.append(cost.dense_macs + 3 * cost.macs(trainer.task.supernet.active_ranks()))
        self.last = time.perf_counter()  # the bookkeeping above is not part of the next step


def training_throughput(workload: Workload, steps: int, warmup: int) -> dict:
    """Images/s and achieved GMAC/s of supernet training steps, data loading included."""
    cfg = workload.cfg
    # One epoch of warmup + steps batches (no LR warm-up: the schedule does not change the work of a step).
    opt = dataclasses.replace(cfg.train, epochs=1, warmup_epochs=0)
    loader, sampler = distributed_loader(workload.splits.train, opt.batch_size, 1, 0, cfg.run.seed, "train")
    timer = StepTimer(warmup)
    trainer = Trainer(
        workload.task,
        opt,
        workload.session,
        FirstBatches(loader, warmup + steps),
        "train",
        [timer],
        train_sampler=sampler,
        evaluate=False,
    )
    trainer.fit()
    cost, times, macs = workload.task.supernet.cost, timer.times, timer.macs
    batch = opt.batch_size
    return {
        "batch": batch,
        "steps": len(times),
        "step_ms": 1e3 * statistics.median(times),
        "images_per_s": batch * len(times) / sum(times),
        "gmacs_per_s": batch * sum(macs) / sum(times) / 1e9,
        "mean_subnet_gmacs_per_image": (statistics.mean(macs) - cost.dense_macs) / 3 / 1e9,
    }


def evaluation_throughput(workload: Workload, n_configs: int) -> dict:
    """Images/s and achieved GMAC/s of the search's ``Evaluator`` on random configurations."""
    cfg, supernet = workload.cfg, workload.task.supernet
    images, labels = search_batch(workload.splits.search, cfg.search.eval_images)
    evaluator = Evaluator(supernet, images, labels, "cpu", cfg.search.batch_size)
    space, rng = supernet.space, random.Random(0)
    evaluator.evaluate(space.largest())  # warm-up
    seconds, macs = 0.0, 0.0
    for _ in range(n_configs):
        metrics = evaluator.evaluate(space.from_block_tuples([rng.choice(b.candidates) for b in space.blocks]))
        seconds += metrics["eval_seconds"]
        macs += metrics["macs"] * len(labels)
    return {
        "images": len(labels),
        "configs": n_configs,
        "batch": cfg.search.batch_size,
        "images_per_s": n_configs * len(labels) / seconds,
        "gmacs_per_s": macs / seconds / 1e9,
        "mean_subnet_gmacs_per_image": macs / n_configs / len(labels) / 1e9,
    }


def step_ratios(smoke: bool, steps: int) -> list[dict]:
    """Supernet-step / extracted-subnet-step ratios as ``supernet_step.py`` measures them (its workloads and
    configurations, ``harness_workloads``)."""
    names = ["quickstart-vit"] if smoke else list(STEP_WORKLOADS)
    rows = []
    for workload in names:
        name, kwargs, batch = STEP_WORKLOADS[workload]
        supernet = fr.build_supernet(name, model_kwargs=kwargs)
        model = supernet.model
        x = torch.randn(batch, model.patch_embed.proj.in_channels, *model.patch_embed.img_size)
        y = torch.randint(0, model.num_classes, (batch,))
        configs = list(configs_for(supernet.space, random.Random(0)).items())
        for label, config in configs[:2] if smoke else configs:
            supernet.set_ranks(config)
            subnet = fr.extract_subnet(supernet, config)
            t_super, t_sub = interleaved_step_times([supernet, subnet], x, y, steps, 1 if smoke else 3)
            rows.append(
                {
                    "workload": workload,
                    "config": label,
                    "supernet_step_ms": 1e3 * t_super,
                    "subnet_step_ms": 1e3 * t_sub,
                    "ratio": t_super / t_sub,
                }
            )
    return rows


def main() -> None:
    parser = bench_parser(
        __doc__, smoke={"steps": 3, "configs": 2, "ratio_steps": 2}, smoke_help="quickstart model, a few steps, seconds"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads for everything, the peak included")
    parser.add_argument("--steps", type=int, default=12, help="timed training steps per workload")
    parser.add_argument("--configs", type=int, default=4, help="evaluated configurations per workload")
    parser.add_argument("--ratio-steps", type=int, default=10, help="steps per configuration of the step ratio")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    loadavg_before = list(os.getloadavg())
    started = time.perf_counter()
    peak = matmul_peak_gmacs_per_s((512, 1024) if args.smoke else (1024, 2048, 3072), 2 if args.smoke else 5)
    print(
        f"dense matmul peak ({args.threads} threads): {peak['peak_gmacs_per_s']:.1f} GMAC/s "
        f"({', '.join(f'n={n}: {g:.1f}' for n, g in peak['by_size'].items())})",
        flush=True,
    )
    workloads = {"quickstart-vit": WORKLOADS["quickstart-vit"]} if args.smoke else WORKLOADS
    rows = []
    for workload, overrides in workloads.items():
        with tempfile.TemporaryDirectory() as tmp:
            run = build_workload(overrides + (["search.eval_images=128"] if args.smoke else []), Path(tmp))
            train = training_throughput(run, args.steps, 1 if args.smoke else 2)
            evaluation = evaluation_throughput(run, args.configs)
        for kind, r in (("supernet training", train), ("subnet evaluation", evaluation)):
            r.update(workload=workload, kind=kind, share_of_peak=r["gmacs_per_s"] / peak["peak_gmacs_per_s"])
            rows.append(r)
            print(
                f"{workload:<15} {kind:<18} batch {r['batch']:>3}  {r['images_per_s']:8.1f} images/s  "
                f"{r['gmacs_per_s']:7.2f} GMAC/s  ({100 * r['share_of_peak']:4.1f}% of peak)",
                flush=True,
            )
    ratios = step_ratios(args.smoke, args.ratio_steps)
    for r in ratios:
        print(
            f"{r['workload']:<15} {r['config']:<14} supernet step {r['supernet_step_ms']:8.1f} ms  "
            f"subnet step {r['subnet_step_ms']:8.1f} ms  ratio {r['ratio']:.3f}",
            flush=True,
        )
    worst = max(r["ratio"] for r in ratios)
    print(f"worst supernet/subnet step ratio: {worst:.3f} (target <= 1.15)")
    result = {
        "smoke": args.smoke,
        "matmul_peak": peak,
        "rows": rows,
        "step_ratios": ratios,
        "worst_step_ratio": worst,
        "seconds": time.perf_counter() - started,
        **environment(args.threads),
        "loadavg_before": loadavg_before,
    }
    print(f"wrote {write_result(args.output / 'throughput.json', result)}")


if __name__ == "__main__":
    main()

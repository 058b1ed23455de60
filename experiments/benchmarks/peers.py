"""flora-ray against structural pruning (issue 32): Torch-Pruning's head and MLP pruning of a timm ViT, NVIDIA
ModelOpt where it runs, uniform low rank, and flora-ray on top of a pruned model, at fixed fractions of dense MACs.

On one finished run (its teacher, supernet and front; default ``runs/proving_ground``), at each budget (25%, 33% and
50% of dense MACs):

- **flora**: the front's most accurate point within the budget (``Run.best_under``);
- **uniform**: the most accurate uniform-rank configuration within the budget (``Run.uniform``, search accuracy);
- **tp_magnitude**, **tp_taylor**: Torch-Pruning (``torch_pruning.pruner.BasePruner``) as its timm ViT example
  (``examples/transformers/prune_timm_vit.py``) with ``--bottleneck --prune_num_heads``: whole attention heads
  (``head_pruning_ratio``) and MLP hidden units (``pruning_ratio``) removed by group importance (L2 magnitude, or
  first-order Taylor from gradients of the cross-entropy on ``--taylor-batches`` training batches), the head and every
  ``fc2`` ignored so the residual width stays. For each head count the MLP ratio is bisected to the largest model
  within the budget (exact MACs, ``core.cost``); of the head counts that reach it, the one most accurate on the
  run's search images before fine-tuning is kept. timm 1.0's ``Attention`` reshapes to ``attn_dim`` (not ``C`` as the
  example's timm did), so instead of the example's replacement ``forward`` the pruned modules' ``num_heads``,
  ``head_dim`` and ``attn_dim`` are set (``core.families.vit.set_attention_heads``);
- **flora_on_tp**: flora-ray on top of a Torch-Pruning model: the teacher pruned (magnitude) to ``--combo-base`` of
  dense MACs and fine-tuned is the teacher and the starting point of a supernet over the run's rank ratios (no
  filtering: every triple; ``--combo-epochs`` of supernet training with the run's ``train`` recipe), searched by
  flora-ray's NSGA-II in this process (``harness_runs.nsga2_search``, ``--combo-trials`` on ``--combo-images``
  search images); at each budget (of the original dense MACs) its most accurate searched point within it, fine-tuned
  from the pruned teacher.

Every chosen model is fine-tuned with the same schedule (``stages.finetune.finetune_model``: the run's ``finetune``
recipe, ``--epochs``) from the run's teacher (the combination: from the pruned teacher) and scored on the whole test
split; differences to flora are paired (``results.paired_difference``). MACs come from the cost model and are
checked against ``FlopCounterMode``; latency is ``core.timing.forward_ms`` at batch 1 and 32, one thread,
the fastest of ``--rounds`` interleaved rounds. Compute: this script's wall and CPU seconds per method, plus for
flora and uniform the run's own filter, supernet and search stage seconds (the teacher is shared by all).

    python experiments/benchmarks/peers.py --run runs/proving_ground       # writes results/peers_proving_ground.json
    python experiments/benchmarks/peers.py --smoke --output /tmp/bench     # a digits run, in seconds (tests)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import importlib.metadata
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import numpy as np
import torch
from harness import bench_parser, environment, write_result
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import flora_ray as fr
from flora_ray.config import Config, config_to_dict, load_config
from flora_ray.core.cost import build_cost_model
from flora_ray.core.families.vit import set_attention_heads
from flora_ray.core.supernet import build_supernet
from flora_ray.core.timing import forward_ms, torch_threads
from flora_ray.data.datasets import build_datasets
from flora_ray.results import pack_correct, paired_difference, pareto_mask, unpack_correct
from flora_ray.search.evaluator import Evaluator, search_batch
from flora_ray.stages.finetune import finetune_model
from flora_ray.stages.inputs import load_teacher
from flora_ray.training.callbacks import Progress
from flora_ray.training.sampling import build_sampler
from flora_ray.training.tasks import SupernetTask
from flora_ray.training.trainer import LocalSession, Trainer
from flora_ray.training.worker import distributed_loader

try:
    import torch_pruning as tp
except ImportError:  # the bench extra is not installed
    tp = None

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BUDGETS = (0.25, 1 / 3, 0.5)
TOLERANCE = 0.02  # a model reaches its budget when its MACs are at most 2% above it
SMOKE = ["model.name=test_vit", "model.kwargs={patch_size: 2, embed_dim: 32, depth: 2, num_heads: 4, mlp_ratio: 2}",
         "model.ratios=[0.125, 0.25, 0.5, 1.0]", "data.name=digits", "data.img_size=8", "data.in_chans=1",
         "data.augment=false", "pretrain.epochs=3", "pretrain.lr=0.003", "pretrain.warmup_epochs=0",
         "filter.mode=zero_training", "filter.eval_images=100", "train.epochs=1", "train.warmup_epochs=0",
         "train.eval_images=100", "search.trials=12", "search.population=4", "search.eval_images=150",
         "search.concurrency=1", "finetune.eval_images=100", "finetune.warmup_epochs=0", "profile.enabled=false",
         "run.threads_per_worker=1", "run.name=peers-smoke"]  # fmt: skip


# --- models, scores and costs ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def unfused_attention(model: nn.Module) -> Iterator[None]:
    """timm's attention without the fused kernel (which FlopCounterMode does not see), restored afterwards."""
    modules = [m for m in model.modules() if hasattr(m, "fused_attn")]
    saved = [m.fused_attn for m in modules]
    for m in modules:
        m.fused_attn = False
    try:
        yield
    finally:
        for m, fused in zip(modules, saved, strict=True):
            m.fused_attn = fused


def counted_macs(model: nn.Module, shape: tuple[int, ...]) -> int:
    """MACs of one image as PyTorch's FlopCounterMode counts them (flops / 2)."""
    model.eval()
    with unfused_attention(model), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, *shape))
    return counter.get_total_flops() // 2


def model_macs(model: nn.Module) -> int:
    """MACs per image of a dense timm ViT (also a pruned one: any head count and MLP width per block) from the
    analytic cost model; a low-rank subnet's are its supernet's ``cost.macs(ranks)``."""
    return build_cost_model(model).dense_macs


class Scorer:
    """Per-image correctness of any model on fixed images (the run's test split, or search images)."""

    def __init__(self, supernet: fr.Supernet, images: torch.Tensor, labels: torch.Tensor, batch: int) -> None:
        self.evaluator = Evaluator(supernet, images, labels, "cpu", batch)

    def correct(self, model: nn.Module) -> np.ndarray:
        return self.evaluator.model_correct(model.eval())

    def accuracy(self, model: nn.Module) -> float:
        return 100.0 * float(self.correct(model).mean())


@contextlib.contextmanager
def spent(ledger: dict[str, float]) -> Iterator[None]:
    """Adds this block's wall and CPU (process) seconds to ``ledger``."""
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        ledger["wall_s"] = ledger.get("wall_s", 0.0) + time.perf_counter() - wall
        ledger["cpu_s"] = ledger.get("cpu_s", 0.0) + time.process_time() - cpu


# --- Torch-Pruning --------------------------------------------------------------------------------------------------


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {fqn: m for fqn, m in model.named_modules() if hasattr(m, "qkv") and hasattr(m, "num_heads")}


def tp_prune(
    base: nn.Module, importance: str, heads_removed: int, mlp_ratio: float, shape: tuple[int, ...]
) -> nn.Module:
    """A copy of ``base`` with ``heads_removed`` heads of every attention and ``mlp_ratio`` of every MLP's hidden
    units removed by Torch-Pruning's group ``importance`` (``magnitude`` or ``taylor``: then ``base`` carries the
    gradients), as ``prune_timm_vit.py --bottleneck --prune_num_heads`` does."""
    model = copy.deepcopy(base).requires_grad_(True)  # TP leaves frozen layers alone (a teacher is frozen)
    for param, source in zip(model.parameters(), base.parameters(), strict=True):
        param.grad = None if source.grad is None else source.grad.clone()  # Taylor importance reads them
    attns = attention_modules(model)
    heads = {m.qkv: m.num_heads for m in attns.values()}
    total = next(iter(heads.values()))
    imp = (
        tp.importance.GroupTaylorImportance() if importance == "taylor" else tp.importance.GroupMagnitudeImportance(p=2)
    )
    ignored = [model.head] + [m for fqn, m in model.named_modules() if fqn.endswith("mlp.fc2")]
    pruner = tp.pruner.BasePruner(model, torch.zeros(1, *shape), importance=imp, pruning_ratio=mlp_ratio,
                                  ignored_layers=ignored, num_heads=heads, prune_num_heads=heads_removed > 0,
                                  prune_head_dims=False, head_pruning_ratio=max(heads_removed - 0.5, 0) / total,  # TP removes ceil(ratio x heads)
                                  round_to=1, global_pruning=False)  # fmt: skip
    pruner.step()
    set_attention_heads(model, {fqn: pruner.num_heads[m.qkv] for fqn, m in attns.items()})
    model.zero_grad(set_to_none=True)
    return model.eval()


def taylor_gradients(model: nn.Module, splits: Any, batches: int, batch_size: int, seed: int) -> None:
    """Accumulate the cross-entropy gradients of ``batches`` training batches in ``model`` (the example's
    ``--taylor_batchs``)."""
    loader, _ = distributed_loader(splits.train, batch_size, 1, 0, seed, "taylor", device=torch.device("cpu"))
    model.requires_grad_(True).zero_grad()
    model.eval()  # no dropout in these models; the example runs the model as it is
    for i, (x, y) in enumerate(loader):
        if i >= batches:
            break
        x = splits.preprocess(x) if splits.preprocess is not None else x
        nn.functional.cross_entropy(model(x), y).backward()


def tp_at_budget(base: nn.Module, importance: str, budget: float, heads_removed: int, shape) -> nn.Module | None:
    """The largest pruned model within ``budget`` MACs at ``heads_removed`` heads per block (``None`` when even one
    MLP unit per block exceeds it). MACs are linear in the MLP width: two prunes give the line, the width it asks for
    is pruned, and narrowed by one unit until the exact cost is within the budget. A head count whose model is
    within the budget with every MLP unit keeps all but one (Torch-Pruning prunes heads only along with units)."""
    points = []
    for ratio in (0.25, 0.5):
        model = tp_prune(base, importance, heads_removed, ratio, shape)
        points.append((model.blocks[0].mlp.fc1.out_features, model_macs(model)))
    (w1, m1), (w2, m2) = points
    slope = (m1 - m2) / (w1 - w2)
    full = base.blocks[0].mlp.fc1.out_features
    # TP removes heads only together with some MLP units: at most full - 1 of them stay.
    width = min(int((budget - (m2 - slope * w2)) // slope), full - 1)
    for _ in range(4):
        if width < 1:
            return None
        model = tp_prune(base, importance, heads_removed, (full - width) / full, shape)
        if model_macs(model) <= budget:
            return model
        width -= 1
    raise RuntimeError(f"Torch-Pruning did not reach {budget:.0f} MACs at {heads_removed} heads removed")


def tp_choose(base: nn.Module, importance: str, budget: float, shape, search: Scorer) -> dict[str, Any]:
    """Torch-Pruning's best model within ``budget``: of the head counts that reach it, the one most accurate on the
    search images before fine-tuning."""
    total = next(iter(attention_modules(base).values())).num_heads
    tried = []
    for removed in range(total):
        model = tp_at_budget(base, importance, budget, removed, shape)
        if model is None:
            continue
        tried.append({"heads_removed": removed, "macs": model_macs(model), "search_accuracy": search.accuracy(model),
                      "model": model})  # fmt: skip
    if not tried:
        raise RuntimeError(f"Torch-Pruning cannot reach {budget:.0f} MACs by heads and MLP units alone")
    best = max(tried, key=lambda t: t["search_accuracy"])
    return {**best, "candidates": [{k: v for k, v in t.items() if k != "model"} for t in tried]}


def describe_pruned(model: nn.Module) -> dict[str, Any]:
    """Heads and MLP width per block of a pruned ViT."""
    return {
        "heads": [int(b.attn.num_heads) for b in model.blocks],
        "mlp_hidden": [int(b.mlp.fc1.out_features) for b in model.blocks],
    }


# --- flora-ray on top of a pruned model -----------------------------------------------------------------------------


def train_supernet(cfg: Config, supernet: fr.Supernet, teacher: nn.Module, splits: Any, epochs: int) -> list:
    """``epochs`` of supernet training (the run's ``train`` recipe: its sampler and distillation) by the one trainer."""
    opt = dataclasses.replace(cfg.train, epochs=epochs)
    teacher.eval().requires_grad_(False)
    loader, sampler = distributed_loader(splits.train, opt.batch_size, 1, 0, cfg.run.seed, "train",
                                         device=torch.device("cpu"), random_items=cfg.data.augment)  # fmt: skip
    task = SupernetTask(supernet, teacher, build_sampler(cfg.train.sampler, supernet.space), cfg.run.seed,
                        cfg.train.temperature, cfg.train.label_weight, search=splits.search,
                        eval_images=cfg.train.eval_images, distill_from=cfg.train.distill_from)  # fmt: skip
    return Trainer(task, opt, LocalSession(None, "cpu"), loader, "train", [Progress(opt.log_every)],
                   train_sampler=sampler, prepare=splits.preprocess).fit()  # fmt: skip


def search_pruned(cfg: Config, supernet: fr.Supernet, splits: Any, trials: int, images: int) -> list[dict[str, Any]]:
    """flora-ray's NSGA-II (``harness_runs.nsga2_search``: the search stage's sampler and anchors) over the
    supernet on ``images`` search images; every distinct evaluated configuration with its MACs and accuracy."""
    from harness_runs import nsga2_search

    x, y = search_batch(splits.search, images, cfg.data.seed)
    evaluator = Evaluator(supernet, x, y, "cpu", cfg.search.batch_size)
    seen: dict[tuple[int, ...], dict[str, Any]] = {}

    def evaluate(config: dict[str, int]) -> tuple[float, float]:
        key = tuple(int(config[f]) for f in supernet.space.fqns)
        if key not in seen:
            metrics = evaluator.evaluate(config)
            seen[key] = {"ranks": dict(config), "macs": metrics["macs"], "accuracy": metrics["accuracy"]}
        return seen[key]["macs"], seen[key]["accuracy"]

    nsga2_search(supernet.space, evaluate, cfg.search, trials, cfg.run.seed)
    return list(seen.values())


# --- measuring the chosen models ------------------------------------------------------------------------------------


def latencies(
    models: dict[str, nn.Module], shape: tuple[int, ...], rounds: int, runs: int
) -> dict[str, dict[str, float]]:
    """``forward_ms`` at batch 1 and 32, one thread, interleaved over models; the fastest round of each."""
    out: dict[str, dict[str, float]] = {name: {} for name in models}
    with torch_threads(1):
        for batch in (1, 32):
            x = torch.randn(batch, *shape)
            for _ in range(rounds):
                for name, model in models.items():
                    ms = forward_ms(model, x, runs=runs, warmup=3)
                    out[name][f"b{batch}_ms"] = min(out[name].get(f"b{batch}_ms", float("inf")), ms)
    return out


def stage_seconds(run: fr.Run) -> dict[str, float]:
    """The run's recorded stage wall times (``stages/*.json``)."""
    out = {}
    for stage in ("filter", "train", "search"):
        name = f"stages/{stage}.json"
        if run.store.is_file(name):
            out[stage] = float(json.loads(run.store.read_text(name, stage)).get("seconds", 0.0))
    return out


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for package in ("torch", "timm", "torch-pruning", "nvidia-modelopt", "flora-ray"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


def modelopt_prune(teacher: nn.Module, budget: float, dense: int, search: Scorer, shape) -> dict[str, Any]:
    """NVIDIA ModelOpt's FastNAS pruning (``modelopt.torch.prune.prune(mode="fastnas")``) of a copy of the teacher to
    ``budget`` MACs (its ``flops`` constraint as a share of its own count of the dense model), scored by accuracy on
    the search images; ``{"model": ...}`` or ``{"missing": why}``."""
    import modelopt.torch.prune as mtp

    model = copy.deepcopy(teacher).requires_grad_(True).eval()
    images, labels = search.evaluator.images, search.evaluator.labels
    loader = [(images[i : i + 100], labels[i : i + 100]) for i in range(0, min(len(labels), 500), 100)]
    config = {"data_loader": loader, "collect_func": lambda batch: batch[0], "score_func": lambda m: search.accuracy(m),
              "checkpoint": None, "max_iter_data_loader": len(loader)}  # fmt: skip
    try:
        pruned, _ = mtp.prune(model, mode="fastnas", constraints={"flops": f"{100 * budget / dense:.4f}%"},
                              dummy_input=torch.zeros(1, *shape), config=config)  # fmt: skip
    except Exception as error:  # an unsatisfiable constraint, or a model it cannot handle: say which
        return {"missing": f"ModelOpt FastNAS: {type(error).__name__}: {str(error).splitlines()[0][:300]}"}
    return {"model": pruned.eval(), "mlp_hidden": [int(b.mlp.fc1.out_features) for b in pruned.blocks]}


def modelopt_status() -> dict[str, Any]:
    """Whether NVIDIA ModelOpt's pruning imports here (it is not in the lock: the benchmarks README says why)."""
    try:
        import modelopt
        import modelopt.torch.prune
    except Exception as error:  # not installed, or its import fails
        return {"available": False, "reason": f"{type(error).__name__}: {error}"}
    return {"available": True, "version": modelopt.__version__}


# --- the benchmark --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Context:
    run: fr.Run
    cfg: Config
    splits: Any
    teacher: nn.Module
    shape: tuple[int, ...]
    supernet: fr.Supernet
    test: Scorer
    search: Scorer
    dense_macs: int
    recipe: dict[str, Any]


def open_context(run_dir: Path, epochs: int | None, search_images: int, train_subset: float | None = None) -> Context:
    """The run, its teacher and data (``train_subset``: the seeded class-balanced share of the training split that
    every fine-tune and the combination's supernet train on; the search and test splits are the run's)."""
    run = fr.Run.open(run_dir)
    cfg = run.config
    if train_subset is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train_subset=train_subset))
    splits = build_datasets(cfg.data, pixels=("train",))
    teacher = load_teacher(cfg, run.store)[0].eval()
    shape = (cfg.data.in_chans, cfg.data.img_size, cfg.data.img_size)
    supernet = run.supernet
    test_x, test_y = search_batch(splits.test, len(splits.test), 0)
    search_x, search_y = search_batch(splits.search, search_images, cfg.data.seed)
    recipe = {"epochs": epochs if epochs is not None else cfg.finetune.epochs}
    return Context(run, cfg, splits, teacher, shape, supernet, Scorer(supernet, test_x, test_y, cfg.search.batch_size),
                   Scorer(supernet, search_x, search_y, cfg.search.batch_size), model_macs(teacher), recipe)  # fmt: skip


def finetuned(ctx: Context, student: nn.Module, teacher: nn.Module, ledger: dict[str, float]) -> dict[str, Any]:
    """``student`` fine-tuned from ``teacher`` with the benchmark's schedule; its test figures."""
    with spent(ledger):
        result = finetune_model(ctx.cfg, student, teacher, splits=ctx.splits, evaluate_before=True, **ctx.recipe)
    model = result["model"]
    correct = ctx.test.correct(model)
    return {"model": model, "correct": correct, "eval_images": len(correct), "test_accuracy": 100.0 * float(correct.mean()),
            "test_accuracy_before": result["test_accuracy_before"], "finetune_s": result["seconds"]}  # fmt: skip


def _int_or_none(value: Any) -> int | None:
    import pandas as pd

    return None if pd.isna(value) else int(value)


def uniform_choice(run: fr.Run, budget: float) -> Any:
    uniform = run.uniform
    within = uniform[uniform["macs"] <= budget]
    return None if within.empty else within.loc[within["accuracy"].idxmax()]


def low_rank_rows(ctx: Context, budgets: list[float]) -> list[dict[str, Any]]:
    """flora (the front's choice) and uniform ranks at each budget, each fine-tuned once per distinct config."""
    rows, done = [], {}
    upstream = stage_seconds(ctx.run)
    for fraction in budgets:
        budget = fraction * ctx.dense_macs
        for method, row in (
            ("flora", ctx.run.best_under(max_macs=budget)),
            ("uniform", uniform_choice(ctx.run, budget)),
        ):
            if row is None:
                rows.append({"method": method, "budget": fraction, "missing": "no configuration within the budget"})
                continue
            ranks = json.loads(row["ranks"])
            key = json.dumps(ranks, sort_keys=True)
            ledger: dict[str, float] = {}
            if key not in done:
                with spent(ledger):
                    student = ctx.run.subnet_at(ranks)
                done[key] = finetuned(ctx, student, ctx.teacher, ledger) | {
                    "ledger": ledger,
                    "first": f"{method} at {fraction:.0%}",
                }
            result = done[key]
            rows.append({"method": method, "budget": fraction, "macs": ctx.supernet.cost.macs(ranks),
                         "choice": {"trial": _int_or_none(row["trial"]), "ratio": None if method == "flora" else float(row["ratio"]),
                                    "search_accuracy": float(row["accuracy"]), "ranks": ranks},
                         "same_model_as": None if result["first"] == f"{method} at {fraction:.0%}" else result["first"],
                         "compute": {**result["ledger"], "upstream_stage_s": upstream},
                         **{k: v for k, v in result.items() if k not in ("ledger", "first")}})  # fmt: skip
    return rows


def tp_rows(ctx: Context, budgets: list[float], importances: list[str], taylor_batches: int) -> list[dict[str, Any]]:
    rows = []
    for importance in importances:
        base = copy.deepcopy(ctx.teacher)
        prep: dict[str, float] = {}
        if importance == "taylor":
            with spent(prep):
                taylor_gradients(base, ctx.splits, taylor_batches, ctx.cfg.finetune.batch_size, ctx.cfg.run.seed)
        for fraction in budgets:
            ledger = dict(prep) if fraction == budgets[0] else {}
            with spent(ledger):
                chosen = tp_choose(base, importance, fraction * ctx.dense_macs, ctx.shape, ctx.search)
            result = finetuned(ctx, chosen["model"], ctx.teacher, ledger)
            rows.append({"method": f"tp_{importance}", "budget": fraction, "macs": model_macs(result["model"]),
                         "choice": {"heads_removed": chosen["heads_removed"], **describe_pruned(result["model"]),
                                    "search_accuracy": chosen["search_accuracy"], "candidates": chosen["candidates"]},
                         "compute": ledger, **result})  # fmt: skip
    return rows


def modelopt_rows(ctx: Context, budgets: list[float]) -> list[dict[str, Any]]:
    rows = []
    for fraction in budgets:
        ledger: dict[str, float] = {}
        with spent(ledger):
            chosen = modelopt_prune(ctx.teacher, fraction * ctx.dense_macs, ctx.dense_macs, ctx.search, ctx.shape)
        if "missing" in chosen:
            rows.append({"method": "modelopt_fastnas", "budget": fraction, **chosen, "compute": ledger})
            continue
        search_accuracy = ctx.search.accuracy(chosen["model"])
        result = finetuned(ctx, chosen["model"], ctx.teacher, ledger)
        rows.append({"method": "modelopt_fastnas", "budget": fraction, "macs": model_macs(result["model"]),
                     "choice": {"heads": [int(b.attn.num_heads) for b in result["model"].blocks],
                                "mlp_hidden": chosen["mlp_hidden"], "search_accuracy": search_accuracy},
                     "compute": ledger, **result})  # fmt: skip
    return rows


def combination_rows(ctx: Context, budgets: list[float], args) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """flora-ray on a Torch-Pruning (magnitude) model: prune, fine-tune, supernet, search, fine-tune the choices."""
    ledger: dict[str, float] = {}
    with spent(ledger):
        chosen = tp_choose(ctx.teacher, "magnitude", args.combo_base * ctx.dense_macs, ctx.shape, ctx.search)
    base = finetuned(ctx, chosen["model"], ctx.teacher, ledger)
    pruned_teacher = base["model"]
    info = {"base_fraction": args.combo_base, "base_macs": model_macs(pruned_teacher), **describe_pruned(pruned_teacher),
            "base_test_accuracy": base["test_accuracy"], "supernet_epochs": args.combo_epochs,
            "search_trials": args.combo_trials, "search_images": args.combo_images, "filter": "none (every triple)"}  # fmt: skip
    with spent(ledger):
        supernet = build_supernet(copy.deepcopy(pruned_teacher), ratios=ctx.cfg.model.ratios,
                                  include_proj=ctx.cfg.model.include_proj, sv_placement=ctx.cfg.model.sv_placement)  # fmt: skip
        info["supernet_history"] = train_supernet(ctx.cfg, supernet, pruned_teacher, ctx.splits, args.combo_epochs)
        points = search_pruned(ctx.cfg, supernet, ctx.splits, args.combo_trials, args.combo_images)
    front = [p for p, keep in zip(points, pareto_mask(_frame(points)), strict=True) if keep]
    info["front"] = sorted(({"macs": p["macs"], "accuracy": p["accuracy"]} for p in front), key=lambda p: p["macs"])
    info["compute_before_finetunes"] = dict(ledger)
    rows = []
    for fraction in budgets:
        within = [p for p in front if p["macs"] <= fraction * ctx.dense_macs]
        if not within:
            rows.append({"method": "flora_on_tp", "budget": fraction, "missing": "no searched point within the budget"})
            continue
        point = max(within, key=lambda p: p["accuracy"])
        own: dict[str, float] = {}
        with spent(own):
            supernet.eval()
            student = fr.extract_subnet(supernet, point["ranks"], within_candidates=False)
        result = finetuned(ctx, student, pruned_teacher, own)
        rows.append({"method": "flora_on_tp", "budget": fraction, "macs": supernet.cost.macs(point["ranks"]),
                     "choice": {"search_accuracy": point["accuracy"], "ranks": point["ranks"]},
                     "compute": {**own, "shared": info["compute_before_finetunes"]}, **result})  # fmt: skip
    return rows, info


def _frame(points: list[dict[str, Any]]):
    import pandas as pd

    return pd.DataFrame({"macs": [p["macs"] for p in points], "accuracy": [p["accuracy"] for p in points]})


def check_costs(ctx: Context, rows: list[dict[str, Any]]) -> None:
    """Each model's cost-model MACs against FlopCounterMode, and its budget (at most 2% above)."""
    for row in rows:
        if "model" not in row:
            continue
        row["counted_macs"] = counted_macs(row["model"], ctx.shape)
        row["macs_fraction"] = row["macs"] / ctx.dense_macs
        row["within_budget"] = row["macs"] <= (1 + TOLERANCE) * row["budget"] * ctx.dense_macs


def pair_with_flora(rows: list[dict[str, Any]], reference: list[dict[str, Any]] = (), images: int = 0) -> None:
    """Each row's test accuracy minus flora's at the same budget, paired, in points (flora's rows from ``rows``, or
    from ``reference``: an earlier result of this script on the same run and test split)."""
    flora = {r["budget"]: r for r in rows if r["method"] == "flora" and "correct" in r}
    for r in reference:
        if r["method"] == "flora" and "correct" in r and r["budget"] not in flora:
            flora[r["budget"]] = {**r, "correct": unpack_correct(r["correct"], images)}
    for row in rows:
        ref = flora.get(row["budget"])
        if ref is None or "correct" not in row:
            continue
        diff, se = paired_difference(row["correct"], ref["correct"])
        row["vs_flora"] = {"difference": diff, "se": se, "close_call": abs(diff) <= se}


def measure(args) -> dict[str, Any]:
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    ctx = open_context(args.run, args.epochs, args.search_images, args.train_subset)
    budgets = list(args.budgets)
    rows = low_rank_rows(ctx, budgets) if "low_rank" in args.methods else []
    importances = args.tp_importance if tp is not None and "tp" in args.methods else []
    rows += tp_rows(ctx, budgets, importances, args.taylor_batches)
    if "modelopt" in args.methods and modelopt_status()["available"]:
        rows += modelopt_rows(ctx, budgets)
    combo = None
    if tp is not None and args.combo_trials > 0 and "combination" in args.methods:
        combo_rows, combo = combination_rows(ctx, budgets, args)
        rows += combo_rows
    check_costs(ctx, rows)
    reference = json.loads(args.pair_with.read_text())["rows"] if args.pair_with else []
    pair_with_flora(rows, reference, len(ctx.test.evaluator.labels))
    dense = {"macs": ctx.dense_macs, "counted_macs": counted_macs(ctx.teacher, ctx.shape),
             "test_accuracy": ctx.test.accuracy(ctx.teacher)}  # fmt: skip
    models = {"dense": ctx.teacher} | {f"{r['method']}@{r['budget']:.3f}": r["model"] for r in rows if "model" in r}
    timed = latencies(models, ctx.shape, args.rounds, args.latency_runs)
    dense["latency"] = timed["dense"]
    for row in rows:
        if "model" in row:
            row["latency"] = timed[f"{row['method']}@{row['budget']:.3f}"]
            row["correct"] = pack_correct(row.pop("correct"))
            row.pop("model")
    return {"run": str(args.run), "config": json.loads(json.dumps(config_to_dict(ctx.cfg), default=str)), "seed": ctx.cfg.run.seed,
            "finetune_recipe": {**{k: v for k, v in config_to_dict(ctx.cfg.finetune).items()}, **ctx.recipe},
            "budgets": budgets, "dense": dense, "rows": rows, "combination": combo, "modelopt": modelopt_status(),
            "train_subset": args.train_subset, "torch_pruning": "not installed (pip install 'flora-ray[bench]')" if tp is None else importlib.metadata.version("torch-pruning"),
            "seconds": time.perf_counter() - started}  # fmt: skip


def table(result: dict[str, Any]) -> str:
    dense = result["dense"]
    lines = [f"dense: {dense['macs'] / 1e6:.3f} MMACs, test {dense['test_accuracy']:.2f}%, "
             f"b1 {dense['latency']['b1_ms']:.3f} ms, b32 {dense['latency']['b32_ms']:.3f} ms", "",
             "| budget | method | MMACs (% dense) | test acc | vs flora (paired) | b1 ms | b32 ms | wall s | CPU s | choice |",
             "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- |"]  # fmt: skip
    for row in result["rows"]:
        if "missing" in row:
            lines.append(f"| {row['budget']:.0%} | {row['method']} | - | - | - | - | - | - | - | {row['missing']} |")
            continue
        vs = row.get("vs_flora")
        versus = "-" if vs is None or row["method"] == "flora" else f"{vs['difference']:+.2f} ± {vs['se']:.2f}"
        choice = row["choice"]
        what = (f"heads {choice['heads']}, mlp {choice['mlp_hidden']}" if "heads" in choice
                else f"ratio {choice['ratio']:g}" if choice.get("ratio") is not None else f"search acc {choice['search_accuracy']:.2f}")  # fmt: skip
        if row.get("same_model_as"):
            what += f" (same model as {row['same_model_as']})"
        compute = row["compute"]
        lines.append(f"| {row['budget']:.0%} | {row['method']} | {row['macs'] / 1e6:.3f} ({row['macs_fraction']:.1%}) | "
                     f"{row['test_accuracy']:.2f}% | {versus} | {row['latency']['b1_ms']:.3f} | "
                     f"{row['latency']['b32_ms']:.3f} | {compute.get('wall_s', 0):.0f} | {compute.get('cpu_s', 0):.0f} | {what} |")  # fmt: skip
    return "\n".join(lines)


def smoke_run(output: Path) -> Path:
    """A digits run of every stage in this process (seconds): the smoke mode's proving ground."""
    from flora_ray.backends.local import LocalBackend
    from flora_ray.pipeline import run_pipeline

    cfg = load_config(None, [*SMOKE, f"run.output_dir={output / 'runs'}"])
    run_pipeline(cfg, LocalBackend())
    return cfg.run.run_dir


# The digits space's cheapest subnet is 37% of dense (attn.proj and the attention products stay dense): the smoke
# budgets sit above it.
SMOKE_DEFAULTS = {"epochs": 1, "search_images": 200, "combo_trials": 8, "combo_images": 150, "budgets": [0.4, 0.55, 0.7],
                  "combo_base": 0.85, "taylor_batches": 2, "rounds": 1, "latency_runs": 3}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = bench_parser(__doc__, smoke=SMOKE_DEFAULTS, smoke_help="a digits run made in this process, every method on it")
    p.add_argument("--run", type=Path, default=ROOT / "runs" / "proving_ground")
    p.add_argument(
        "--methods",
        nargs="+",
        default=["low_rank", "tp", "combination", "modelopt"],
        choices=["low_rank", "tp", "combination", "modelopt"],
        help="modelopt: where it imports",
    )
    p.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    p.add_argument("--epochs", type=int, default=None, help="fine-tune epochs for every model (default: the run's)")
    p.add_argument("--tp-importance", nargs="+", default=["magnitude", "taylor"], choices=["magnitude", "taylor"])
    p.add_argument(
        "--train-subset",
        type=float,
        default=None,
        help="share of the training split every fine-tune and the combination's supernet use (default: all)",
    )
    p.add_argument("--taylor-batches", type=int, default=10)
    p.add_argument("--search-images", type=int, default=2000, help="search images that pick Torch-Pruning's heads")
    p.add_argument("--combo-base", type=float, default=0.67, help="the pruned base's fraction of dense MACs")
    p.add_argument("--combo-epochs", type=int, default=1)
    p.add_argument("--combo-trials", type=int, default=60, help="0: no combination")
    p.add_argument("--combo-images", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--latency-runs", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--pair-with", type=Path, default=None, help="an earlier result whose flora rows the rows pair with")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.smoke:
        args.run = smoke_run(args.output)
    result = measure(args) | {"environment": environment(args.threads), "versions": versions(),
                              "command": " ".join([Path(sys.executable).name, *sys.argv])}  # fmt: skip
    print(table(result))
    write_result(args.output / f"peers_{result['config']['run']['name']}.json", result)
    return result


if __name__ == "__main__":
    main()

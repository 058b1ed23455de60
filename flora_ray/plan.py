"""``flora-ray plan``: what a run will ask of a cluster, before it is submitted. No network, no training.

Per stage: the resource bundles the code asks Ray for (the same functions the stages call), the worker nodes Ray's
autoscaler would start for them under a cluster launcher file's node types (the autoscaler's own bin-packing,
``get_nodes_for``), the work in multiply-accumulates (exact, from the cost model on the meta device), a wall-time
estimate with its source, GPU-hours and the cost at the given prices per node-hour.

Sources of the rate, best first: seconds measured by this run's finished stages; on a cluster, the training
throughput of the model on the node type's GPU (``flora_ray.throughput``: measured by ``experiments/gpu_check.py``,
else published by timm), turned into multiply-accumulates per second; where no figure exists for the model and
GPU, the GPU's datasheet peak dense FP16/BF16 tensor rate times an assumed model-FLOPs utilisation (``--mfu``),
labelled as that fallback; without a cluster file, a forward pass of the model timed on this machine. Training
counts forward + backward as 3 forward passes plus the teacher's forward pass; search and export (forward passes
only) are estimated at the same multiply-accumulates per second, which forward-only passes usually exceed (timm's
RTX 3090 figures give DeiT-S inference a higher MAC rate than training), so their estimates err long. Estimates of
stages that were not run are rough by nature, and say so. Prices are per node type (``--price TYPE=USD``,
``--prices FILE``), the head's included.
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flora_ray.config import Config
from flora_ray.errors import InputError, MissingInput
from flora_ray.throughput import TrainingRate, base_model, find_rate, normalise_gpu

# Published peak dense FP16/BF16 tensor throughput (TFLOPS) of accelerators in common cloud node types: only the
# fallback when no measured or published training rate exists for the model on that GPU (a peak says little about
# training speed: memory bandwidth, clocks under the power limit and kernel efficiency differ between GPUs).
PUBLISHED_TFLOPS = {
    "T4": (65.0, "NVIDIA T4 datasheet: 65 TFLOPS mixed precision"),
    "V100": (125.0, "NVIDIA V100 datasheet: 125 TFLOPS tensor"),
    "A10G": (125.0, "NVIDIA A10 datasheet: 125 TFLOPS BF16 tensor, dense (AWS's A10G is an A10 variant)"),
    "L4": (121.0, "NVIDIA L4 datasheet: 121 TFLOPS FP16 tensor, dense"),
    "A100": (312.0, "NVIDIA A100 datasheet: 312 TFLOPS BF16 tensor, dense"),
    "H100": (989.0, "NVIDIA H100 SXM datasheet: 989 TFLOPS BF16 tensor, dense"),
}
INSTANCE_GPUS = {"g4dn.": "T4", "p3.": "V100", "g5.": "A10G", "g6.": "L4", "p4d.": "A100", "p5.": "H100",
                 "nvidia-tesla-t4": "T4", "nvidia-tesla-v100": "V100", "nvidia-l4": "L4",
                 "nvidia-tesla-a100": "A100", "nvidia-a100-80gb": "A100", "nvidia-h100-80gb": "H100"}  # fmt: skip
DEFAULT_MFU = 0.3


@dataclass
class StagePlan:
    """One stage's demand, placement and estimate."""

    stage: str
    bundles: list[dict[str, float]]
    macs: float = 0.0
    seconds: float = 0.0
    source: str = ""
    nodes: dict[str, int] = field(default_factory=dict)
    unplaced: int = 0
    gpu_hours: float = 0.0
    cost: float | None = None
    skipped: str | None = None


@dataclass(frozen=True)
class Workload:
    """What the estimate needs about model and data: images per epoch, MACs, the space."""

    train_images: int
    dense_macs: float
    mean_macs: float
    blocks: int
    candidates: int
    profile_items: int
    classes: int = 0  # the classifier's classes (``pretrain``'s plan: are the pretrained weights the teacher?)


def worker_nodes(cluster: dict[str, Any]) -> dict[str, Any]:
    """The cluster file prepared as ``ray up`` prepares it (provider defaults merged, checked)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cluster))
    validate_config(prepared)
    return prepared


def place(cluster: dict[str, Any], bundles: list[dict[str, float]]) -> tuple[dict[str, int], int]:
    """The worker nodes the autoscaler starts for ``bundles`` on an idle cluster (only its head up), and how many
    bundles fit nowhere: Ray's own ``get_nodes_for``."""
    from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
    from ray.autoscaler._private.resource_demand_scheduler import _default_utilization_scorer, get_nodes_for

    scorer = functools.partial(_default_utilization_scorer,
                               node_availability_summary=NodeAvailabilitySummary(node_availabilities={}))  # fmt: skip
    head = cluster["head_node_type"]
    added, unplaced = get_nodes_for(cluster["available_node_types"], {head: 1}, head, cluster["max_workers"],
                                    bundles, scorer)  # fmt: skip
    return dict(added), len(unplaced)


def gpu_model(node_type: dict[str, Any]) -> str | None:
    """The accelerator model of a node type: Ray's ``accelerator_type:NAME`` resource where the node type declares
    one, else from its instance type or GCP accelerator type."""
    for resource in node_type.get("resources", {}):
        if resource.startswith("accelerator_type:"):
            return normalise_gpu(resource.split(":", 1)[1]) or resource.split(":", 1)[1]
    config = node_type.get("node_config", {})
    names = [config.get("InstanceType", ""), config.get("machineType", "")]
    names += [a.get("acceleratorType", "") for a in config.get("guestAccelerators", [])]
    for name in names:
        for prefix, model in INSTANCE_GPUS.items():
            if name.startswith(prefix):
                return model
    return None


def stage_bundles(cfg: Config) -> dict[str, list[dict[str, float]]]:
    """What each planned stage asks Ray for (``stages.Demand.bundles``: the functions the stages themselves call)."""
    from flora_ray.stages import STAGES

    return {name: stage.demand.bundles(cfg) for name, stage in STAGES.items() if stage.demand is not None}


def measured_rate(cfg: Config, spec: Any) -> float:
    """MACs per second of a forward pass of the dense model on this machine (batch 8, the run's threads)."""
    import torch

    from flora_ray.core.cost import build_cost_model
    from flora_ray.core.timing import forward_ms, torch_threads
    from flora_ray.stages.profile import model_input

    with torch_threads(cfg.run.threads_per_worker or None):
        model = spec.create(device="cpu").eval()
        x = model_input(model, spec, 8, torch.device("cpu"), torch.float32)
        seconds = forward_ms(model, x, runs=3, warmup=1) / 1e3
    return 8 * build_cost_model(spec.create(device="meta")).dense_macs / max(seconds, 1e-9)


def fmt_hours(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def format_plan(plans: list[StagePlan], totals: dict[str, Any]) -> str:
    """The plan as a table, then the totals, then each rate's source in full (the table refers to them as [n])."""
    lines = ["| stage | demand | nodes the autoscaler starts | work (MACs) | wall time | GPU-hours | cost | source |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |"]  # fmt: skip
    sources: list[str] = []
    for p in plans:
        if p.skipped:
            lines.append(f"| {p.stage} | - | - | - | - | - | - | skipped: {p.skipped} |")
            continue
        demand = f"{len(p.bundles)} x {p.bundles[0]}" if p.bundles else "-"
        nodes = ", ".join(f"{n} x {t}" for t, n in sorted(p.nodes.items())) or "this machine"
        nodes += f" ({p.unplaced} bundles fit no node type)" if p.unplaced else ""
        cost = "-" if p.cost is None else f"${p.cost:,.2f}"
        macs = f"{p.macs:.3g}" if p.macs else "-"
        source = p.source
        if len(source) > 80:  # a rate's whole provenance: once, below the table
            sources += [] if source in sources else [source]
            source = f"{source.split(':', 1)[0]} [{sources.index(source) + 1}]"
        lines.append(f"| {p.stage} | {demand} | {nodes} | {macs} | {fmt_hours(p.seconds)} | "
                     f"{p.gpu_hours:,.1f} | {cost} | {source} |")  # fmt: skip
    cost = "-" if totals["cost"] is None else f"${totals['cost']:,.2f}"
    lines.append(f"\ntotal: {fmt_hours(totals['seconds'])} wall, {totals['gpu_hours']:,.1f} GPU-hours, {cost}")
    lines += [f"[{i}] {source}" for i, source in enumerate(sources, 1)]
    return "\n".join(lines)


def read_cluster(path: str | Path) -> dict[str, Any]:
    """A Ray cluster launcher file, prepared and checked as ``ray up`` does before it talks to a cloud."""
    import logging

    import yaml

    logging.getLogger("ray.autoscaler").setLevel(logging.WARNING)  # prepare_config's notes are not the plan

    p = Path(path)
    if not p.is_file():
        raise MissingInput(f"cluster file {str(p)!r} does not exist")
    data = yaml.safe_load(p.read_text())
    if not isinstance(data, dict) or "available_node_types" not in data:
        raise InputError(f"{str(p)!r} is not a Ray cluster launcher file (no available_node_types)")
    return worker_nodes(data)


def parse_prices(items: list[str], files: list[str] = ()) -> dict[str, float]:
    """``--prices FILE`` (a YAML or JSON mapping of node type to USD per node-hour), then ``--price TYPE=USD``
    (later wins), as ``{node type: USD}``. Every node type a plan starts, the head's included, needs its own price:
    spot and on-demand, GPU and CPU node types differ by far more than an estimate's error."""
    import yaml

    given: list[tuple[str, str, object]] = []
    for path in files:
        p = Path(path)
        if not p.is_file():
            raise MissingInput(f"--prices {path!r} does not exist")
        data = yaml.safe_load(p.read_text())
        if not isinstance(data, dict):
            raise InputError(f"--prices {path!r}: give a mapping of node type to USD per node-hour (gpu_1x: 1.62)")
        given += [(f"--prices {path!r}: {name}", str(name), value) for name, value in data.items()]
    for item in items:
        name, _, value = item.rpartition("=")
        if not name:
            raise InputError(f"--price {item!r}: give a price per node type, as NODE_TYPE=USD (gpu_1x=1.62)")
        given.append((f"--price {item!r}", name, value))
    prices: dict[str, float] = {}
    for where, name, value in given:
        try:
            usd = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise InputError(f"{where}: give USD per node-hour, as NODE_TYPE=1.62") from None
        if not math.isfinite(usd) or usd < 0:
            raise InputError(f"{where}: a price must be a number >= 0")
        prices[name] = usd
    return prices


def model_spec(cfg: Config, classes: int | None) -> Any:
    """The run's timm spec; for an image folder that is not on this machine, with ``classes`` given."""
    from flora_ray.core.models import ModelSpec
    from flora_ray.data.listing import is_remote
    from flora_ray.stages.inputs import resolve_model_spec

    folder_here = cfg.data.name != "imagefolder" or (cfg.data.root is not None and Path(cfg.data.root).is_dir())
    if folder_here:
        return resolve_model_spec(cfg)
    hint = "give its class count and training images (--classes 1000 --train-images 1281167 for ImageNet-1k)"
    if classes is None and is_remote(cfg.data.root):  # a bucket: its class folders, listed
        try:
            return resolve_model_spec(cfg)
        except InputError as exc:
            raise InputError(f"{exc}; or {hint}") from None
    if classes is None:
        raise InputError(f"data.root {cfg.data.root!r} is not on this machine: {hint}")
    return ModelSpec(cfg.model.name, {"img_size": cfg.data.img_size, "in_chans": cfg.data.in_chans,
                                      "num_classes": classes, **cfg.model.kwargs}, cfg.model.tome_r)  # fmt: skip


def count_train_images(cfg: Config, given: int | None) -> int:
    """Training images per epoch: as given, else counted (the small data sets, or an image folder here)."""
    if given is not None:
        return given
    if cfg.data.name == "imagefolder":
        from flora_ray.data.listing import list_image_folder, run_listing

        listing = run_listing(cfg)  # a bucket: the run's recorded listing, else one listing of it
        if listing is None:
            if cfg.data.root is None or not Path(cfg.data.root).is_dir():
                raise InputError(f"data.root {cfg.data.root!r} is not on this machine: give --train-images N")
            listing = list_image_folder(cfg.data.root)  # the images the loaders read (not other files)
        return len(listing.paths["train"])
    from flora_ray.data.datasets import build_datasets

    return len(build_datasets(cfg.data).train)


def build_workload(cfg: Config, spec: Any, train_images: int) -> Workload:
    """Exact MACs of the dense model and of the mean uniform configuration; the space's blocks and items."""
    from flora_ray.core.cost import build_cost_model
    from flora_ray.core.latency import calibration_configs, profile_items
    from flora_ray.core.supernet import build_space

    meta = spec.create(device="meta")
    space = build_space(meta, ratios=cfg.model.ratios, include_proj=cfg.model.include_proj, targets=cfg.model.targets,
                        model_name=spec.name)  # fmt: skip
    cost = build_cost_model(meta)
    uniform = [cost.macs(c) for c in space.uniform_configs().values()]
    items = len(profile_items(space, cost, calibration_configs(space))) if cfg.profile.enabled else 0
    return Workload(train_images, float(cost.dense_macs), sum(uniform) / len(uniform), len(space.blocks),
                    len(space.blocks[0].candidates), items, spec.kwargs["num_classes"])  # fmt: skip


def make_plan(
    cfg: Config,
    cluster: dict[str, Any] | None = None,
    prices: dict[str, float] | None = None,
    mfu: float = DEFAULT_MFU,
    train_images: int | None = None,
    classes: int | None = None,
    throughput: list[str] | tuple[str, ...] = (),
) -> tuple[list[StagePlan], dict[str, Any]]:
    """Every stage's plan and the totals (see the module docstring); ``throughput``: measured rate files
    (``experiments/gpu_check.py`` results) besides the repository's own and the published ones."""
    from flora_ray.records import StageMarker
    from flora_ray.stages import STAGES
    from flora_ray.stages.preflight import check_geometry
    from flora_ray.storage.run_store import RunStore
    from flora_ray.throughput import known_rates

    if not 0 < mfu <= 1:
        raise InputError(f"--mfu {mfu}: the assumed model-FLOPs utilisation must be in (0, 1]")
    spec = model_spec(cfg, classes)
    check_geometry(spec)
    work = build_workload(cfg, spec, count_train_images(cfg, train_images))
    local_rate = None if cluster else measured_rate(cfg, spec)
    rates = known_rates(list(throughput)) if cluster else []
    store = RunStore.for_config(cfg)
    plans = []
    for stage in (s for s in STAGES.values() if s.demand is not None):
        plan = StagePlan(stage.name, stage.demand.bundles(cfg), macs=stage.demand.work(cfg, workload=work))
        skip = stage.demand.skipped(cfg, workload=work)
        if skip:
            plan.skipped = skip
        else:
            marker = StageMarker.read(store, stage=stage.name) if store.is_local and store.exists("") else None
            estimate(cfg, plan, work, cluster, local_rate, mfu, marker, rates)
            price(plan, cluster, prices or {})
        plans.append(plan)
    return plans, totals(plans, cluster, prices or {})


def estimate(cfg, plan: StagePlan, work: Workload, cluster, local_rate, mfu, marker, rates=()) -> None:
    """The stage's placement, wall time and GPU-hours, from the best source there is: this run's finished stage
    (``marker``), the stage's own time (``Demand.time``), its MACs over a rate measured here or of the cluster's
    accelerator."""
    from flora_ray.stages import STAGES

    demand = STAGES[plan.stage].demand
    if cluster is not None and plan.bundles:
        plan.nodes, plan.unplaced = place(cluster, plan.bundles)
    if marker is not None:
        plan.seconds, plan.source = float(marker.seconds), "measured: this run's finished stage"
    elif demand.time is not None:
        plan.seconds, plan.source = demand.time(cfg, workload=work)
    elif cluster is None:
        share = demand.parallel(cfg, workload=work, cluster=False)
        plan.seconds = plan.macs / (local_rate * min(share, 1.0 if cfg.run.threads_per_worker == 0 else share))
        plan.source = f"forward pass timed here: {local_rate / 1e9:.1f} GMAC/s per worker"
    else:
        rate, source = accelerator_rate(cluster, plan.nodes, mfu, list(rates), cfg.model.name, work.dense_macs)
        plan.seconds = plan.macs / (rate * demand.parallel(cfg, workload=work, cluster=True))
        plan.source = source
    gpus = {t: cluster["available_node_types"][t]["resources"].get("GPU", 0) for t in plan.nodes} if cluster else {}
    plan.gpu_hours = plan.seconds / 3600 * sum(n * gpus[t] for t, n in plan.nodes.items())


def accelerator_rate(
    cluster: dict[str, Any], nodes: dict[str, int], mfu: float, rates: list[TrainingRate], model: str, dense_macs: float
) -> tuple[float, str]:
    """MACs per second of one accelerator of the node types started (the slowest), and where the number is from:
    a measured or published training rate of ``model`` on that GPU, else the datasheet peak x ``mfu`` (fallback)."""
    gpus = {gpu_model(cluster["available_node_types"][t]) for t in nodes} - {None}
    if not gpus:
        raise InputError("the cluster file's node types for this stage name no known accelerator; plan with a "
                         f"node type of one of {sorted(PUBLISHED_TFLOPS)}")  # fmt: skip
    options = [gpu_rate(gpu, mfu, rates, model, dense_macs) for gpu in sorted(gpus)]
    return min(options, key=lambda option: option[0])


def gpu_rate(gpu: str, mfu: float, rates: list[TrainingRate], model: str, dense_macs: float) -> tuple[float, str]:
    """One GPU's training MACs per second for ``model`` and the sentence saying where it is from."""
    found = find_rate(rates, model, gpu)
    if found is not None:
        per_image = found.macs_per_image or 3 * dense_macs
        return found.macs_per_s(dense_macs), (
            f"{gpu}: {found.images_per_s:g} training images/s x {per_image / 1e9:.3g} GMACs per training image; "
            f"{found.source}"
        )
    if gpu not in PUBLISHED_TFLOPS:
        raise InputError(f"no measured or published training rate for {model} on {gpu}, and no datasheet peak for "
                         f"{gpu}: measure one with experiments/gpu_check.py and pass --throughput FILE")  # fmt: skip
    tflops, sheet = PUBLISHED_TFLOPS[gpu]
    rate = tflops * 1e12 / 2 * mfu
    others = [r for r in rates if r.model == base_model(model)]
    compare = (
        f"; for comparison, {others[0].gpu}: {others[0].images_per_s:g} images/s ({others[0].source})" if others else ""
    )
    return rate, (
        f"{gpu}: FALLBACK, no measured or published training rate for {model} on {gpu}: {sheet}, x {mfu:g} "
        f"assumed utilisation (--mfu) = {rate / (3 * dense_macs):,.0f} dense training images/s per GPU, not a "
        f"measurement{compare}. Measure with experiments/gpu_check.py and pass --throughput FILE"
    )


def price(plan: StagePlan, cluster, prices: dict[str, float]) -> None:
    if cluster is None or not prices:
        return
    check_priced(plan.nodes, prices)
    plan.cost = sum(n * prices[t] for t, n in plan.nodes.items()) * plan.seconds / 3600


def check_priced(node_types, prices: dict[str, float]) -> None:
    missing = [t for t in node_types if t not in prices]
    if missing:
        raise InputError(f"no price for node type {missing[0]!r}: give --price {missing[0]}=USD (per node-hour)")


def totals(plans: list[StagePlan], cluster, prices: dict[str, float]) -> dict[str, Any]:
    """Wall time, GPU-hours and cost over the stages, the head node's hours included in the cost."""
    seconds = sum(p.seconds for p in plans)
    cost = None
    if cluster is not None and prices:
        head = cluster["head_node_type"]
        check_priced([head], prices)
        cost = sum(p.cost or 0.0 for p in plans) + prices[head] * seconds / 3600
    return {"seconds": seconds, "gpu_hours": sum(p.gpu_hours for p in plans), "cost": cost}

"""Orthogonality: the extra MACs and latency a FLORA front saves on top of another compression technique.

FLORA's paper (WACV 2024) reports 21%-26% extra FLOPs reduction when its ranks are combined with other compression
techniques or compact hybrid structures. Here, for each technique:

- ``hybrid``: LeViT, a compact conv/attention hybrid (``experiments/levit_fashion_mnist.yaml``); the technique alone
  is the dense LeViT (the run's teacher);
- ``tome``: token merging at a fixed ``r`` (``model.tome_r``; ``--tome-r``, default 2: the quickstart ViT's 17 tokens
  shrink to 9 over its 4 blocks, about the share ToMe's r = 8 removes from DeiT's 197 over 12 blocks) on the
  quickstart; the technique alone is the dense ViT merging tokens (the run's teacher, trained with merging), and
  the supernet, search and subnets merge alike;
- ``int8``: dynamic int8 quantization of every Linear layer (``core.quantize``, what ``--format int8`` exports) of
  the quickstart run; the technique alone is the int8 dense teacher; every searched subnet is quantized and
  scored, and the front is made again from the int8 accuracies (dynamic int8 scales activations per batch, so
  its accuracy depends a little on how the images are batched: ``search.batch_size`` here, as in the search);

a whole flora-ray run (``flora_ray.run``: every stage, on local Ray unless ``--smoke``) in ``runs/bench-orth-*``,
reused when it is finished, gives the searched subnets. The technique-alone model is scored on the run's own search
images, paired image by image with every subnet. At 0.5 and 1 point below its accuracy the cheapest front subnet
that reaches it gives the extra MAC reduction ``1 - subnet MACs / technique-alone MACs`` (exact, from the cost
model) and the extra latency reduction, measured on CPU with one thread at batch 1 and 32 (``forward_ms``, a
median, in ``--rounds`` interleaved rounds of which the fastest is kept, so that other work on the core falls on
every model alike). Both models are also scored on the test split. ``reference`` is the model without the
technique (the quickstart's dense ViT for ``tome``, the fp32 teacher for ``int8``), for the technique's own effect.
Prints a table, writes ``results/orthogonality.json``.

    taskset -c 0 .venv/bin/python experiments/benchmarks/orthogonality.py          # prepares the 3 runs (about 40 min)
    .venv/bin/python experiments/benchmarks/orthogonality.py --techniques int8      # one technique
    .venv/bin/python experiments/benchmarks/orthogonality.py --smoke --output /tmp/x  # digits, in process, a minute
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import numpy as np
import pandas as pd
import torch
from harness import EXPERIMENTS, ROOT, bench_parser, environment, write_result
from torch import nn

import flora_ray as fr
from flora_ray.config import config_to_dict
from flora_ray.core.quantize import SCHEME, quantize_int8
from flora_ray.core.timing import forward_ms, torch_threads
from flora_ray.data.datasets import build_datasets
from flora_ray.results import binomial_se, cheapest_within, paired_difference, pareto_mask, unpack_correct
from flora_ray.search.evaluator import Evaluator, build_evaluator, search_batch, search_images
from flora_ray.stages.inputs import load_teacher
from flora_ray.storage.files import read_json
from flora_ray.storage.run_store import ARTEFACTS

PAPER = (0.21, 0.26)  # FLORA's extra FLOPs reduction on top of other compression (WACV 2024)
DROPS = (0.5, 1.0)  # accuracy points below the technique alone
BATCHES = (1, 32)
BASE_RUN = "bench-orth-quickstart"
TECHNIQUES = ("hybrid", "tome", "int8")
# The smoke mode: a tiny digits run per technique, every stage in process (seconds each).
SMOKE_OVERRIDES = (
    "model.kwargs={patch_size: 2, embed_dim: 32, depth: 2, num_heads: 2, mlp_ratio: 2}",
    "model.ratios=[0.25, 0.5, 1.0]",
    "pretrain.epochs=8",
    "filter.mode=zero_training",
    "filter.eval_images=100",
    "filter.keep_fraction=0.5",
    "train.epochs=2",
    "train.eval_images=100",
    "search.trials=12",
    "search.population=4",
    "search.eval_images=200",
    "search.concurrency=1",
)
SMOKE_LEVIT = (
    "model.name=levit_128s",
    "model.kwargs={embed_dim: [32, 48, 64], key_dim: 8, num_heads: [2, 3, 4], depth: [1, 2, 1]}",
    "model.ratios=[0.5, 1.0]",
    "data.img_size=32",  # LeViT's stem divides by 16: a 2x2 grid
    "search.bn_recalibration_images=200",
)


@dataclass(frozen=True)
class Technique:
    """One technique: the experiment its run is made from and whether subnets are quantized after the search."""

    name: str
    label: str
    run: str
    config: str
    overrides: tuple[str, ...] = ()
    int8: bool = False


@dataclass(frozen=True)
class Recipe:
    """Where the techniques' runs come from: the ViT experiment (token merging, int8), the base run int8 quantizes
    and token merging is compared with, the LeViT overrides and the suffix of the runs' names."""

    vit: str
    base_overrides: tuple[str, ...]
    base_run: str
    levit: tuple[str, ...]
    suffix: str


RECIPES = {
    # the quickstart's schedule: a run per technique in about 10-20 minutes each on 2 cores
    "quickstart": Recipe("quickstart.yaml", (), BASE_RUN, (), ""),
    # the proving ground (experiments/proving_ground.yaml: a stronger teacher, rank 1/16, a longer supernet), where
    # compression costs accuracy within the space; int8 reuses `flora-ray run experiments/proving_ground.yaml`'s run
    # (made before BatchNorm recalibration existed: 0 continues it, a no-op for a ViT); LeViT gets ranks 1/16 and 1/8
    "proving_ground": Recipe(
        "proving_ground.yaml",
        ("search.bn_recalibration_images=0",),
        "proving_ground",
        ("model.ratios=[0.0625, 0.125, 0.25, 0.5, 1.0]",),
        "-pg",
    ),
}


def techniques(tome_r: int, smoke: bool, recipe: Recipe = RECIPES["quickstart"]) -> dict[str, Technique]:
    """The three techniques of ``recipe``, or (``smoke``) on tiny digits runs."""
    if smoke:
        recipe = Recipe("digits_tiny.yaml", SMOKE_OVERRIDES, BASE_RUN, (*SMOKE_OVERRIDES, *SMOKE_LEVIT), "")
        levit = "digits_tiny.yaml"
    else:
        levit = "levit_fashion_mnist.yaml"
    tome = (*recipe.base_overrides, f"model.tome_r={tome_r}")
    if recipe.vit == "proving_ground.yaml":
        tome = (f"model.tome_r={tome_r}", "finetune.enabled=false")  # the search's front, not a fine-tuned subnet
    return {
        "hybrid": Technique(
            "hybrid", "LeViT (compact hybrid)", f"bench-orth-levit{recipe.suffix}", levit, recipe.levit
        ),
        "tome": Technique(
            "tome", f"token merging r={tome_r}", f"bench-orth-tome{tome_r}{recipe.suffix}", recipe.vit, tome
        ),
        "int8": Technique("int8", f"int8 ({SCHEME})", recipe.base_run, recipe.vit, recipe.base_overrides, int8=True),
    }


def prepare(technique: Technique, output: Path, smoke: bool) -> fr.Run:
    """The technique's finished run (every stage), made or continued with ``flora_ray.run``."""
    overrides = [*technique.overrides, f"run.name={technique.run}"]
    print(f"{technique.name}: run {output / technique.run}", flush=True)
    return fr.run(EXPERIMENTS / technique.config, overrides, backend="local" if smoke else "ray", output=output)


# --- scoring ------------------------------------------------------------------------------------------------------


class Scorer:
    """A run's search images (the ones its trials were scored on) and its test split, for standalone models."""

    def __init__(self, run: fr.Run) -> None:
        config = config_to_dict(run.config)
        images, labels = search_images(config)
        tensors, header = run.store.read_checkpoint(ARTEFACTS.supernet)
        self.search = build_evaluator(header, {k: v.numpy() for k, v in tensors.items()}, config, images, labels)
        test_images, test_labels = search_batch(build_datasets(run.config.data).test, 10**9)
        self.test = Evaluator(self.search.supernet, test_images, test_labels, "cpu", self.search.batch_size)
        self.input_shape = tuple(test_images.shape[1:])

    def metrics(self, model: nn.Module) -> dict[str, Any]:
        """Accuracy, its SE and per-image results of ``model`` (CPU, eval mode) on the search and the test images."""
        model = model.cpu().eval()
        out = {}
        for split, evaluator in (("search", self.search), ("test", self.test)):
            correct = evaluator.model_correct(model)
            accuracy = 100.0 * float(correct.mean())
            out[split] = {"accuracy": accuracy, "accuracy_se": binomial_se(accuracy, len(correct)), "correct": correct}
        return out


def candidates(run: fr.Run, technique: Technique, scorer: Scorer) -> tuple[pd.DataFrame, dict[int, nn.Module]]:
    """The front the technique's subnets form (``trial``, ``macs``, ``accuracy``, ``correct``) and its subnets
    by trial: the run's own front, or for int8 every searched subnet quantized and scored, then its front."""
    if not technique.int8:
        front = run.front.copy()
        front["correct"] = [unpack_correct(c, n) for c, n in zip(front["correct"], front["eval_images"], strict=True)]
        return front, {}
    trials = run.trials
    trials = trials[trials["state"] == "COMPLETE"].drop_duplicates("ranks").reset_index(drop=True)
    rows, models = [], {}
    for i, row in trials.iterrows():
        model = quantize_int8(run.subnet(int(row["trial"])))
        correct = scorer.search.model_correct(model)
        rows.append({"trial": int(row["trial"]), "macs": float(row["macs"]), "accuracy": 100.0 * correct.mean(),
                     "fp32_accuracy": float(row["accuracy"]), "correct": correct})  # fmt: skip
        models[int(row["trial"])] = model
        if (i + 1) % 20 == 0 or i + 1 == len(trials):
            print(f"  int8: {i + 1}/{len(trials)} subnets quantized and scored", flush=True)
    frame = pd.DataFrame(rows)
    front = frame[pareto_mask(frame)].sort_values("macs").reset_index(drop=True)
    return front, {t: models[t] for t in front["trial"]}


def uniform_candidates(run: fr.Run, technique: Technique, scorer: Scorer) -> pd.DataFrame:
    """Every uniform-rank configuration (``ratio``, ``macs``, ``accuracy``) on top of the technique: the run's own
    baseline, or for int8 each one quantized and scored."""
    uniform = run.uniform.sort_values("macs").reset_index(drop=True)
    if not technique.int8:
        return uniform[["ratio", "macs", "accuracy"]]
    accuracy = [
        100.0 * scorer.search.model_correct(quantize_int8(run.subnet_at(json.loads(r)))).mean()
        for r in uniform["ranks"]
    ]
    return uniform[["ratio", "macs"]].assign(accuracy=accuracy, fp32_accuracy=uniform["accuracy"])


def alone_models(run: fr.Run, technique: Technique, base: fr.Run | None) -> tuple[nn.Module, nn.Module | None]:
    """The technique alone (the run's dense teacher, quantized for int8) and the model without it (``None``
    for the hybrid, which is a model of its own)."""
    (teacher,) = load_teacher(run.config, run.store)
    teacher = teacher.eval()
    if technique.int8:
        return quantize_int8(teacher), teacher
    if technique.name == "tome" and base is not None:
        (plain,) = load_teacher(base.config, base.store)
        return teacher, plain.eval()
    return teacher, None


# --- latency ------------------------------------------------------------------------------------------------------


def measure_latency(models: dict[str, nn.Module], shape: tuple[int, ...], rounds: int) -> dict[str, dict[int, float]]:
    """Median ms per forward of every model at every batch of ``BATCHES`` (one thread); every model is timed once
    per round, the rounds interleaved, and the fastest round is kept."""
    timed = {name: dict.fromkeys(BATCHES, float("inf")) for name in models}
    with torch_threads(1):
        for batch in BATCHES:
            x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
            for _ in range(rounds):
                for name, model in models.items():
                    timed[name][batch] = min(timed[name][batch], forward_ms(model, x, runs=20, warmup=3))
    return timed


# --- one technique ------------------------------------------------------------------------------------------------


def summary(metrics: dict[str, Any], macs: float) -> dict[str, Any]:
    """A model's figures without its per-image arrays."""
    return {"macs": macs, **{f"{split}_{k}": v for split, m in metrics.items() for k, v in m.items() if k != "correct"}}


def drop_row(drop: float, alone: dict[str, Any], front: pd.DataFrame, uniform: pd.DataFrame, scorer: Scorer,
             subnets: dict[int, nn.Module]) -> dict[str, Any]:  # fmt: skip
    """The cheapest front subnet within ``drop`` points of the technique alone (``alone``: its metrics and
    ``macs``), what it saves, and the cheapest uniform-rank configuration within it."""
    target = alone["search"]["accuracy"] - drop
    row = cheapest_within(front, target)
    out: dict[str, Any] = {"drop": drop, "target": target, "reached": row is not None}
    uniform = cheapest_within(uniform, target)
    if uniform is not None:  # uniform ranks on top of the technique: what low rank alone gives, without the search
        out["uniform"] = {"ratio": float(uniform["ratio"]), "macs": float(uniform["macs"]),
                          "accuracy": float(uniform["accuracy"]),
                          "extra_mac_reduction": 1.0 - float(uniform["macs"]) / alone["macs"]}  # fmt: skip
    if row is None:
        return out
    trial = int(row["trial"])
    metrics = scorer.metrics(subnets[trial])
    disagree = float(np.mean(metrics["search"]["correct"] != row["correct"]))
    if disagree > 0.005:  # the extracted subnet against the supernet at its ranks: float rounding flips a few
        raise RuntimeError(f"trial {trial}: the extracted subnet disagrees with its search result on {disagree:.1%}")
    search_diff = paired_difference(metrics["search"]["correct"], alone["search"]["correct"])
    test_diff = paired_difference(metrics["test"]["correct"], alone["test"]["correct"])
    return {
        **out,
        "trial": trial,
        **summary(metrics, float(row["macs"])),
        "extra_mac_reduction": 1.0 - float(row["macs"]) / alone["macs"],
        "search_difference": search_diff[0],
        "search_difference_se": search_diff[1],
        "test_difference": test_diff[0],
        "test_difference_se": test_diff[1],
    }


def check_alone(run: fr.Run, alone: dict[str, Any], macs: float, technique: Technique) -> None:
    """The technique alone scores and costs here what the run's search recorded for its dense model (int8: the
    cost only; its accuracy is the quantized model's)."""
    recorded = run.store.read_json(ARTEFACTS.search_summary)
    if abs(recorded["dense_macs"] - macs) > 1e-6 * macs:
        raise RuntimeError(f"{technique.name}: dense MACs {macs} here, {recorded['dense_macs']} in the run")
    if not technique.int8 and abs(recorded["dense_accuracy"] - alone["search"]["accuracy"]) > 1e-9:
        raise RuntimeError(f"{technique.name}: dense accuracy {alone['search']['accuracy']} here, "
                           f"{recorded['dense_accuracy']} in the run's search")  # fmt: skip


def measure_technique(technique: Technique, run: fr.Run, base: fr.Run | None, rounds: int) -> dict[str, Any]:
    """Everything the table reports for one technique."""
    scorer = Scorer(run)
    alone_model, reference_model = alone_models(run, technique, base)
    dense_macs = float(run.supernet.cost.dense_macs)
    alone = scorer.metrics(alone_model)
    check_alone(run, alone, dense_macs, technique)
    front, subnets = candidates(run, technique, scorer)
    if not technique.int8:
        subnets = {int(t): run.subnet(int(t)) for t in front["trial"]}
    uniform = uniform_candidates(run, technique, scorer)
    rows = [drop_row(drop, {**alone, "macs": dense_macs}, front, uniform, scorer, subnets) for drop in DROPS]
    models = {"alone": alone_model, **{f"trial {r['trial']}": subnets[r["trial"]] for r in rows if r["reached"]}}
    reference = None
    if reference_model is not None:
        models["reference"] = reference_model
        reference_macs = dense_macs if technique.int8 else float(base.supernet.cost.dense_macs)
        reference = summary(scorer.metrics(reference_model), reference_macs)
    result = {
        "label": technique.label,
        "run": str(run.store.root),
        "overrides": list(technique.overrides),
        "alone": summary(alone, dense_macs),
        "reference": reference,
        "front": front[[c for c in FRONT_COLUMNS if c in front.columns]].to_dict("records"),
        "uniform": uniform.to_dict("records"),
        "rows": rows,
    }
    set_latency(result, measure_latency(models, scorer.input_shape, rounds))
    return result


def set_latency(result: dict[str, Any], latency: dict[str, dict[int, float]]) -> None:
    """Write the measured latencies into a technique's result, with the subnets' reductions against it alone."""
    result["alone"]["latency_ms"] = latency["alone"]
    for row in result["rows"]:
        if row["reached"]:
            row["latency_ms"] = latency[f"trial {row['trial']}"]
            row["extra_latency_reduction"] = {b: 1.0 - row["latency_ms"][b] / latency["alone"][b] for b in BATCHES}
    if result["reference"] is not None:
        result["reference"]["latency_ms"] = latency["reference"]


def retime(out: dict[str, Any], chosen: dict[str, Technique], runs_dir: Path, rounds: int) -> None:
    """Time the models of an earlier result again (the technique alone, the model without it, the chosen
    subnets, rebuilt from the runs) and replace its latencies: for a quieter machine than the scoring ran on."""
    for name, result in out["techniques"].items():
        technique, run = chosen[name], fr.Run.open(result["run"])
        base = fr.Run.open(runs_dir / chosen["int8"].run) if name == "tome" else None
        alone, reference = alone_models(run, technique, base)
        models = {"alone": alone} | ({"reference": reference} if reference is not None else {})
        for row in result["rows"]:
            if row["reached"]:
                subnet = run.subnet(row["trial"])
                models[f"trial {row['trial']}"] = quantize_int8(subnet) if technique.int8 else subnet
        data = run.config.data
        print(f"{name}: timing {len(models)} models again", flush=True)
        set_latency(result, measure_latency(models, (data.in_chans, data.img_size, data.img_size), rounds))


FRONT_COLUMNS = ("trial", "macs", "accuracy", "fp32_accuracy", "accuracy_se", "latency_ms")


def plain(data: Any) -> Any:
    """``data`` with numpy scalars as Python ones (for JSON)."""
    return json.loads(json.dumps(data, default=lambda o: o.item() if isinstance(o, np.generic) else str(o)))


# --- report -------------------------------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "n/a" if value is None or np.isnan(value) else f"{100 * value:+.1f}%"


def _cells(row: dict[str, Any]) -> list[str]:
    """The FLORA subnet, its savings and the uniform configuration of one drop, as table cells."""
    uniform = row.get("uniform")
    uniform_cell = "none" if uniform is None else f"{_pct(uniform['extra_mac_reduction'])} (1/{1 / uniform['ratio']:g})"
    if not row["reached"]:
        return [f"no front subnet reaches {row['target']:.2f}%", "n/a", "n/a", uniform_cell]
    subnet = (f"{row['macs'] / 1e6:.2f} (trial {row['trial']}), {row['search_accuracy']:.2f}% "
              f"({row['search_difference']:+.2f} ± {row['search_difference_se']:.2f}), "
              f"{row['test_accuracy']:.2f}% ({row['test_difference']:+.2f} ± {row['test_difference_se']:.2f})")  # fmt: skip
    latency = " / ".join(_pct(row["extra_latency_reduction"][b]) for b in BATCHES)
    return [subnet, f"**{_pct(row['extra_mac_reduction'])}**", latency, uniform_cell]


def table(results: dict[str, Any]) -> str:
    """The markdown table of every technique and drop."""
    lines = [
        "| technique | alone: MMACs, search acc, test acc, ms b1/b32 | drop | FLORA subnet: MMACs, search acc "
        "(paired vs alone), test acc (paired) | extra MAC reduction | extra latency reduction b1 / b32 | "
        "uniform ranks instead (ratio) | paper |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for result in results.values():
        a = result["alone"]
        alone = (f"{a['macs'] / 1e6:.2f}, {a['search_accuracy']:.2f}%, {a['test_accuracy']:.2f}%, "
                 f"{a['latency_ms'][1]:.3f}/{a['latency_ms'][32]:.2f} ms")  # fmt: skip
        for row in result["rows"]:
            cells = [result["label"], alone, f"{row['drop']} pt", *_cells(row), "21-26%"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def reference_lines(results: dict[str, Any]) -> list[str]:
    """The technique's own effect: the technique alone against the model without it."""
    lines = []
    for result in results.values():
        ref, alone = result["reference"], result["alone"]
        if ref is None:
            continue
        lines.append(
            f"- {result['label']} alone vs without it: {alone['macs'] / 1e6:.2f} vs {ref['macs'] / 1e6:.2f} MMACs, "
            f"search {alone['search_accuracy']:.2f}% vs {ref['search_accuracy']:.2f}%, test "
            f"{alone['test_accuracy']:.2f}% vs {ref['test_accuracy']:.2f}%, latency b1 "
            f"{alone['latency_ms'][1]:.3f} vs {ref['latency_ms'][1]:.3f} ms, b32 "
            f"{alone['latency_ms'][32]:.2f} vs {ref['latency_ms'][32]:.2f} ms"
        )
    return lines


def parse_args():
    parser = bench_parser(__doc__, smoke_help="tiny digits runs in process (under OUTPUT/runs): about a minute")
    parser.add_argument("--techniques", nargs="+", choices=TECHNIQUES, default=list(TECHNIQUES))
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="proving_ground",
                        help="the runs' schedule (default: proving_ground; quickstart: shorter)")  # fmt: skip
    parser.add_argument("--tome-r", type=int, default=2, help="tokens merged per block (default 2)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved latency rounds (fastest kept)")
    parser.add_argument("--runs-dir", type=Path, default=None, help="where the runs live (default: ./runs)")
    parser.add_argument("--retime", action="store_true", help="only time the models of the last result again")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.tome_r < 1:
        raise SystemExit(f"error: --tome-r {args.tome_r}: token merging needs r >= 1 token per block")
    runs_dir = args.runs_dir or (args.output / "runs" if args.smoke else ROOT / "runs")
    chosen = techniques(args.tome_r, args.smoke, RECIPES[args.recipe])
    recipe = "smoke" if args.smoke else args.recipe
    path = args.output / f"orthogonality_{recipe}.json"
    if args.retime:
        out = read_json(path, "an earlier result (run without --retime first)")
        retime(out, chosen, runs_dir, args.rounds)
        out["retimed"] = {**environment(1), "rounds": args.rounds}
        print(table(out["techniques"]))
        write_result(path, plain(out))
        return
    base = prepare(chosen["int8"], runs_dir, args.smoke) if {"tome", "int8"} & set(args.techniques) else None
    results = {}
    for name in args.techniques:
        run = base if name == "int8" else prepare(chosen[name], runs_dir, args.smoke)
        print(f"{name}: scoring and timing", flush=True)
        results[name] = measure_technique(chosen[name], run, base, 1 if args.smoke else args.rounds)
        results[name]["measured"] = environment(1)  # per technique: a later call may add another one
    print(table(results))
    print("\n".join(reference_lines(results)))
    earlier = read_json(path)["techniques"] if path.is_file() else {}  # the techniques not measured this time
    merged = {**earlier, **results}
    results = {name: merged[name] for name in TECHNIQUES if name in merged}
    out = {**environment(1), "smoke": args.smoke, "recipe": recipe, "paper": PAPER, "drops": DROPS, "batches": BATCHES,
           "rounds": 1 if args.smoke else args.rounds, "techniques": results}  # fmt: skip
    write_result(path, plain(out))


if __name__ == "__main__":
    main()

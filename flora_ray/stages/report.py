"""``report.md``: a finished run summarised from the files in its directory.

Dense accuracy and costs, the Pareto front as a table, the uniform baseline (accuracies with their binomial
standard errors), the gain of the front over uniform ranks at 0.5, 1, 2 and 3 accuracy points below dense with the
paired front - uniform accuracy difference and whether it is within noise, the front's accuracy advantage at 25%,
33% and 50% of the dense cost (all on the searched cost axis: MACs, parameters or predicted latency; inherited
accuracies on the search images: ``experiments/benchmarks/ranking_fidelity.py`` gives the same figures after
fine-tuning), the exported subnet with its test accuracy and its latency measured on the target device next to the
prediction, the fine-tuned subnets with their test accuracy before and after, each stage's wall time, and where the
Parquet files and plots are. Everything is read back from the run directory, so the report can be rebuilt at any
time (``write_report(run)``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from flora_ray.errors import MissingInput
from flora_ray.records import ExportReport, FinetuneReport, SearchSummary, StageMarker, TargetLatency
from flora_ray.results import (
    GAIN_BUDGETS,
    GAIN_DROPS,
    NOISE_SE,
    best_under,
    cheapest_within,
    compare_paired,
    format_cost,
    gain_over_uniform,
    load_front,
    load_trials,
    load_uniform,
    row_se,
)
from flora_ray.search.interactive import front_html
from flora_ray.storage.run_store import ARTEFACTS, RunStore

DROPS = GAIN_DROPS  # accuracy points below dense at which the front's extra cost reduction is reported


def _macs(macs: float) -> str:
    """A MAC count with its unit: ``8.04 G`` or ``3.90 M``."""
    return f"{macs / 1e9:.2f} G" if macs >= 1e9 else f"{macs / 1e6:.2f} M"


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _dense_section(markers: dict[str, StageMarker], search: SearchSummary, export: ExportReport | None) -> list[str]:
    pretrain = markers["pretrain"].summary if "pretrain" in markers else {}
    test_acc = pretrain.get("metrics", {}).get("test_acc")
    if test_acc is None and export is not None:
        test_acc = export.dense_test_accuracy
    tuned = pretrain.get("fine_tuned")
    source = pretrain.get("skipped") or (
        f"model.pretrained {tuned['from']!r} ({tuned['pretrained_classes']} classes) fine-tuned by `flora-ray "
        f"pretrain` to the data's {tuned['classes']} classes (teacher.safetensors)"
        if tuned
        else "trained by `flora-ray pretrain` (teacher.safetensors)"
    )
    lines = ["## Dense model", "", f"- weights: {source}", f"- cost: {_macs(search.dense_macs)}MACs per image"]
    if _known(search.dense_latency_ms):
        lines.append(f"- latency (predicted, batch {search.latency_batch}): {search.dense_latency_ms:.3f} ms")
    lines.append(
        f"- accuracy: {search.dense_accuracy:.2f}%"
        + (f" ± {search.dense_accuracy_se:.2f}" if _known(search.dense_accuracy_se) else "")
        + (f" on {search.eval_images} search images" if search.eval_images else " on the search images")
        + (f", {test_acc:.2f}% on the test split" if test_acc is not None else "")
    )
    return lines


def _known(value: Any) -> bool:
    return isinstance(value, int | float) and value == value  # not None, not NaN


def _cost_cells(r: Any, axis: str, dense: float) -> list[str]:
    """MACs, parameters, predicted latency and the searched axis as a share of dense."""
    latency = f"{r.latency_ms:.3f}" if _known(getattr(r, "latency_ms", None)) else "-"
    return [_macs(r.macs), f"{r.params / 1e6:.3f}", latency, f"{100 * getattr(r, axis) / dense:.1f}%"]


def _accuracy_cell(r: Any) -> str:
    """Accuracy with its standard error where the run recorded one: ``86.48 ± 0.44``."""
    se = getattr(r, "accuracy_se", None)
    return f"{r.accuracy:.2f}" + (f" ± {se:.2f}" if _known(se) else "")


def _front_section(front: pd.DataFrame, axis: str, dense: float, dense_acc: float) -> list[str]:
    rows = [
        [str(int(r.trial)), *_cost_cells(r, axis, dense), _accuracy_cell(r), f"{r.accuracy - dense_acc:+.2f}"]
        for r in front.itertuples()
    ]
    headers = ["trial", "MACs", "M params", "latency (ms, pred.)", f"{axis} of dense", "search acc (%)",
               "vs dense (pts)"]  # fmt: skip
    return [f"## Pareto front ({len(front)} subnets, searched on {axis})", "", *_table(headers, rows)]


def _uniform_section(uniform: pd.DataFrame, axis: str, dense: float, dense_acc: float) -> list[str]:
    rows = [
        [f"{r.ratio:.4g}", *_cost_cells(r, axis, dense), _accuracy_cell(r), f"{r.accuracy - dense_acc:+.2f}"]
        for r in uniform.sort_values(axis).itertuples()
    ]
    headers = ["rank ratio", "MACs", "M params", "latency (ms, pred.)", f"{axis} of dense", "search acc (%)",
               "vs dense (pts)"]  # fmt: skip
    return ["## Uniform ranks (baseline)", "", *_table(headers, rows)]


def _gain_section(
    front: pd.DataFrame, uniform: pd.DataFrame, dense_acc: float, axis: str
) -> tuple[list[str], dict[str, Any], dict[str, Any]]:
    lines = ["## Gain over uniform ranks", ""]
    gains: dict[str, Any] = {}
    noise: dict[str, Any] = {}
    for drop in DROPS:
        target = dense_acc - drop
        ours, theirs = cheapest_within(front, target, axis), cheapest_within(uniform, target, axis)
        gain = gain_over_uniform(front, uniform, drop, reference_accuracy=dense_acc, cost=axis)
        gains[str(drop)] = gain

        def describe(row):
            if row is None:
                return "none reaches it"
            se = row_se(row)
            return f"{format_cost(axis, row[axis])} ({row['accuracy']:.2f}%" + (f" ± {se:.2f})" if se else ")")

        verdict = "n/a" if gain is None else f"**{100 * gain:+.1f}%** less {axis}"
        note, noise[str(drop)] = _noise_note(ours, theirs, uniform, target, axis)
        note += uniform_itself(ours, uniform)
        lines.append(
            f"- within {drop:g} pt of dense (>= {target:.2f}%): front {describe(ours)}, uniform {describe(theirs)}: "
            f"{verdict}{note}"
        )
    lines += ["", NOISE_RULE]
    return lines, gains, noise


def uniform_itself(row: pd.Series | None, uniform: pd.DataFrame) -> str:
    """A note when a front point is a uniform configuration: there the search found nothing better than it."""
    if row is None or "ranks" not in uniform or "ranks" not in row:
        return ""
    ranks = json.loads(row["ranks"]) if isinstance(row["ranks"], str) else None
    same = [u.ratio for u in uniform.itertuples() if isinstance(u.ranks, str) and json.loads(u.ranks) == ranks]
    if ranks is None or not same:
        return ""
    return f"; the front's point is uniform {float(same[0]):.4g} itself: the search found nothing better"


def _budget_section(
    front: pd.DataFrame, uniform: pd.DataFrame, dense: float, axis: str
) -> tuple[list[str], dict[str, Any]]:
    """The front's accuracy advantage over the best uniform configuration at fixed shares of the dense cost, with
    the paired difference's standard error where the run recorded per-image results."""
    lines = ["## Accuracy at fixed budgets", ""]
    advantages: dict[str, Any] = {}
    for share in GAIN_BUDGETS:
        limit = share * dense
        ours, theirs = best_under(front, limit, axis), best_under(uniform, limit, axis)
        key = f"{share:.4g}"
        if ours is None or theirs is None:
            advantages[key] = None
            missing = "nothing on the front" if ours is None else "no uniform configuration"
            lines.append(f"- at most {100 * share:.0f}% of dense ({format_cost(axis, limit)}): {missing} is that cheap")
            continue
        advantage = float(ours["accuracy"]) - float(theirs["accuracy"])
        paired = compare_paired(ours, theirs)
        advantages[key] = {"advantage": advantage, "paired": paired}
        noise = "" if paired is None else (
            f" ± {paired['se']:.2f} (paired), {'within' if paired['within_noise'] else 'beyond'} noise")  # fmt: skip
        lines.append(
            f"- at most {100 * share:.0f}% of dense ({format_cost(axis, limit)}): front {ours['accuracy']:.2f}% at "
            f"{format_cost(axis, ours[axis])}, uniform {theirs['accuracy']:.2f}% at {format_cost(axis, theirs[axis])}"
            f" (ratio {theirs['ratio']:.4g}): **{advantage:+.2f} pt**{noise}{uniform_itself(ours, uniform)}"
        )
    return lines, advantages


NOISE_RULE = (
    f"Noise: ± is one binomial standard error, sqrt(p (1 - p) / n) on the n search images. Front and uniform points "
    f"are scored on the same images, so their difference is paired: SE = sqrt(b + c - (b - c)^2 / n) / n, with b "
    f"and c the images only one of the two gets right. A difference is within noise when it is below {NOISE_SE:g} "
    f"SE; a point that clears (or misses) the target by less than {NOISE_SE:g} SE is a close call, on which the gain "
    "depends."
)


def _noise_note(
    ours: pd.Series | None, theirs: pd.Series | None, uniform: pd.DataFrame, target: float, axis: str
) -> tuple[str, dict[str, Any]]:
    """The paired front - uniform accuracy difference of one gain, and its close calls: the front point clearing
    the target, or a cheaper uniform configuration missing it, by less than ``NOISE_SE`` standard errors."""
    if ours is None or theirs is None:
        return "", {}
    paired = compare_paired(ours, theirs)
    info: dict[str, Any] = {"paired": paired, "close_calls": []}
    parts = []
    if paired is not None:
        verdict = "within noise" if paired["within_noise"] else "beyond noise"
        if not paired["within_noise"] and paired["difference"] < 0:
            verdict += ": the front point is less accurate, part of the gain is paid in accuracy"
        parts.append(f"front - uniform {paired['difference']:+.2f} ± {paired['se']:.2f} pt (paired), {verdict}")
    se = row_se(ours)
    if se and ours["accuracy"] - target < NOISE_SE * se:
        info["close_calls"].append("front")
        parts.append(f"close call: the front point clears the target by {ours['accuracy'] - target:.2f} pt")
    below = uniform[(uniform["accuracy"] < target) & (uniform[axis] < theirs[axis])].sort_values(axis)
    if len(below):
        nearest = below.iloc[-1]  # the dearest uniform configuration below the target
        se = row_se(nearest)
        if se and target - nearest["accuracy"] < NOISE_SE * se:
            info["close_calls"].append("uniform")
            alternative = 1.0 - float(ours[axis]) / float(nearest[axis])
            parts.append(
                f"close call: uniform {format_cost(axis, nearest[axis])} misses the target by "
                f"{target - nearest['accuracy']:.2f} pt (with it the gain would be {100 * alternative:+.1f}%)"
            )
    return ("; " + "; ".join(parts) if parts else ""), info


def _export_section(export: ExportReport) -> list[str]:
    lat = export.latency
    return [
        "## Exported subnet (knee point of the front)",
        "",
        f"- trial {export.trial}: {_macs(export.macs)}MACs ({100 * export.macs_share:.1f}% "
        f"of dense), {export.params / 1e6:.3f} M params",
        f"- accuracy: {export.test_accuracy:.2f}% on the test split ({export.search_accuracy:.2f}% on the search "
        "images)",
        f"- CPU latency ({export.threads} thread(s), median): batch 1 {lat.subnet_batch1_ms:.2f} ms "
        f"(dense {lat.dense_batch1_ms:.2f} ms), batch 32 {lat.subnet_batch32_ms:.2f} ms "
        f"(dense {lat.dense_batch32_ms:.2f} ms)",
        *_target_latency_lines(export.target_latency),
        f"- files: `{export.directory}` (model.safetensors, subnet.json, config.json, README.md model card, export.json)",
    ]


def _finetune_section(results: list[FinetuneReport]) -> list[str]:
    rows = [
        [str(r.trial), _macs(r.macs), f"{r.test_accuracy_before:.2f}", f"{r.test_accuracy:.2f}", f"{r.change:+.2f}",
         str(r.epochs), f"{r.seconds:.0f}", f"`{r.directory}`"]
        for r in results
    ]  # fmt: skip
    headers = ["trial", "MACs", "test acc before (%)", "test acc after (%)", "change (pts)", "epochs", "seconds",
               "files"]  # fmt: skip
    return ["## Fine-tuned subnets (distilled from the teacher)", "", *_table(headers, rows)]


def _target_latency_lines(target: TargetLatency | None) -> list[str]:
    """Measured against predicted latency on the target device, per profiled batch size."""
    if not target:
        return []
    device = target.device
    lines = [f"- latency on the target device ({device['name']}, {device['dtype']}, {device['threads']} thread(s)):"]
    for batch, b in target.batches.items():
        lines.append(
            f"  - batch {batch}: measured {b.measured_ms:.3f} ms, predicted {b.predicted_ms:.3f} ms "
            f"({b.error_pct:+.1f}%); dense measured {b.dense_measured_ms:.3f} ms, predicted "
            f"{b.dense_predicted_ms:.3f} ms"
        )
    return lines


def _closing_sections(store: RunStore, search: SearchSummary, markers: dict[str, StageMarker]) -> list[str]:
    """The search's figures, each stage's wall time and where the results are."""
    return [
        "## Search",
        "",
        f"- {search.complete} of {search.trials} trials complete ({search.failed} failed), "
        f"{search.distinct} distinct configurations "
        f"({search.repeats_answered} repeated proposals answered from earlier evaluations), "
        f"{search.trials_per_second:.2f} trials/s, hypervolume {search.hypervolume_share:.4f} of the "
        f"box up to 1.01 x the dearest uniform configuration and 100%",
        *(
            [
                f"- evaluated first: the uniform configurations and {search.guided_anchors} sensitivity-guided "
                f"allocations (the least sensitive layers lowered first; `{ARTEFACTS.sensitivity}`)"
            ]
            if search.guided_anchors
            else []
        ),
        "",
        "## Stage wall times",
        "",
        *_table(["stage", "seconds"], [[s, f"{m.seconds:.0f}"] for s, m in markers.items()]),
        "",
        "## Files",
        "",
        *[
            f"- `{store.location(name)}`"
            for name in (
                ARTEFACTS.trials,
                ARTEFACTS.pareto,
                ARTEFACTS.uniform,
                ARTEFACTS.pareto_plot,
                ARTEFACTS.hypervolume_plot,
            )
        ],
        f"- [`{ARTEFACTS.front_html}`]({ARTEFACTS.front_html}): the interactive front (open it in a browser; hover a "
        "point for its trial, ranks and costs)",
        "",
    ]


def build_report(run: str | Path | RunStore) -> tuple[str, dict[str, Any]]:
    """The markdown report of a searched run, and its key figures as a dict."""
    store = run if isinstance(run, RunStore) else RunStore(run)
    if not store.is_file(ARTEFACTS.search_summary):
        raise MissingInput(f"{store.location(ARTEFACTS.search_summary)!r} does not exist: run the search stage first")
    search = SearchSummary.read(store)
    front, uniform = load_front(store), load_uniform(store)
    markers = StageMarker.read_all(store)
    export = ExportReport.from_dict(markers["export"].summary) if "export" in markers else None
    dense_acc, dense_macs = float(search.dense_accuracy), float(search.dense_macs)
    axis = search.cost_axis
    dense = search.dense(axis)
    lines = [f"# flora-ray report: {store.name}", ""]
    lines += [*_dense_section(markers, search, export), ""]
    lines += [*_front_section(front, axis, dense, dense_acc), ""]
    lines += [*_uniform_section(uniform, axis, dense, dense_acc), ""]
    gain_lines, gains, noise = _gain_section(front, uniform, dense_acc, axis)
    budget_lines, advantages = _budget_section(front, uniform, dense, axis)
    lines += [*gain_lines, "", *budget_lines, ""]
    if export is not None:
        lines += [*_export_section(export), ""]
    tuned = FinetuneReport.read_all(store)
    if tuned:
        lines += [*_finetune_section(tuned), ""]
    lines += _closing_sections(store, search, markers)
    figures = {
        "dense_accuracy": dense_acc,
        "dense_macs": dense_macs,
        "cost_axis": axis,
        "front_size": len(front),
        "gain_over_uniform": gains,
        "gain_noise": noise,
        "advantage_at_budget": advantages,
        "eval_images": search.eval_images,
        "export": None if export is None else export.to_dict(),
        "finetune": [r.stage_summary() for r in tuned],
        "stage_seconds": {s: m.seconds for s, m in markers.items()},
    }
    return "\n".join(lines), figures


def write_report(run: str | Path | RunStore) -> tuple[str, str]:
    """Write ``report.md``, ``report.json`` and the interactive front ``front.html`` into the run; returns the
    report's location and the markdown."""
    store = run if isinstance(run, RunStore) else RunStore(run)
    text, figures = build_report(store)
    store.write_text(ARTEFACTS.front_html, interactive_front(store))
    store.write_text(ARTEFACTS.report, text)
    store.write_text(ARTEFACTS.report_json, json.dumps(figures, indent=2, default=float))
    return store.location(ARTEFACTS.report), text


def interactive_front(store: RunStore) -> str:
    """The run's ``front.html``: trials, front, uniform baseline and dense on the searched cost axis."""
    search = SearchSummary.read(store)
    dense = {axis: search.dense(axis) for axis in ("macs", "params", "latency_ms")}
    dense["accuracy"] = float(search.dense_accuracy)
    trials, front, uniform = load_trials(store), load_front(store), load_uniform(store)
    return front_html(trials, front, uniform, dense, search.cost_axis)


def report_stage(cfg: Any, backend: Any = None) -> dict[str, Any]:
    """Write the run's report (in this process, whatever the backend); with tracking, log the results to MLflow."""
    from flora_ray.stages.inputs import open_run
    from flora_ray.tracking import log_results

    store = open_run(cfg)
    location, _ = write_report(store)
    mlflow_run = log_results(cfg, store, json.loads(store.read_text(ARTEFACTS.report_json)))
    return {"report": location, **({"mlflow_run": mlflow_run} if mlflow_run else {})}

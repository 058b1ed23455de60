"""The typed run records (``flora_ray.records``) on files as earlier versions wrote them: missing optional
keys get their defaults, unknown keys are kept and written back, a missing required key is named; the report, the
command line and the search's completion check read them. No run, no torch model."""

import math

import pandas as pd
import pytest

from flora_ray.cli import format_export, format_finetune, format_summary
from flora_ray.records import ExportReport, FinetuneReport, RefineSummary, SearchSummary, StageMarker
from flora_ray.stages import STAGES
from flora_ray.stages.report import build_report
from flora_ray.storage.run_store import ARTEFACTS, RunStore

# search_summary.json as flora-ray wrote it on 2026-11-28 (before the latency objective, per-image correctness,
# repeated proposals and the budget were recorded): the keys of that version's write_search_outputs.
SEARCH_2026_11_28 = {"trials": 12, "complete": 11, "failed": 1, "front_size": 3, "hypervolume": 1.5e9,
                     "trials_per_second": 0.5, "dense_macs": 100e6, "dense_accuracy": 90.0, "seconds": 24.0,
                     "evaluator_builds": {"123": 1}}  # fmt: skip
# export.json of the same version: always evaluated, no formats, no int8, no target latency, no device.
EXPORT_2026_11_28 = {"trial": 3, "directory": "runs/old/export/trial_3", "macs": 40e6, "dense_macs": 100e6,
                     "params": 1e5, "search_accuracy": 88.0, "test_accuracy": 87.5, "dense_test_accuracy": 89.0,
                     "latency": {"subnet_batch1_ms": 1.0, "dense_batch1_ms": 2.0, "subnet_batch32_ms": 10.0,
                                 "dense_batch32_ms": 20.0},
                     "threads": 1, "versions": {"torch": "2.5.0"}}  # fmt: skip
FINETUNE_BEFORE_SETTINGS = {"trial": 3, "ranks": {"blocks.0.attn.qkv": 4}, "macs": 40e6, "dense_macs": 100e6,
                            "params": 1e5, "search_accuracy": 88.0, "test_accuracy_before": 87.5,
                            "test_accuracy": 88.5, "epochs": 2, "seconds": 30.0, "history": [{"epoch": 1}],
                            "directory": "runs/old/finetune/trial_3"}  # fmt: skip


def test_an_older_search_summary_reads_with_defaults():
    summary = SearchSummary.from_dict(SEARCH_2026_11_28)
    assert summary.spent == 12 and summary.distinct == 11 and summary.budget is None  # complete + failed
    assert summary.hypervolume_share == 0.0 and summary.repeats_answered == 0 and summary.cost_axis == "macs"
    assert summary.dense("macs") == 100e6 and math.isnan(summary.dense("latency_ms"))
    written = summary.to_dict()
    assert {k: written[k] for k in SEARCH_2026_11_28} == SEARCH_2026_11_28 and "dense_correct" not in written
    assert "3" in summary.describe() and "0.50 trials/s" in summary.describe()


def test_the_search_check_counts_an_older_summary_complete_plus_failed(digits_config):
    cfg = digits_config("search.trials=12")
    assert STAGES["search"].left_work(cfg, SEARCH_2026_11_28) is None
    short = {**SEARCH_2026_11_28, "complete": 5}
    assert STAGES["search"].left_work(cfg, short) == (
        "search stopped after 6 of 12 trials; re-run the same command to continue"
    )


def test_an_older_export_reads_evaluated_and_prints():
    report = ExportReport.from_dict(EXPORT_2026_11_28)
    assert report.evaluated and report.formats == {} and report.int8 is None and report.target_latency is None
    assert report.latency.dense_batch32_ms == 20.0 and report.macs_share == 0.4
    written = report.to_dict()
    assert {k: written[k] for k in EXPORT_2026_11_28} == EXPORT_2026_11_28 and "int8" not in written
    text = format_export(EXPORT_2026_11_28)
    assert text.startswith("trial 3: 40.00 MMACs (40% of dense), search acc 88.00%, test acc 87.50%")
    assert "CPU latency batch 1: 1.00 ms (dense 2.00)" in text and text.endswith("runs/old/export/trial_3")


def test_an_older_finetune_report_reads_and_prints():
    report = FinetuneReport.from_dict(FINETUNE_BEFORE_SETTINGS)
    assert report.settings == {} and report.device is None and report.change == pytest.approx(1.0)
    assert "history" not in report.stage_summary() and report.to_dict()["history"] == [{"epoch": 1}]
    assert "87.50% -> 88.50% (+1.00 pts) after 2 epoch(s)" in format_finetune(report)


# refine.json of two budgets: a front point that beats the uniform configuration by less than one paired standard
# error, and a budget no uniform configuration is within.
REFINE = {
    "budgets": [
        {"axis": "macs", "value": 2e6, "candidates": 4, "verdict": "close call", "difference": 0.4, "se": 0.5,
         "winner": {"kind": "front", "trial": 7, "macs": 1.9e6, "params": 1e5, "inherited_accuracy": 85.0,
                    "test_accuracy": 87.0},
         "uniform": {"kind": "uniform", "ratio": 0.25, "macs": 1.8e6, "params": 9e4, "inherited_accuracy": 84.0,
                     "test_accuracy": 86.6}},
        {"axis": "params", "value": 1e5, "candidates": 2, "verdict": "no uniform",
         "winner": {"kind": "front", "trial": 3, "macs": 1.8e6, "params": 9e4, "inherited_accuracy": 84.0,
                    "test_accuracy": 86.6}},
    ],
    "k": 3, "settings": {"epochs": 2}, "fine_tunes": 5, "test_images": 10000, "seed": 0, "seconds": 300.0,
}  # fmt: skip


def test_a_refine_summary_reads_its_nested_budgets_and_prints_one_line_each(tmp_path):
    summary = RefineSummary.from_dict(REFINE)
    first, second = summary.budgets
    assert first.winner.trial == 7 and first.uniform.ratio == 0.25 and second.uniform is None
    assert summary.to_dict()["budgets"][0] == {**REFINE["budgets"][0], "winner": {
        **REFINE["budgets"][0]["winner"], "ratio": None, "latency_ms": None}, "uniform": {
        **REFINE["budgets"][0]["uniform"], "trial": None, "latency_ms": None}}  # fmt: skip
    lines = summary.describe().splitlines()
    assert lines[0] == ("macs <= 2.00 MMACs: trial 7 (1.90 MMACs) 87.00% after fine-tuning (inherited 85.00%), best "
                        "of 4; best uniform (uniform 0.25) 86.60%: +0.40 ± 0.50 pt (paired), close call")  # fmt: skip
    assert lines[1].startswith("params <= 0.100 M params: trial 3 (0.090 M params) 86.60%")
    assert lines[1].endswith("; no uniform configuration is within the budget")
    assert lines[2] == "  5 fine-tune(s) of 2 epoch(s), scored on the same 10000 test images, in 300 s"
    summary.write(RunStore(tmp_path))
    assert RefineSummary.read(RunStore(tmp_path)) == summary
    with pytest.raises(ValueError, match=r"'budgets'\[1\], 'winner' has no 'kind'"):
        RefineSummary.from_dict({**REFINE, "budgets": [REFINE["budgets"][0], {**REFINE["budgets"][1], "winner": {}}]})


def test_unknown_keys_are_kept_and_a_missing_required_key_is_named():
    later = {**EXPORT_2026_11_28, "evaluated": False, "energy_mj": 3.5}
    report = ExportReport.from_dict(later)
    assert report.extra == {"energy_mj": 3.5} and report.to_dict()["energy_mj"] == 3.5
    assert "test_accuracy" not in report.to_dict()  # not evaluated: the evaluation's keys are not written
    marker = StageMarker.from_dict({"stage": "train", "seconds": 1.0, "finished_at": "2026-11-28T00:00:00+00:00",
                                    "summary": {}, "host": "a"})  # fmt: skip
    assert marker.to_dict()["host"] == "a"
    with pytest.raises(ValueError, match="stages/x.json has no 'dense_accuracy'"):
        SearchSummary.from_dict({k: v for k, v in SEARCH_2026_11_28.items() if k != "dense_accuracy"},
                                source="stages/x.json")  # fmt: skip


def test_the_report_of_a_run_whose_files_an_older_version_wrote(tmp_path):
    store = RunStore(tmp_path / "run")
    front = pd.DataFrame({"trial": [3], "macs": [40e6], "params": [1e5], "accuracy": [88.0], "state": ["COMPLETE"]})
    uniform = pd.DataFrame({"ratio": [0.5, 1.0], "macs": [50e6, 100e6], "params": [1e5, 2e5], "accuracy": [87.0, 90.0]})
    for name, frame in ((ARTEFACTS.pareto, front), (ARTEFACTS.trials, front), (ARTEFACTS.uniform, uniform)):
        store.write_parquet(name, frame, {})
    store.write_json(ARTEFACTS.search_summary, SEARCH_2026_11_28)
    for second, (stage, summary) in enumerate((("search", SEARCH_2026_11_28), ("export", EXPORT_2026_11_28))):
        store.write_json(ARTEFACTS.stage_marker(stage), {"stage": stage, "seconds": 2.0,
                                                         "finished_at": f"2026-11-28T00:00:0{second}+00:00",
                                                         "summary": summary})  # fmt: skip
    text, figures = build_report(store)
    assert "11 of 12 trials complete (1 failed), 11 distinct configurations (0 repeated" in text
    assert "- trial 3: 40.00 MMACs (40.0% of dense)" in text and "batch 1 1.00 ms (dense 2.00 ms)" in text
    assert figures["export"]["evaluated"] is True and list(figures["stage_seconds"]) == ["search", "export"]


def test_stage_commands_print_what_their_table_entry_says():
    assert format_summary("pretrain", {"skipped": "weights"}, 1.0) == "pretrain: skipped (weights)"
    text = format_summary("train", {"output": "s.safetensors", "metrics": {"epoch": 2, "loss": 0.5}}, 3.0)
    assert text == "train: done in 3 s -> s.safetensors\n  epoch 2, loss 0.5"
    assert format_summary("search", SEARCH_2026_11_28, 24.0).startswith("search: 11/12 trials complete (1 failed)")
    planned = [name for name, stage in STAGES.items() if stage.demand is not None]
    assert planned == ["profile", "pretrain", "filter", "train", "search", "export"]

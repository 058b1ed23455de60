"""The typed run records (``flora_ray.records``) against the files a real run wrote: the digits run of
``tests/api/conftest.py``. Each file read into its record and written back is the file, key for key and in order;
the records agree with the frames and with each other."""

import json
import shutil

import pytest

import flora_ray as fr
from flora_ray.records import ExportReport, FinetuneReport, SearchSummary, StageMarker
from flora_ray.stages import STAGES
from flora_ray.stages.finetune import FINETUNE_FILE, finetune_from_run
from flora_ray.storage.run_store import ARTEFACTS


def _raw(store, name):
    return json.loads(store.read_text(name))


def _round_trips(record_type, data):
    written = record_type.from_dict(data).to_dict()
    assert written == data and list(written) == list(data)


def test_the_search_summary_round_trips_and_matches_the_frames(finished):
    run, *_ = finished
    raw = _raw(run.store, ARTEFACTS.search_summary)
    _round_trips(SearchSummary, raw)
    summary = run.search_summary
    assert summary.dense_correct is not None and summary.extra == {}
    assert summary.complete == int((run.trials["state"] == "COMPLETE").sum()) and summary.front_size == len(run.front)
    assert summary.spent == summary.budget and summary.dense("macs") == raw["dense_macs"]
    assert run.stages["search"].summary == summary.stage_summary()  # the marker: the file less dense_correct
    assert "dense_correct" not in summary.stage_summary()


def test_every_stage_marker_round_trips(finished):
    run, *_ = finished
    markers = run.stages
    assert list(markers) == list(STAGES)  # every stage, in the order they finished
    for stage, marker in markers.items():
        _round_trips(StageMarker, _raw(run.store, ARTEFACTS.stage_marker(stage)))
        assert marker.stage == stage and marker.seconds >= 0 and marker == StageMarker.read(run.store, stage=stage)
    assert markers["finetune"].skipped == "finetune.enabled is false" and markers["search"].skipped is None


def test_the_export_report_round_trips_in_its_folder_and_its_marker(finished):
    run, *_ = finished
    summary = run.stages["export"].summary
    _round_trips(ExportReport, summary)
    export = ExportReport.from_dict(summary)
    assert export.trial == int(run.knee()["trial"]) and export.evaluated and export.latency.subnet_batch1_ms > 0
    folder = _raw(run.store, f"{ARTEFACTS.export_dir(export.trial)}/export.json")
    _round_trips(ExportReport, folder)
    assert list(folder) == list(summary)  # other tests of the session may export this trial into the run again


def test_an_export_without_evaluation_round_trips(finished, tmp_path):
    run, *_ = finished
    report = run.export(run.knee(), output=tmp_path / "e", evaluate=False, backend="local")
    written = json.loads((tmp_path / "e" / "export.json").read_text())
    _round_trips(ExportReport, written)
    assert written == report and not ExportReport.from_dict(written).evaluated


@pytest.mark.slow
def test_the_finetune_report_round_trips_in_its_folder_and_in_the_run(finished, tmp_path):
    run, *_ = finished
    shutil.copytree(run.location, tmp_path / "run", ignore=shutil.ignore_patterns(ARTEFACTS.ray))
    copy = fr.Run.open(tmp_path / "run")
    overrides = ["finetune.epochs=1", "finetune.batch_size=32", "finetune.eval_images=50"]
    report = finetune_from_run(copy.store, knee=True, overrides=overrides)
    folder = _raw(copy.store, f"{ARTEFACTS.finetune_dir(report['trial'])}/{FINETUNE_FILE}")
    _round_trips(FinetuneReport, folder)
    stored = _raw(copy.store, ARTEFACTS.finetune_result(report["trial"]))
    _round_trips(FinetuneReport, stored)
    assert folder == stored == report and len(report["history"]) == 1
    (typed,) = copy.finetunes
    assert typed.trial == report["trial"] and typed.change == pytest.approx(
        report["test_accuracy"] - report["test_accuracy_before"]
    )
    assert "history" not in typed.stage_summary() and set(typed.stage_summary()) == set(folder) - {"history"}

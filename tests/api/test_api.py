"""The Python API: ``flora_ray.run`` runs the pipeline in process, ``flora_ray.Run`` opens its results.

One digits run (``finished`` in ``tests/api/conftest.py``) made by ``flora_ray.run``; the run object's frames, study, knee, budget picks, subnets and exports are checked against the run's files and the
results functions they stand for. (The same object on object storage: ``tests/cluster/test_cluster_true_runs.py``.)
"""

import json

import pandas as pd
import pytest
import torch
from conftest import DIGITS_OVERRIDES
from helpers import input_for

import flora_ray as fr
from flora_ray.config import load_config
from flora_ray.results import best_under, knee_point, load_front, load_trials, load_uniform
from flora_ray.search.study import DUPLICATE_OF
from flora_ray.storage.run_store import ARTEFACTS

pytestmark = pytest.mark.slow


def test_run_returns_the_run_and_open_finds_it_again(finished):
    run, base, overrides = finished
    assert isinstance(run, fr.Run) and {"Run", "run"} <= set(fr.__all__)
    assert run.location == str(base / "runs" / "api")
    again = fr.Run.open(base / "runs" / "api")
    assert again.config == run.config == load_config(None, [*overrides, f"run.output_dir={base / 'runs'}"])
    for stage in ("profile", "pretrain", "filter", "train", "search", "export", "report"):
        assert run.store.is_file(ARTEFACTS.stage_marker(stage)), stage
    assert run.report.startswith("# ") and "front" in run.report


def test_running_a_finished_run_again_starts_no_ray(finished, monkeypatch):
    """Every stage done: ``fr.run`` on the default (Ray) backend skips them all without starting Ray."""
    run, base, overrides = finished
    marker = run.store.read_json(ARTEFACTS.stage_marker("search"))
    monkeypatch.setattr("flora_ray.backends.ray.init_ray", lambda *a, **k: pytest.fail("Ray was started"))
    sections = {"model": {"name": "test_vit"}, "data": {"name": "digits"}}
    again = fr.run(sections, overrides=overrides, output=base / "runs")
    assert again.location == run.location and again.store.read_json(ARTEFACTS.stage_marker("search")) == marker


def test_frames_are_the_runs_files(finished):
    run, *_ = finished
    pd.testing.assert_frame_equal(run.trials, load_trials(run.location))
    pd.testing.assert_frame_equal(run.front, load_front(run.location))
    pd.testing.assert_frame_equal(run.uniform, load_uniform(run.location))
    assert run.cost_axis == "macs" and len(run.trials) == 12
    table, device = run.latency_table()
    assert len(table) and device["threads"] == 1


def test_the_study_is_the_searchs_optuna_study(finished):
    run, *_ = finished
    study = run.study
    trials = run.trials
    evaluated = [t for t in study.trials if DUPLICATE_OF not in t.user_attrs]  # not the repeats answered
    assert study.study_name == "api-search" and len(evaluated) == len(trials)
    by_number = {t.number: t for t in evaluated}
    for row in trials.itertuples():
        assert row.accuracy in by_number[row.trial].values  # the accuracy the study was told
    before = len(run.store.read_bytes(ARTEFACTS.journal))
    study.enqueue_trial({})  # a copy: writing to it leaves the run's journal alone
    assert len(run.store.read_bytes(ARTEFACTS.journal)) == before


def test_knee_and_budget_picks(finished):
    run, *_ = finished
    front = run.front
    pd.testing.assert_series_equal(run.knee(), knee_point(front))
    budget = float(front["macs"].median())
    pd.testing.assert_series_equal(run.best_under(budget), best_under(front, budget))
    assert run.best_under(max_latency_ms=1e9)["trial"] == front.sort_values("accuracy").iloc[-1]["trial"]
    assert run.best_under(float(front["macs"].min()) - 1) is None
    with pytest.raises(ValueError, match="exactly one budget"):
        run.best_under(budget, max_params=1e6)


def test_one_trial_selector_serves_export_finetune_and_the_run_object(finished):
    """``stages.runs.select_trial``: a trial by number, the best front point within a budget or the knee, exactly
    one of them; what ``Run.knee``/``Run.best_under``, the export and the fine-tune choose with."""
    from flora_ray.stages.runs import NothingWithin, select_trial

    run, *_ = finished
    front, trials = run.front, run.trials
    pd.testing.assert_series_equal(select_trial(run.store, knee=True), knee_point(front))
    budget = float(front["macs"].median())
    pd.testing.assert_series_equal(select_trial(run.store, budget=("macs", budget)), best_under(front, budget))
    last = int(trials["trial"].max())
    assert select_trial(run.store, trial=last)["ranks"] == trials.set_index("trial").loc[last, "ranks"]
    with pytest.raises(NothingWithin, match="no front point has macs <= "):
        select_trial(run.store, budget=("macs", float(front["macs"].min()) - 1))
    for two in ({"trial": last, "knee": True}, {"trial": last, "budget": ("macs", budget)}, {}):
        with pytest.raises(ValueError, match="give exactly one of --trial N, a budget"):
            select_trial(run.store, **two)


def test_a_subnet_is_the_supernet_at_the_trials_ranks(finished):
    run, *_ = finished
    knee = run.knee()
    subnet = run.subnet(knee)  # a row works as well as a number
    ranks = json.loads(knee["ranks"])
    assert run.ranks(int(knee["trial"])) == ranks
    supernet = run.supernet
    x = input_for(subnet)
    with torch.no_grad():
        supernet.set_ranks(ranks)
        torch.testing.assert_close(subnet(x), supernet.model(x), rtol=1e-5, atol=1e-5)
    assert not subnet.training and sum(p.numel() for p in subnet.parameters()) < sum(
        p.numel() for p in supernet.model.parameters()
    )
    uniform = json.loads(run.uniform.sort_values("macs").iloc[0]["ranks"])  # a uniform one: the filter may drop it
    with torch.no_grad():
        supernet.set_ranks(uniform, within_candidates=False)
        torch.testing.assert_close(run.subnet_at(uniform)(x), supernet.model(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="is not a completed trial"):
        run.subnet(999)
    with pytest.raises(TypeError, match="trial number"):
        run.subnet("seven")


def test_export_writes_every_format_and_each_runs_as_the_pytorch_subnet(finished, tmp_path):
    import onnxruntime

    run, *_ = finished
    budget = float(run.front["macs"].max())
    report = run.export(max_macs=budget, output=tmp_path / "out", formats=["onnx", "pt2"], backend="local")
    picked = run.best_under(budget)
    out = tmp_path / "out"
    assert report["trial"] == int(picked["trial"]) and report["directory"] == str(out) and report["evaluated"]
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "subnet.json", "model.pt2", "model.onnx",
                                               "config.json", "README.md", "export.json"}  # fmt: skip
    reference = run.subnet(picked)
    x = torch.randn(5, *input_for(reference).shape[1:])  # a batch size the export never saw
    with torch.no_grad():
        expected = reference(x)
        torch.testing.assert_close(fr.load_subnet(out)(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.export.load(str(out / "model.pt2")).module()(x), expected,
                                   rtol=1e-5, atol=1e-5)  # fmt: skip
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(onnx_out), expected, rtol=1e-4, atol=1e-5)
    for name in ("pt2", "onnx"):
        assert 0 <= report["formats"][name]["max_abs_diff"] < 1e-4, report["formats"]
    written = json.loads((out / "export.json").read_text())
    assert written["formats"] == report["formats"] and written["trial"] == report["trial"]
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "test_vit" and config["pretrained_cfg"]["input_size"] == [1, 8, 8]
    assert config["flora_ray"]["ranks"] == json.loads(picked["ranks"])
    card = (out / "README.md").read_text()
    assert f"trial {report['trial']}" in card and f"{report['test_accuracy']:.2f}%" in card
    assert all(f"`{fqn}`" in card for fqn in config["flora_ray"]["ranks"]) and "Front: point " in card


def test_export_command_without_evaluation(finished, tmp_path, capsys):
    from flora_ray.cli import main

    run, *_ = finished
    knee = int(run.knee()["trial"])
    args = ["export", run.location, "--trial", str(knee), "--format", "pt2", "--no-eval", "--backend", "local"]
    assert main([*args, "--output", str(tmp_path / "e")]) == 0
    out = capsys.readouterr().out
    assert "not evaluated: --no-eval" in out and "pt2: model.pt2" in out
    report = json.loads((tmp_path / "e" / "export.json").read_text())
    assert report["evaluated"] is False and "test_accuracy" not in report and "latency" not in report
    assert report["formats"]["pt2"]["max_abs_diff"] < 1e-4
    assert main(["export", run.location, "--trial", str(knee), "--format", "tflite", "--backend", "local"]) == 2
    assert "unknown export format 'tflite': choose from safetensors, pt2, onnx" in capsys.readouterr().err


def test_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a flora-ray run"):
        fr.Run.open(tmp_path / "nothing")
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(ValueError, match="does not set model.name"):
        fr.run(tmp_path / "empty.yaml")
    with pytest.raises(TypeError, match="config must be a Config"):
        fr.run(42)
    with pytest.raises(ValueError, match="backend='spark' is not one of"):
        fr.run({"model": {"name": "test_vit"}, "data": {"name": "digits"}}, DIGITS_OVERRIDES, backend="spark",
               output=tmp_path / "runs")  # fmt: skip
    assert not (tmp_path / "runs").exists()  # refused before anything was written


def test_the_readmes_python_example_runs(finished, capsys):
    """The README's pandas example, on this run (its path and a budget that this run's front meets)."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Reading a front in pandas", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert '"runs/quickstart"' in code and "max_macs=3e6" in code
    run, *_ = finished
    budget = float(run.front["macs"].max())
    namespace: dict = {}
    exec(code.replace('"runs/quickstart"', repr(run.location)).replace("3e6", repr(budget)), namespace)
    assert namespace["report"]["trial"] == int(run.best_under(budget)["trial"])
    assert "accuracy" in capsys.readouterr().out

"""MLflow tracking into a local store on disk (a sqlite database, artifacts beside it) on the in-process backend.

The store's contents are read back with MLflow's own client: one run per training stage with each epoch's metrics,
and a results run with the configuration, the headline figures and the run's result files as artifacts. (One MLflow
run per search trial, through Ray Tune's callback, is checked on the Ray backend in ``tests/pipeline``.)
"""

import pytest
from conftest import DIGITS_OVERRIDES

import flora_ray as fr
from flora_ray.cli import main

pytestmark = pytest.mark.slow

TRACKED = [
    *DIGITS_OVERRIDES,
    "run.name=tracked",
    "pretrain.epochs=3",
    "filter.mode=zero_training",
    "filter.eval_images=100",
    "train.epochs=2",
    "search.trials=8",
    "search.population=4",
    "search.eval_images=150",
    "search.concurrency=1",
    "tracking.experiment=flora-tests",
]


def test_a_tracked_run_fills_the_mlflow_store(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sections = {"model": {"name": "test_vit"}, "data": {"name": "digits"}}
    run = fr.run(sections, [*TRACKED, f"tracking.mlflow_uri={uri}"], backend="local", output=tmp_path / "runs")
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("flora-tests")
    assert experiment.artifact_location == str(tmp_path / "mlartifacts")
    runs = {r.data.tags["mlflow.runName"]: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"tracked-pretrain", "tracked-train", "tracked-results"}
    assert {r.info.status for r in runs.values()} == {"FINISHED"}
    for stage, epochs in (("pretrain", 3), ("train", 2)):
        tracked = runs[f"tracked-{stage}"]
        assert tracked.data.tags["flora_ray.kind"] == "train" and tracked.data.tags["flora_ray.stage"] == stage
        assert [m.step for m in client.get_metric_history(tracked.info.run_id, "loss")] == list(range(1, epochs + 1))
        history = run.store.read_json(f"{stage}_history.json")
        losses = [m.value for m in client.get_metric_history(tracked.info.run_id, "loss")]
        assert losses == pytest.approx([h["loss"] for h in history])  # the same numbers the run recorded
        assert tracked.data.params[f"{stage}.epochs"] == str(epochs)
    results = runs["tracked-results"]
    artefacts = {a.path for a in client.list_artifacts(results.info.run_id)}
    assert {"trials.parquet", "pareto.parquet", "uniform.parquet", "front.html", "report.md", "pareto.png"} <= artefacts
    assert results.data.metrics["front_size"] == len(run.front)
    assert results.data.params["search.trials"] == "8" and results.data.tags["flora_ray.run"] == "tracked"
    local = client.download_artifacts(results.info.run_id, "trials.parquet", str(tmp_path / "dl"))
    import pandas as pd

    pd.testing.assert_frame_equal(pd.read_parquet(local), run.trials, check_like=True)
    report = run.store.read_json("stages/report.json")["summary"]
    assert report["mlflow_run"] == results.info.run_id


def test_tracking_without_mlflow_installed_is_a_preflight_error(tmp_path, capsys, monkeypatch):
    from flora_ray import tracking

    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    config = tmp_path / "c.yaml"
    config.write_text("model: {name: test_vit}\ndata: {name: digits}\n")
    overrides = [*TRACKED, f"tracking.mlflow_uri=sqlite:///{tmp_path / 'm.db'}", "--backend", "local"]
    assert main(["pretrain", str(config), *overrides, "--output", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "tracking.mlflow_uri is set but mlflow is not installed: pip install 'flora-ray[tracking]'" in err
    assert not (tmp_path / "m.db").exists()

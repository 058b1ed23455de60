"""``flora-ray run``: run-directory ownership, stage markers, skip and resume (an interrupt in supernet training, a
finished run, an interrupted search), the report, and a stale local cluster file (slow end to end)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

import flora_ray as fr
from flora_ray import pipeline
from flora_ray.config import config_to_dict
from flora_ray.stages import STAGES
from flora_ray.stages.inputs import claim_run as claim_run_dir
from flora_ray.stages.inputs import resolve_model_spec
from flora_ray.stages.report import build_report
from flora_ray.storage.run_store import ARTEFACTS, RunStore
from flora_ray.testing.processes import kill_group

PIPELINE_STAGES, RUN_CONFIG_FILE = list(STAGES), ARTEFACTS.run_config
RAY_STARTED = "Started a local Ray instance"  # what ray.init logs when it starts one


def stage_marker(run_dir, stage):
    return pipeline.stage_marker(RunStore(run_dir), stage)


def test_a_run_directory_keeps_its_configuration(digits_config):
    cfg = digits_config()
    claim_run_dir(cfg, record=False)
    assert not cfg.run.run_dir.exists()  # checking alone writes nothing
    claim_run_dir(cfg)
    stored = (cfg.run.run_dir / RUN_CONFIG_FILE).read_text()
    claim_run_dir(digits_config("search.concurrency=1", "scaling.num_workers=1", "train.log_every=7"))  # speed only
    with pytest.raises(ValueError, match=r"different configuration \(search.eval_images: 2000 -> 100\)"):
        claim_run_dir(digits_config("search.eval_images=100"))
    with pytest.raises(ValueError, match=r"model.kwargs: .*choose another run.name or --output"):
        claim_run_dir(digits_config("model.kwargs={patch_size: 2, embed_dim: 64, depth: 2, num_heads: 2}"))
    assert (cfg.run.run_dir / RUN_CONFIG_FILE).read_text() == stored


def _run(config_file, *extra):
    env = {**os.environ, "TIMM_FUSED_ATTN": "0"}
    command = [sys.executable, "-m", "flora_ray.cli", "run", str(config_file), *extra]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout + result.stderr


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_tmpdir():
    """A private Ray temp root (short: Ray's socket paths live below it), holding a stale cluster file."""
    root = Path(tempfile.mkdtemp(prefix="frs-", dir="/tmp"))
    (root / "ray").mkdir()
    (root / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{_closed_port()}\n")  # a head that died
    yield root
    subprocess.run(["pkill", "-f", str(root)], check=False)  # nothing of ours may outlive the test
    shutil.rmtree(root, ignore_errors=True)


def _interrupt_in_training(config_file, train_storage, logs, ray_tmpdir):
    """``flora-ray run`` until Ray Train's snapshot records the supernet's first checkpoint, then SIGTERM to the
    driver only (the CLI turns it into Ctrl-C's KeyboardInterrupt): it must stop within seconds with one line and
    leave no Ray process behind. Ray's temp root names a dead head in ``ray_current_cluster``: the CLI still starts
    its own local Ray and trains (joining the stale address would retry for minutes)."""
    env = {**os.environ, "TIMM_FUSED_ATTN": "0", "RAY_TMPDIR": str(ray_tmpdir)}
    command = [sys.executable, "-m", "flora_ray.cli", "run", str(config_file)]
    out, err = logs
    with open(out, "w") as stdout, open(err, "w") as stderr:  # files, not pipes: a full pipe would stall the driver
        first = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=env, start_new_session=True)

    def recorded_checkpoint():
        """The checkpoint Ray Train's snapshot records (what a re-run resumes from), once one is recorded."""
        try:
            snapshot = json.loads((train_storage / "checkpoint_manager_snapshot.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return snapshot.get("latest_checkpoint_result")

    deadline = time.time() + 600
    try:
        while recorded_checkpoint() is None and time.time() < deadline and first.poll() is None:
            time.sleep(0.5)
        assert recorded_checkpoint() is not None, "no checkpoint recorded: " + err.read_text()[-4000:]
        assert first.poll() is None, err.read_text()[-3000:]  # still training
        assert "Failed to connect to GCS" not in err.read_text()
        first.send_signal(signal.SIGTERM)
        sent = time.perf_counter()
        first.wait(timeout=60)
        assert first.returncode == 130 and time.perf_counter() - sent < 30, err.read_text()[-3000:]
        assert err.read_text().strip().splitlines()[-1] == "flora-ray: interrupted"
        exited = time.perf_counter()
        while leftover := subprocess.run(["pgrep", "-f", str(ray_tmpdir)], capture_output=True, text=True).stdout:
            assert time.perf_counter() - exited < 3, "the run's Ray processes outlived it: " + leftover
            time.sleep(0.1)
    finally:
        kill_group(first.pid)  # whatever the interrupted driver left behind


def _check_training_resumed(cfg, out):
    """The re-run resumed supernet training from the recorded checkpoint (after an epoch, before the last one)."""
    resumed = [line for line in out.splitlines() if "resumed from the checkpoint at epoch" in line]
    assert resumed, "the second run did not resume: " + out[-4000:]
    epoch = int(resumed[0].split("resumed from the checkpoint at epoch ", 1)[1].split()[0])
    assert 1 <= epoch < cfg.train.epochs
    history = json.loads((cfg.run.run_dir / "train_history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(1, cfg.train.epochs + 1))


def _check_mlflow(cfg, trials):
    """On Ray: one MLflow run per search trial (Ray Tune's MLflowLoggerCallback) with the accuracy the trial
    table holds, per-epoch training metrics from Ray Train's rank 0, and the results run."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.mlflow_uri)
    experiment = client.get_experiment_by_name(cfg.run.name)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    by_kind = {}
    for run in runs:
        by_kind.setdefault(run.data.tags.get("flora_ray.kind"), []).append(run)
    trial_runs = by_kind["trial"]
    assert len(trial_runs) == len(trials) == cfg.search.trials
    logged = sorted(round(r.data.metrics["accuracy"], 6) for r in trial_runs)
    assert logged == sorted(round(a, 6) for a in trials["accuracy"])
    train = [r for r in by_kind["train"] if r.data.tags["flora_ray.stage"] == "train"]
    finished = [r for r in train if r.info.status == "FINISHED"]  # the run interrupted by Ctrl-C is left unfinished
    steps = [m.step for r in finished for m in client.get_metric_history(r.info.run_id, "loss")]
    assert finished and max(steps) == cfg.train.epochs
    assert [r.data.tags["mlflow.runName"] for r in by_kind["results"]] == [f"{cfg.run.name}-results"]


@pytest.mark.slow
def test_pipeline_runs_every_stage_then_skips_and_resumes(digits_config, tmp_path, ray_tmpdir):
    """One run: interrupted (SIGTERM, as Ctrl-C) in supernet training under a stale local cluster file, resumed by
    the same command through every stage, then skipped entirely, then resumed from the search."""
    cfg = digits_config(
        "pretrain.epochs=3",
        "pretrain.lr=0.003",
        "filter.epochs=1",
        "filter.eval_images=100",
        "train.epochs=4",
        "train.batch_size=16",  # many short steps: the Ctrl-C lands well before the last epoch
        "search.trials=12",
        "search.population=4",
        "search.eval_images=150",
        f"tracking.mlflow_uri=sqlite:///{tmp_path / 'mlflow.db'}",  # through Ray's MLflow integrations
    )
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(config_to_dict(cfg)))
    run_dir = cfg.run.run_dir

    # Interrupted in supernet training: a re-run of the same command resumes it from its checkpoint, then goes on.
    first_logs = (tmp_path / "first.out"), (tmp_path / "first.err")
    _interrupt_in_training(config_file, run_dir / "ray" / f"{cfg.run.name}-train", first_logs, ray_tmpdir)
    assert not (run_dir / "supernet.safetensors").exists(), "the first run was not interrupted"
    out = _run(config_file)
    assert RAY_STARTED in out  # work was left: the default backend started Ray
    _check_training_resumed(cfg, out)
    for stage in PIPELINE_STAGES:
        assert stage_marker(run_dir, stage) is not None, stage
    report = (run_dir / "report.md").read_text()
    assert report in out  # printed on the console too
    for heading in ("## Dense model", "## Pareto front", "## Uniform ranks", "## Gain over uniform", "## Exported"):
        assert heading in report
    front = pd.read_parquet(run_dir / "pareto.parquet")
    exported = stage_marker(run_dir, "export")["summary"]
    assert exported["trial"] in set(front["trial"])  # the knee point is a front point
    assert (run_dir / "export" / f"trial_{exported['trial']}" / "model.safetensors").is_file()
    _, figures = build_report(run_dir)
    assert set(figures["stage_seconds"]) == set(PIPELINE_STAGES) and figures["front_size"] == len(front)
    _check_mlflow(cfg, pd.read_parquet(run_dir / "trials.parquet"))
    # The teacher that pretraining on Ray Train (two workers) wrote loads into a supernet through the public API.
    spec = resolve_model_spec(cfg)
    teacher = stage_marker(run_dir, "pretrain")["summary"]["output"]
    assert cfg.scaling.num_workers == 2 and Path(teacher) == run_dir / ARTEFACTS.teacher
    supernet = fr.build_supernet(spec.name, model_kwargs=spec.kwargs, pretrained=teacher)
    assert supernet.space.fqns[0] == "blocks.0.attn.qkv"

    # Everything done: a second run skips every stage and rebuilds nothing; with nothing left to run, the default
    # (Ray) backend starts no Ray (on a cluster and on object storage: the cluster-true runs in tests/cluster).
    teacher_mtime = (run_dir / "teacher.safetensors").stat().st_mtime_ns
    out = _run(config_file)
    assert out.count("done earlier") == len(PIPELINE_STAGES) and RAY_STARTED not in out
    assert (run_dir / "teacher.safetensors").stat().st_mtime_ns == teacher_mtime

    # Interrupted after training: the search continues from its journal, then export and report run again.
    for stage in ("search", "export", "report"):
        (run_dir / "stages" / f"{stage}.json").unlink()
    out = _run(config_file, "search.concurrency=1")  # a speed-only key may differ
    assert out.count("done earlier") == len(PIPELINE_STAGES) - 3 and "search: continuing" in out
    assert len(pd.read_parquet(run_dir / "trials.parquet")) == 12  # nothing evaluated twice
    assert (run_dir / "teacher.safetensors").stat().st_mtime_ns == teacher_mtime


@pytest.mark.slow
def test_the_whole_pipeline_runs_in_process_without_ray(in_process_run):
    """The in-process backend: every stage, the same files, and no Ray started (the run of
    ``run_pipeline(cfg, LocalBackend())`` that tests/conftest.py makes once for this and the reproducibility test)."""
    cfg, markers, ray_started = in_process_run
    assert list(markers) == PIPELINE_STAGES and not ray_started
    run_dir = cfg.run.run_dir
    for name in (ARTEFACTS.teacher, ARTEFACTS.space, ARTEFACTS.supernet, ARTEFACTS.trials, ARTEFACTS.report):
        assert (run_dir / name).is_file(), name
    trials = pd.read_parquet(run_dir / ARTEFACTS.trials)
    assert cfg.search.trials == 16 and len(trials) == 16 and (trials["state"] == "COMPLETE").all()
    from flora_ray.core.space import RankSpace
    from flora_ray.core.supernet import load_supernet

    # The supernet was trained on the filtered space (read from the artefacts, not a log line).
    assert load_supernet(run_dir / ARTEFACTS.supernet).space == RankSpace.load(run_dir / ARTEFACTS.space)
    # filter.keep_uniform: every uniform configuration survived filtering, was a trial (on the search images, as every
    # trial), scores as the uniform baseline does, and nothing uniform beats the front (never worse, by construction).
    space, uniform = RankSpace.load(run_dir / ARTEFACTS.space), pd.read_parquet(run_dir / ARTEFACTS.uniform)
    assert all(space.contains(config) for config in space.uniform_all().values())
    done = trials[trials["state"] == "COMPLETE"]
    by_ranks = {
        json.dumps(json.loads(r), sort_keys=True): a for r, a in zip(done["ranks"], done["accuracy"], strict=True)
    }
    for row in uniform.itertuples():
        assert by_ranks[json.dumps(json.loads(row.ranks), sort_keys=True)] == pytest.approx(row.accuracy)
    front = done[done["is_pareto"]]
    for row in uniform.itertuples():
        assert ((front["macs"] <= row.macs) & (front["accuracy"] >= row.accuracy - 1e-9)).any(), row.ratio
    assert cfg.train.epochs == 2 and markers["train"]["summary"]["metrics"]["epoch"] == 2

"""The run registry (``flora-ray list`` / ``status`` / ``compare``, ``flora_ray.list_runs`` / ``compare``) and one
writer per run, on copies of the shared finished digits runs (nothing is trained here): a prefix holding a finished,
a running (a lease held, stage markers missing), a failed (a stale lease) and an interrupted run, on a local folder
and on the moto S3 server. Every figure is checked against the run's files read directly."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys

import pandas as pd
import pyarrow.fs as pafs
import pytest

import flora_ray as fr
from flora_ray.cli import main
from flora_ray.registry import BUDGET_COLUMNS, COLUMNS
from flora_ray.storage.lease import hold_lease
from flora_ray.storage.run_store import ARTEFACTS, RunStore

LATER_STAGES = {"running": ["search", "export", "finetune", "report"], "crashed": ["train", "search", "export",
                "finetune", "report"], "stopped": ["report"]}  # fmt: skip
STALE = {"host": "elsewhere", "pid": 1, "job": "77", "nonce": "old", "acquired_at": "2020-01-01T00:00:00+00:00",
         "renewed_at": "2020-01-01T00:00:00+00:00", "ttl_s": 120.0}  # fmt: skip


@pytest.fixture
def prefix(finished, tmp_path):
    """A folder of four copies of the finished run: ``done``; ``running``, ``crashed`` and ``stopped`` with their
    later stages' markers removed (leases and job records are the test's to add)."""
    run, *_ = finished
    root = tmp_path / "runs"
    for name in ("done", *LATER_STAGES):
        shutil.copytree(run.store.local_path(), root / name)
        for stage in LATER_STAGES.get(name, []):
            (root / name / ARTEFACTS.stage_marker(stage)).unlink()
    (root / "not-a-run").mkdir()  # a folder without run_config.yaml is not listed
    return root


def expected_figures(directory: str, fs: pafs.FileSystem) -> dict:
    """Trials, front size and best accuracy under each budget, from the run's Parquet files read directly (a
    brute-force filter of every complete trial: the front's best under a budget is the trials' best under it)."""
    import pyarrow.parquet as pq

    trials = pq.read_table(f"{directory}/trials.parquet", filesystem=fs).to_pandas()
    front = pq.read_table(f"{directory}/pareto.parquet", filesystem=fs).to_pandas()
    with fs.open_input_stream(f"{directory}/search_summary.json") as stream:
        dense = json.loads(stream.read())["dense_macs"]
    complete = trials[trials["state"] == "COMPLETE"]
    figures = {"trials": len(complete), "front": len(front), "finished_trials": len(trials)}
    for share, column in BUDGET_COLUMNS.items():
        within = complete[complete["macs"] <= share * dense]
        figures[column] = None if within.empty else float(within["accuracy"].max())
    return figures


def make_states(location: str) -> None:
    """``crashed``: a job that stopped renewing its lease; ``stopped``: a job that failed and released it."""
    RunStore(f"{location}/crashed").write_json(ARTEFACTS.lease, STALE)
    with pytest.raises(RuntimeError), hold_lease(RunStore(f"{location}/stopped")):
        raise RuntimeError("the report stage broke")


def none(value):
    """A missing value as ``None`` (pandas shows it as NaN in a column of numbers)."""
    return None if pd.isna(value) else value


def check_listing(frame: pd.DataFrame, location: str, fs: pafs.FileSystem, root: str) -> None:
    assert list(frame.columns) == COLUMNS
    rows = {row["run"]: row for _, row in frame.iterrows()}
    assert sorted(rows) == ["crashed", "done", "running", "stopped"]
    states = {name: (row["state"], row["stages"], none(row["current"])) for name, row in rows.items()}
    assert states == {"done": ("finished", "8/8", None), "running": ("running", "4/8", "search"),
                      "crashed": ("failed", "3/8", "train"), "stopped": ("failed", "7/8", "report")}  # fmt: skip
    figures = expected_figures(f"{root}/done", fs)
    for name in ("done", "stopped"):
        assert {k: none(rows[name][k]) for k in ("trials", "front", *BUDGET_COLUMNS.values())} == {
            k: figures[k] for k in ("trials", "front", *BUDGET_COLUMNS.values())
        }
    assert rows["running"]["progress"] == f"{figures['finished_trials']}/{figures['finished_trials']} trials"
    assert rows["running"]["trials"] == figures["trials"] and pd.isna(rows["running"]["front"])
    assert f"host {socket.gethostname()} pid {os.getpid()}" in rows["running"]["detail"]
    assert "host elsewhere pid 1" in rows["crashed"]["detail"] and "stopped renewing" in rows["crashed"]["detail"]
    assert rows["stopped"]["detail"].startswith("RuntimeError: the report stage broke")
    assert rows["done"]["location"] == f"{location}/done" and rows["done"]["model"] == "test_vit"


def test_list_and_status_on_a_local_folder(prefix, capsys):
    make_states(str(prefix))
    with hold_lease(RunStore(prefix / "running")):
        frame = fr.list_runs(prefix)
        check_listing(frame, str(prefix), pafs.LocalFileSystem(), str(prefix))
        newest = max(p.stat().st_mtime for p in (prefix / "done").rglob("*") if p.is_file())
        assert frame.set_index("run").loc["done", "updated"] == pd.Timestamp(newest, unit="s", tz="UTC").strftime(
            "%Y-%m-%dT%H:%M:%S+00:00"
        )
        assert main(["list", str(prefix), "--json"]) == 0
        printed, direct = json.loads(capsys.readouterr().out), json.loads(frame.to_json(orient="records"))
        for rows in (printed, direct):  # ages in seconds move on between the two calls
            for row in rows:
                row.pop("detail"), row.pop("updated")
        assert printed == direct
        assert main(["list", str(prefix)]) == 0
        table = capsys.readouterr().out.splitlines()
        assert table[0].split()[:3] == ["run", "state", "stages"] and len(table) == 5
        assert main(["status", str(prefix / "running")]) == 0
        text = capsys.readouterr().out
        assert text.startswith("running (test_vit on digits): running, held by host") and "current: search" in text
    assert fr.run_status(prefix / "running")["state"] == "incomplete"  # released without error, stages left


def test_list_and_status_on_s3(prefix, s3, monkeypatch, capsys):
    s3.patch_env(monkeypatch)
    uri = s3.make_bucket("registry")
    fs = s3.filesystem()
    pafs.copy_files(str(prefix), "registry/team/runs", destination_filesystem=fs)
    location = f"{uri}/team/runs"
    make_states(location)
    with hold_lease(RunStore(f"{location}/running")):
        frame = fr.list_runs(location)
        check_listing(frame, location, fs, "registry/team/runs")
        assert main(["status", f"{location}/crashed", "--json"]) == 0
        status = json.loads(capsys.readouterr().out)
        assert status["holder"] == STALE and status["stages_done"] == ["profile", "pretrain", "filter"]


def test_a_missing_prefix_or_run_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["list", str(tmp_path / "nowhere")]) == 2
    assert main(["status", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "does not exist" in err[0] and "is not a flora-ray run" in err[1]


def test_compare_two_runs(finished, in_process_run, tmp_path, capsys):
    run, *_ = finished
    cfg, *_ = in_process_run
    other = fr.Run.open(cfg.run.run_dir)
    frame = fr.compare([run, cfg.run.run_dir])
    assert frame.attrs["cost_axis"] == "macs" and sorted(frame["run"].unique()) == ["api", "twice"]
    for name, source in (("api", run), ("twice", other)):
        mine = frame[frame["run"] == name]
        for kind, reference in (("front", "pareto.parquet"), ("uniform", "uniform.parquet")):
            direct = pd.read_parquet(source.store.local_path(reference))
            got = mine[mine["kind"] == kind][["macs", "params", "accuracy"]].reset_index(drop=True)
            pd.testing.assert_frame_equal(got, direct[["macs", "params", "accuracy"]], check_dtype=False)
        summary = json.loads(source.store.local_path(ARTEFACTS.search_summary).read_text())
        dense = mine[mine["kind"] == "dense"].iloc[0]
        assert (dense["macs"], dense["accuracy"]) == (summary["dense_macs"], summary["dense_accuracy"])
    page = tmp_path / "compare.html"
    assert main(["compare", str(run.location), str(other.location), "--html", str(page)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:2] == ["run", "state"] and f"wrote {page}" in out
    html = page.read_text()
    assert "<script src=" not in html  # plotly's JavaScript is in the page
    traces = {
        m.group(2): json.loads(m.group(1)) for m in re.finditer(r'"customdata":(\[[^\]]*\]).*?"name":"([^"]*)"', html)
    }
    assert sorted(traces) == sorted(f"{r}: {k}" for r in ("api", "twice") for k in ("front", "uniform", "dense"))
    for name, source in (("api", run), ("twice", other)):
        trials = sorted(int(t) for t in source.front["trial"])
        shown = sorted(int(re.search(r"<b>trial (\d+)</b>", t).group(1)) for t in traces[f"{name}: front"])
        assert shown == trials and all(t.startswith(f"<b>{name}</b>") for t in traces[f"{name}: front"])
        assert len(traces[f"{name}: uniform"]) == len(source.uniform) and len(traces[f"{name}: dense"]) == 1


def test_compare_tells_runs_of_one_name_apart_and_refuses_a_run_without_a_search(finished, tmp_path, capsys):
    run, *_ = finished
    copy = tmp_path / "elsewhere" / "api"
    shutil.copytree(run.store.local_path(), copy)
    frame = fr.compare([run.location, copy])
    assert sorted(frame["run"].unique()) == sorted([run.location, str(copy)])
    (copy / ARTEFACTS.pareto).unlink()
    assert main(["compare", str(copy), "--html", str(tmp_path / "x.html")]) == 2
    assert "has no finished search" in capsys.readouterr().err and not (tmp_path / "x.html").exists()


def run_command(config, output):
    """``flora-ray run`` in a process of its own (its own pid: the lease this test holds is another job's)."""
    command = [sys.executable, "-m", "flora_ray.cli", "run", str(config), "--output", str(output), "--backend", "local"]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_two_jobs_on_one_run_one_proceeds_the_other_refuses(finished, tmp_path):
    run, *_ = finished
    output = tmp_path / "out"
    shutil.copytree(run.store.local_path(), output / "api")
    (output / "api" / ARTEFACTS.stage_marker("report")).unlink()
    config = output / "api" / ARTEFACTS.run_config
    before = {p: p.stat().st_mtime_ns for p in (output / "api").rglob("*") if p.is_file()}
    with hold_lease(RunStore(output / "api")):
        refused = run_command(config, output)
        assert refused.returncode == 2, refused.stderr[-2000:]
        line = refused.stderr.strip().splitlines()[-1]
        assert line.startswith("flora-ray: error: run ") and f"pid {os.getpid()}" in line
        assert {
            p: p.stat().st_mtime_ns for p in (output / "api").rglob("*") if p.is_file() and p.name != "lease.json"
        } == before
        fr.run(config, output=output, backend="local")  # the holder proceeds: its last stage runs
    assert (output / "api" / ARTEFACTS.stage_marker("report")).is_file()
    assert not (output / "api" / ARTEFACTS.lease).exists()


def test_a_stale_lease_is_taken_over_by_the_next_run(finished, tmp_path):
    run, *_ = finished
    output = tmp_path / "out"
    shutil.copytree(run.store.local_path(), output / "api")
    (output / "api" / ARTEFACTS.stage_marker("report")).unlink()
    RunStore(output / "api").write_json(ARTEFACTS.lease, STALE)
    done = run_command(output / "api" / ARTEFACTS.run_config, output)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "taking over the lease of elsewhere" in done.stderr
    job = json.loads((output / "api" / ARTEFACTS.job).read_text())
    assert job["outcome"] == "ok" and job["host"] == socket.gethostname() and job["pid"] != 1
    assert not (output / "api" / ARTEFACTS.lease).exists()
    assert fr.run_status(output / "api")["state"] == "finished"

"""Settings that only matter off a laptop: run storage, --address, a stale local cluster file, SIGTERM.

Every bad storage setting is one line and exit 2 within seconds, before Ray starts; a stale
``ray_current_cluster`` file never captures a local run; SIGTERM stops a run within seconds with one line.
"""

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from flora_ray.cli import main


@pytest.fixture(scope="module")
def s3():
    from flora_ray.testing.s3 import s3_server

    with s3_server() as server:
        server.make_bucket("present")
        yield server


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STORAGE_CASES = [
    # (overrides, extra arguments, expected message part)
    (["run.output_dir=runs"], ["--address", "127.0.0.1:{port}"], "with --address every node reads and writes the run"),
    (["run.storage=relative/dir"], ["--address", "127.0.0.1:{port}"], "'relative/dir' (relative, on this machine"),
    (["run.storage=ftp://host/x"], [], "unsupported scheme 'ftp'"),
    (["run.storage=s3://missing-bucket/runs"], [], "bucket 'missing-bucket' does not exist"),
    (["run.storage={file}/below"], [], "is a regular file, not a directory"),
    (["run.storage=s3://present/runs"], ["--backend", "local"], "--backend local keeps training checkpoints"),
    (
        ["data.in_chans=3", "data.name=imagefolder", "data.root={file}", "data.pipeline=ray_data"],
        ["--backend", "local"],
        "data.pipeline=ray_data streams from Ray Data: use the Ray backend",
    ),
]


@pytest.mark.parametrize(("overrides", "extra", "message"), STORAGE_CASES)
def test_bad_storage_is_one_line_exit_2_before_ray(s3, monkeypatch, tmp_path, config_file, capsys, overrides, extra,
                                                   message):  # fmt: skip
    import ray

    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("not a directory")
    fill = {"port": _closed_port(), "file": tmp_path / "file"}
    started = time.perf_counter()
    with pytest.raises(SystemExit) as raised:
        raise SystemExit(main(["run", str(config_file), *[o.format(**fill) for o in overrides + extra]]))
    err = capsys.readouterr().err
    assert raised.value.code == 2 and err.count("\n") == 1 and err.startswith("flora-ray: error: "), err
    assert message in err, err
    assert time.perf_counter() - started < 20 and not ray.is_initialized()


def test_an_unreachable_object_store_fails_in_seconds(monkeypatch, config_file, capsys):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    started = time.perf_counter()
    assert main(["run", str(config_file), "run.storage=s3://bucket/runs"]) == 2
    err = capsys.readouterr().err
    assert "run.storage 's3://bucket/runs' is not writable: cannot reach" in err and err.count("\n") == 1
    assert time.perf_counter() - started < 20


@pytest.fixture
def ray_tmpdir():
    """A private Ray temp root (short: Ray's socket paths live below it), holding a stale cluster file."""
    root = Path(tempfile.mkdtemp(prefix="frs-", dir="/tmp"))
    (root / "ray").mkdir()
    (root / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{_closed_port()}\n")  # a head that died
    yield root
    subprocess.run(["pkill", "-f", str(root)], check=False)  # nothing of ours may outlive the test
    import shutil

    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_a_local_run_ignores_a_stale_cluster_file_and_stops_on_sigterm(ray_tmpdir, config_file, tmp_path):
    """Ray's temp root names a dead head in ``ray_current_cluster``: the CLI still starts its own local Ray and
    trains (joining the stale address would retry for minutes), and SIGTERM stops it within seconds."""
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmpdir), "TIMM_FUSED_ATTN": "0"}
    command = [sys.executable, "-m", "flora_ray.cli", "run", str(config_file), "pretrain.epochs=50"]
    out, err = tmp_path / "out.log", tmp_path / "err.log"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        process = subprocess.Popen(command, env=env, stdout=stdout, stderr=stderr, text=True)
        deadline = time.time() + 150
        while time.time() < deadline and "pretrain epoch 1/50:" not in err.read_text():
            time.sleep(0.5)  # training is under way on Ray Train workers
        assert process.poll() is None, err.read_text()[-3000:]
        assert "Failed to connect to GCS" not in err.read_text()
        process.send_signal(signal.SIGTERM)
        sent = time.perf_counter()
        process.wait(timeout=60)
    assert process.returncode == 130 and time.perf_counter() - sent < 30
    assert err.read_text().strip().splitlines()[-1] == "flora-ray: interrupted"
    time.sleep(3)
    leftover = subprocess.run(["pgrep", "-f", str(ray_tmpdir)], capture_output=True, text=True).stdout.split()
    assert not leftover, "the run's Ray processes outlived it"

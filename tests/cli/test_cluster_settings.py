"""Settings that only matter off a laptop: run storage and --address.

Every bad storage setting is one line and exit 2 within seconds, before Ray starts. (A stale
``ray_current_cluster`` file that never captures a local run, and SIGTERM stopping a run within seconds with one
line, are checked on the interrupted run of ``tests/pipeline/test_pipeline.py``.)
"""

import time

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

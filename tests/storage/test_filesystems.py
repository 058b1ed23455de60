"""run.storage -> pyarrow filesystem: local paths, file://, s3:// (against a local moto server), gs://, and the
preflight check that fails in one line and within its deadline. No test reaches a real cloud endpoint: S3 tests
set AWS_ENDPOINT_URL to 127.0.0.1, and the no-endpoint case only inspects the filesystem's configuration."""

import os
import socket
import time

import pytest
from pyarrow.fs import FileSelector, FileType, LocalFileSystem, SubTreeFileSystem

from flora_ray.storage.filesystems import (
    PROBE_PREFIX,
    S3_CONNECT_TIMEOUT_S,
    StorageLocationError,
    check_storage,
    is_shared_location,
    location_uri,
    resolve_filesystem,
)
from flora_ray.testing.s3 import AWS_VARIABLES_CLEARED, free_port

pytestmark = pytest.mark.timeout(120)

AWS_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_DEFAULT_REGION")


@pytest.fixture
def clean_env(monkeypatch):
    """No AWS/GCS configuration from the machine running the tests."""
    for name in (*AWS_VARIABLES, *AWS_VARIABLES_CLEARED, "STORAGE_EMULATOR_HOST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return monkeypatch


def options(fs):
    """The constructor arguments of a pyarrow filesystem (what it would connect to), without any I/O."""
    return fs.__reduce__()[1][0]


# --- local -------------------------------------------------------------------------------------------------------


def test_local_paths_resolve_to_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cases = {
        str(tmp_path / "runs"): str(tmp_path / "runs"),
        "runs/a/../b": str(tmp_path / "runs" / "b"),
        "~/runs": str(tmp_path / "home" / "runs"),
        f"file://{tmp_path}/runs": str(tmp_path / "runs"),
        f"file://localhost{tmp_path}/with%20space": str(tmp_path / "with space"),
    }
    for location, expected in cases.items():
        fs, path = resolve_filesystem(location)
        assert isinstance(fs, LocalFileSystem) and path == expected, location
        assert location_uri(fs, path) == expected
    assert resolve_filesystem(tmp_path)[1] == str(tmp_path)  # os.PathLike too


def test_shared_locations():
    assert not is_shared_location("runs")
    assert not is_shared_location("./runs/x")
    for location in ("/mnt/nfs/runs", "~/runs", "file:///mnt/runs", "s3://bucket/runs", "gs://bucket/runs"):
        assert is_shared_location(location), location


def test_check_storage_creates_a_local_directory_and_leaves_no_probe(tmp_path):
    target = tmp_path / "a" / "b" / "runs"
    check_storage(str(target))
    assert target.is_dir() and list(target.iterdir()) == []


def test_location_uri_through_a_subtree(tmp_path):
    fs = SubTreeFileSystem(str(tmp_path), LocalFileSystem())
    assert location_uri(fs, "runs/demo") == str(tmp_path / "runs" / "demo")


# --- configuration from the environment (no I/O) -----------------------------------------------------------------


def test_s3_endpoint_and_credentials_come_from_the_environment(clean_env):
    clean_env.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    clean_env.setenv("AWS_ACCESS_KEY_ID", "key")
    clean_env.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    clean_env.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    fs, path = resolve_filesystem("s3://bucket//runs/demo/")
    assert fs.type_name == "s3" and path == "bucket/runs/demo"
    opts = options(fs)
    assert opts["endpoint_override"] == "127.0.0.1:9000" and opts["scheme"] == "http"
    assert opts["region"] == "eu-west-1" and opts["access_key"] == "key" and opts["secret_key"] == "secret"
    assert opts["connect_timeout"] == S3_CONNECT_TIMEOUT_S and 0 < opts["request_timeout"] <= 30
    assert location_uri(fs, path) == "s3://bucket/runs/demo"
    clean_env.setenv("AWS_REGION", "ap-south-1")  # AWS_REGION wins over AWS_DEFAULT_REGION
    assert options(resolve_filesystem("s3://bucket")[0])["region"] == "ap-south-1"


def test_service_specific_endpoint_takes_precedence(clean_env):
    clean_env.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    clean_env.setenv("AWS_ENDPOINT_URL_S3", "https://storage.internal:8443")
    opts = options(resolve_filesystem("s3://bucket")[0])
    assert opts["endpoint_override"] == "storage.internal:8443" and opts["scheme"] == "https"
    assert opts["region"] == "us-east-1"  # an endpoint without a region


def test_without_an_endpoint_s3_is_aws_itself(clean_env):
    """Only the configuration is inspected: the filesystem is never used, so nothing reaches the network."""
    fs, path = resolve_filesystem("s3://b")
    opts = options(fs)
    assert path == "b" and opts["endpoint_override"] == "" and opts["scheme"] == "https"
    assert opts["access_key"] is None  # the AWS SDK's default credential chain


def test_half_set_credentials_and_bad_endpoints_are_one_line_errors(clean_env):
    clean_env.setenv("AWS_ACCESS_KEY_ID", "key")
    with pytest.raises(ValueError, match="AWS_SECRET_ACCESS_KEY is not set"):
        resolve_filesystem("s3://bucket")
    clean_env.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    clean_env.setenv("AWS_ENDPOINT_URL", "ftp://127.0.0.1:9000/x")
    with pytest.raises(ValueError, match=r"AWS_ENDPOINT_URL=.* is not an endpoint URL"):
        resolve_filesystem("s3://bucket")


def test_gcs_emulator_and_default(clean_env):
    fs, path = resolve_filesystem("gs://bucket/runs")
    assert fs.type_name == "gcs" and path == "bucket/runs" and options(fs)["endpoint_override"] == ""
    assert location_uri(fs, path) == "gs://bucket/runs"
    clean_env.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:4443")
    opts = options(resolve_filesystem("gs://bucket")[0])
    assert opts["endpoint_override"] == "127.0.0.1:4443" and opts["scheme"] == "http" and opts["anonymous"]


@pytest.mark.parametrize(
    ("location", "message"),
    [
        ("ftp://x", "unsupported scheme 'ftp'; use a local path, file:///abs/path, s3://bucket/prefix or gs://"),
        ("", "it is empty; set it to a local path"),
        ("s3://", "the bucket is missing"),
        ("s3://b/p?endpoint_override=x", "URI options are not supported"),
        ("file://host/runs", "needs an absolute path"),
    ],
)
def test_malformed_locations(location, message):
    with pytest.raises(StorageLocationError) as info:
        resolve_filesystem(location)
    text = str(info.value)
    assert text.startswith(f"run.storage {location!r} ") and message in text and "\n" not in text


# --- S3 against the local moto server ----------------------------------------------------------------------------


def test_s3_round_trip(s3, clean_env):
    s3.patch_env(clean_env)
    uri = s3.make_bucket("flora-runs")
    location = f"{uri}/runs/demo"
    check_storage(location)
    fs, path = resolve_filesystem(location)
    assert options(fs)["endpoint_override"] == f"127.0.0.1:{s3.port}"
    assert location_uri(fs, path) == location
    with fs.open_output_stream(f"{path}/stages/train.json") as out:
        out.write(b'{"stage": "train"}')
    with fs.open_output_stream(f"{path}/space.json") as out:
        out.write(b"{}")
    with fs.open_input_stream(f"{path}/stages/train.json") as inp:
        assert inp.read() == b'{"stage": "train"}'
    files = sorted(i.path for i in fs.get_file_info(FileSelector(path, recursive=True)) if i.type == FileType.File)
    assert files == [f"{path}/space.json", f"{path}/stages/train.json"]  # the probe is gone
    fs.move(f"{path}/space.json", f"{path}/space2.json")
    fs.delete_file(f"{path}/stages/train.json")
    assert fs.get_file_info(f"{path}/stages/train.json").type == FileType.NotFound
    assert fs.get_file_info(f"{path}/space2.json").type == FileType.File
    # A bucket without prefix works too, and leaves nothing behind.
    check_storage(uri)
    assert not [i for i in fs.get_file_info(FileSelector("flora-runs")) if i.base_name.startswith(PROBE_PREFIX)]


def _missing_bucket(request, monkeypatch, tmp_path):
    request.getfixturevalue("s3").patch_env(monkeypatch)
    return "s3://no-such-bucket/runs"


def _closed_port(request, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    return "s3://bucket/runs"


def _under_a_file(request, monkeypatch, tmp_path):
    (tmp_path / "file").write_text("x")
    return str(tmp_path / "file" / "runs")


BAD_SETTINGS = {
    "unknown scheme": (lambda *_: "ftp://x", "unsupported scheme 'ftp'"),
    "empty": (lambda *_: "", "it is empty"),
    "missing bucket": (_missing_bucket, "bucket 'no-such-bucket' does not exist"),
    "nothing listening": (_closed_port, "cannot reach http://127.0.0.1:"),
    "under a regular file": (_under_a_file, "is a regular file"),
}


@pytest.mark.parametrize("case", sorted(BAD_SETTINGS))
def test_bad_storage_fails_fast_in_one_line(case, request, clean_env, tmp_path):
    make, cause = BAD_SETTINGS[case]
    location = make(request, clean_env, tmp_path)
    started = time.monotonic()
    with pytest.raises(ValueError) as info:
        check_storage(location)
    elapsed = time.monotonic() - started
    text = str(info.value)
    assert text.startswith(f"run.storage {location!r} is not writable: "), text
    assert cause in text and "\n" not in text and "; " in text, text
    assert elapsed < 20, f"{case}: {elapsed:.1f} s"


def test_blackholed_endpoint_is_reported_at_the_deadline(clean_env):
    """The server accepts connections (the kernel's backlog) but never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        clean_env.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{listener.getsockname()[1]}")
        clean_env.setenv("AWS_ACCESS_KEY_ID", "testing")
        clean_env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        started = time.monotonic()
        with pytest.raises(ValueError, match=r"is not writable: no answer from http://127\.0\.0\.1:\d+ within 2 s"):
            check_storage("s3://bucket/runs", timeout_s=2)
        assert time.monotonic() - started < 5
    # Closing the listener resets the pending connection: the probe thread ends on its own.


def test_check_storage_reads_the_environment_it_is_given(s3, clean_env, tmp_path):
    s3.make_bucket("env-bucket")
    check_storage("s3://env-bucket/x", env=s3.env)  # os.environ has no endpoint: only env points at the server
    assert os.environ.get("AWS_ENDPOINT_URL") is None

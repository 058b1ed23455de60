"""A local S3-compatible server for tests: moto's standalone server in a subprocess on 127.0.0.1.

``s3_server()`` starts ``python -m moto.server -H 127.0.0.1 -p PORT`` on a free port, waits until it answers and
yields an ``S3Server`` with its ``endpoint`` (``http://127.0.0.1:PORT``), the AWS variables that point the
filesystem layer (``flora_ray.storage.filesystems``) at it (``env``: dummy credentials, region ``us-east-1``,
instance metadata off) and ``make_bucket``. It is a process rather than a thread so that Ray workers started with
``env`` can reach it too. The server keeps everything in memory; it is stopped (SIGTERM, then SIGKILL) on exit, and
the kernel stops it if the process (more precisely, the thread) that started it dies (``PR_SET_PDEATHSIG``).

Needs ``moto[server]`` (the ``dev`` extra). The tests share one per module (``tests/conftest.py``, fixture ``s3``)::

    def test_something(s3, monkeypatch):
        s3.patch_env(monkeypatch)
        uri = s3.make_bucket("runs")
"""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flora_ray.storage.filesystems import s3_filesystem
from flora_ray.testing.processes import die_with_parent

if TYPE_CHECKING:
    import pyarrow.fs

HOST = "127.0.0.1"
REGION = "us-east-1"
AWS_VARIABLES_CLEARED = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CA_BUNDLE",
)
"""AWS variables ``patch_env`` removes, so nothing else in the environment redirects or re-authenticates S3."""


def free_port(host: str = HOST) -> int:
    """A TCP port nothing listens on right now (the kernel's choice; another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class S3Server:
    """A running S3 server: where it listens and the environment that points S3 clients at it."""

    endpoint: str
    """``http://127.0.0.1:PORT``."""
    env: dict[str, str]
    """``AWS_ENDPOINT_URL``, dummy credentials, region and ``AWS_EC2_METADATA_DISABLED``."""
    process: subprocess.Popen[bytes] = field(repr=False)
    log_path: Path = field(repr=False)

    @property
    def port(self) -> int:
        """The port the server listens on."""
        return int(self.endpoint.rsplit(":", 1)[1])

    def filesystem(self, **overrides: Any) -> pyarrow.fs.S3FileSystem:
        """A pyarrow ``S3FileSystem`` on this server (``overrides`` as in ``s3_filesystem``)."""
        return s3_filesystem(self.env, **overrides)

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` (no error if it exists) and return ``s3://name``."""
        self.filesystem(allow_bucket_creation=True).create_dir(name)
        return f"s3://{name}"

    def reset(self) -> None:
        """Delete every bucket and object (moto's ``/moto-api/reset``)."""
        conn = http.client.HTTPConnection(HOST, self.port, timeout=10)
        try:
            conn.request("POST", "/moto-api/reset")
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"moto reset answered HTTP {response.status}")
        finally:
            conn.close()

    def patch_env(self, monkeypatch: Any) -> None:
        """Point this process's S3 clients at the server for one test (``monkeypatch``: pytest's fixture)."""
        for name in AWS_VARIABLES_CLEARED:
            monkeypatch.delenv(name, raising=False)
        for name, value in self.env.items():
            monkeypatch.setenv(name, value)

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of the server's output."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _wait_until_listening(process: subprocess.Popen[bytes], port: int, deadline: float) -> bool:
    """Poll until the server answers HTTP on ``port`` (True), exits (False) or the deadline passes (TimeoutError)."""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        conn = http.client.HTTPConnection(HOST, port, timeout=1)
        try:
            conn.request("GET", "/moto-api/")
            conn.getresponse().read()
            return True
        except OSError:
            time.sleep(0.05)
        finally:
            conn.close()
    raise TimeoutError(f"the S3 test server on {HOST}:{port} did not answer within the start timeout")


def _stop(process: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def s3_server(start_timeout_s: float = 60.0, attempts: int = 3) -> Iterator[S3Server]:
    """Start moto's S3 server on 127.0.0.1 on a free port; yield it; stop it on exit.

    Args:
        start_timeout_s: How long to wait for the server to answer.
        attempts: Ports to try when another process takes the chosen one first.

    Raises:
        RuntimeError: ``moto[server]`` is not installed, or the server exits at start every time.
        TimeoutError: The server does not answer within ``start_timeout_s``.
    """
    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("flask") is None:
        raise RuntimeError("moto[server] is not installed; install the dev extra: pip install -e '.[dev]'")
    with tempfile.TemporaryDirectory(prefix="flora-ray-s3-") as tmp:
        log_path = Path(tmp) / "moto.log"
        # The server's own environment: no AWS variables of the caller, no proxies for its own requests.
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and "proxy" not in k.lower()}
        for attempt in range(attempts):
            port = free_port()
            with log_path.open("ab") as log:
                process = subprocess.Popen(
                    [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=child_env,
                    start_new_session=True,
                    preexec_fn=die_with_parent,
                )
            try:
                started = _wait_until_listening(process, port, time.monotonic() + start_timeout_s)
            except BaseException:
                _stop(process)
                raise
            if started:
                break
            _stop(process)
            if attempt == attempts - 1:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
                raise RuntimeError(f"the moto S3 server exited at start {attempts} times; last output: {tail}")
        endpoint = f"http://{HOST}:{port}"
        env = {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        server = S3Server(endpoint=endpoint, env=env, process=process, log_path=log_path)
        try:
            yield server
        finally:
            _stop(process)

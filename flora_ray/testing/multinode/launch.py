"""The pytest side: whether namespaces can be made here, and running a command against a two-node cluster
(``run_on_two_nodes`` builds the ``unshare`` command line of ``python -m flora_ray.testing.multinode``)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence

from flora_ray.testing.multinode.protocol import SCRUBBED


@functools.lru_cache(maxsize=1)
def can_make_namespaces() -> bool:
    """Whether this process may run the harness: ``unshare --net`` with loopback up, and in it ``unshare --mount``
    with a tmpfs mounted over a directory (root, or a user namespace setup that allows both)."""
    if not (shutil.which("unshare") and shutil.which("ip") and shutil.which("mount")):
        return False
    probe_dir = tempfile.mkdtemp(prefix="frmn-probe-")
    script = 'ip link set lo up && unshare --mount --propagation private -- mount -t tmpfs flora-probe "$1"'
    try:
        result = subprocess.run(
            ["unshare", "--net", "--fork", "--kill-child=SIGKILL", "--", "sh", "-c", script, "sh", probe_dir],
            capture_output=True,
            timeout=20,
            check=False,
        )
        return result.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(probe_dir)


def require_namespaces(what: str) -> None:
    """In a pytest test: skip when ``can_make_namespaces()`` is false, or fail under CI (``CI`` set), where ``what``
    must run."""
    from flora_ray.testing import skip_unless_ci

    if not can_make_namespaces():
        skip_unless_ci("network and mount namespaces cannot be made here (unshare and ip need root)", what)


def harness_command(
    command: Sequence[str],
    hide: Sequence[str | os.PathLike] = (),
    *,
    timeout_s: float | None = None,
    worker_cpus: int = 2,
    worker_gpus: int = 0,
    resources: Mapping[str, float] | None = None,
    port: int | None = None,
    temp_root: str | os.PathLike | None = None,
    start_timeout_s: float = 60.0,
    object_store_mb: int = 200,
    attempts: int = 2,
    keep_temp: bool = False,
    python: str | None = None,
    dashboard_port: int | None = None,
) -> list[str]:
    """The ``unshare --net --fork ... python -m flora_ray.testing.multinode OPTIONS -- COMMAND`` command line."""
    args = ["unshare", "--net", "--fork", "--kill-child=SIGTERM", "--", python or sys.executable]
    args += ["-m", "flora_ray.testing.multinode", "--worker-cpus", str(worker_cpus), "--worker-gpus", str(worker_gpus)]
    for directory in hide:
        args += ["--hide", str(directory)]
    if resources:
        args += ["--resources", json.dumps(dict(resources))]
    if port is not None:
        args += ["--port", str(port)]
    if timeout_s is not None:
        args += ["--timeout", str(timeout_s)]
    if temp_root is not None:
        args += ["--temp-root", str(temp_root)]
    args += ["--start-timeout", str(start_timeout_s), "--object-store-mb", str(object_store_mb)]
    args += ["--attempts", str(attempts)]
    if keep_temp:
        args.append("--keep-temp")
    if dashboard_port is not None:
        args += ["--dashboard-port", str(dashboard_port)]
    return [*args, "--", *command]


def run_on_two_nodes(
    command: Sequence[str],
    hide: Sequence[str | os.PathLike],
    env: Mapping[str, str] | None = None,
    timeout_s: float = 300.0,
    worker_cpus: int = 2,
    *,
    cwd: str | os.PathLike | None = None,
    capture: bool = True,
    teardown_margin_s: float = 60.0,
    **options,
) -> subprocess.CompletedProcess:
    """Run ``command`` as the driver of a fresh two-node cluster (see the module docstring) and wait for it.

    Args:
        command: The driver command (e.g. ``[sys.executable, "driver.py"]``); it gets ``RAY_ADDRESS``,
            ``RAY_AUTH_MODE``, ``RAY_AUTH_TOKEN`` and ``FLORA_MULTINODE_*`` in its environment.
        hide: Directories the worker node must not see (an empty tmpfs covers each there); they must exist.
        env: Extra environment for the harness and the command (on top of ``os.environ``).
        timeout_s: Bound on the whole run, cluster start included; the harness then stops the command and exits 124.
        worker_cpus: ``--num-cpus`` of the worker node (the head has none).
        cwd: Working directory of the harness and the command.
        capture: Capture stdout/stderr as text (else they go to this process's).
        teardown_margin_s: Extra time for the harness's own teardown before it is killed from here.
        **options: Further keywords of ``harness_command`` (``resources``, ``port``, ``temp_root``, ...).

    Returns:
        The harness's ``CompletedProcess``: COMMAND's exit code, 124 on timeout, 3 when the cluster did not start.

    Raises:
        subprocess.TimeoutExpired: The harness itself did not exit within ``timeout_s + teardown_margin_s`` (it has
            then been sent SIGTERM, and SIGKILL 20 s later; its nodes get SIGTERM from the kernel).
    """
    args = harness_command(command, hide, timeout_s=timeout_s, worker_cpus=worker_cpus, **options)
    full_env = {**os.environ, **(env or {})}
    for key in SCRUBBED:
        full_env.pop(key, None)
    pipe = subprocess.PIPE if capture else None
    with subprocess.Popen(
        args, cwd=cwd, env=full_env, stdout=pipe, stderr=pipe, text=True, start_new_session=True
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout_s + teardown_margin_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                stdout, stderr = process.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                stdout, stderr = process.communicate()
            raise subprocess.TimeoutExpired(args, timeout_s + teardown_margin_s, stdout, stderr) from None
    return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)

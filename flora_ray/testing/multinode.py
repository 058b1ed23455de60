"""A real two-node Ray cluster on one machine whose nodes do not share a disk, around one command.

``unshare --net --fork -- python -m flora_ray.testing.multinode [options] -- COMMAND ...`` runs, inside a network
namespace of its own (only loopback, so every node is 127.0.0.1 and no port clashes with other Ray instances on the
machine):

* a head node, ``ray start --head --num-cpus 0 --num-gpus 0 --block``, in a session of its own (with
  ``--dashboard-port PORT`` it also runs the dashboard and its job API on ``http://127.0.0.1:PORT``, for
  ``ray job submit``; the harness waits until the job API answers);
* one worker node, ``ray start --address 127.0.0.1:PORT --num-cpus N --block``, in a session and a *mount namespace*
  of its own where an empty tmpfs covers every ``--hide DIR`` (and the head's Ray temp directory): files the head
  side writes there are invisible on the worker, and what the worker writes there stays on the worker, as on two
  machines; every other path (a ``--storage`` directory, the virtual environment) stays shared, as NFS would be;
* then COMMAND, in the head's mount namespace, with ``RAY_ADDRESS`` and the token authentication variables set; its
  output streams through and the harness exits with its exit code (124 when ``--timeout`` ran out).

While COMMAND runs, it can simulate a spot reclaim and the return of capacity with ``control(action)`` (this module),
a file protocol under ``$FLORA_MULTINODE_DIR/control/``: the driver writes ``<key>.request`` (JSON ``{"action": ...,
"timeout_s": ...}``, written to a dot-file first and renamed into place; ``<key>`` sorts by time), the harness polls
that directory every 0.2 s, performs the requests one at a time in the order of their keys, and writes
``<key>.reply`` the same way: ``{"ok": true, "action": ..., "node_id": ..., "name": ..., "seconds": ...}`` (plus
``"killed_pids"`` for a kill) or ``{"ok": false, "action": ..., "error": ...}``. The actions:

* ``"kill-worker"``: SIGKILL, without any graceful stop, to every process of the newest worker node not killed yet
  (the first one or a replacement): its process group and session (``ray start`` and the raylet), every process in
  its mount namespace and every process whose command line names its Ray temp directory (Ray's worker processes,
  ``ray::IDLE`` and the like, each have a process group of their own), repeated until none is left; nothing else is
  signalled. The GCS notices the dead node on its own, once its health checks fail (about 15 s with Ray's defaults).
* ``"add-worker"``: a replacement worker node with the first one's settings (CPUs, GPUs, resources, object store,
  hidden directories in a mount namespace of its own) but a fresh Ray temp directory (``w2``, ``w3``, ...) and log
  (``worker2.log``, ...), started the same way; the reply comes once the GCS reports it alive, with its node id.
  ``FLORA_MULTINODE_WORKER_NODE_ID`` keeps naming the first worker node.

The cluster is always torn down at the end, also on errors and on SIGTERM/SIGINT/SIGHUP to the harness: SIGTERM to
each node's ``ray start`` (which stops its processes in order; every worker node not killed yet, replacements
included, newest first, then the head), SIGKILL to its process group after a grace period (and, for a worker node, to
anything left in its mount namespace or naming its Ray temp directory: Ray 2.60 gives each of its worker processes a
process group of its own), then SIGKILL to anything left whose command line names this run's temp directory. Every
child also gets SIGTERM from the kernel if the harness dies (``PR_SET_PDEATHSIG``). Each node has its own
``--temp-dir`` (under one short directory in ``/tmp``), so ``/tmp/ray/ray_current_cluster`` is never written; it is
removed anyway if it names this cluster.

Token authentication: the harness makes a fresh token per run and hands it to the nodes and to COMMAND as
``RAY_AUTH_MODE=token`` plus ``RAY_AUTH_TOKEN`` (an environment variable, not a file, because the worker must not
depend on the head's files; ``~/.ray/auth_token`` is neither read nor written: ``RAY_AUTH_TOKEN`` takes precedence).

For pytest: ``can_make_namespaces()`` (skip where ``unshare`` is not permitted) and ``run_on_two_nodes(...)``, which
builds the ``unshare`` command line and returns a ``subprocess.CompletedProcess``; for COMMAND: ``control(...)``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib.util
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from flora_ray.testing.processes import die_with_parent, kill_group, ray_executable, stop_group
from flora_ray.testing.processes import live_processes as processes_matching

HOST = "127.0.0.1"
PREFIX = "[multinode]"
TIMEOUT_EXIT = 124  # like timeout(1): COMMAND ran past --timeout
HARNESS_ERROR_EXIT = 3  # the cluster could not be set up (the message says why)
# Exported to COMMAND besides RAY_ADDRESS and the token variables.
ENV_DIR = "FLORA_MULTINODE_DIR"  # this run's temp directory (node logs, Ray temp dirs)
ENV_HEAD_NODE = "FLORA_MULTINODE_HEAD_NODE_ID"
ENV_WORKER_NODE = "FLORA_MULTINODE_WORKER_NODE_ID"  # the first worker node (replacements: see control())
CONTROL_DIR = "control"  # $FLORA_MULTINODE_DIR/control: the driver's requests and the harness's replies
KILL_WORKER = "kill-worker"
ADD_WORKER = "add-worker"
_CONTROL_POLL_S = 0.2
_CONTROL_REPLY_MARGIN_S = 30.0  # the harness's own bookkeeping on top of an action's timeout (a failed start's stop)
# Removed from the environment of the nodes and of COMMAND: a loopback-only setting (it makes `ray start` refuse a
# second node here), an outer cluster's address, a token source that would take precedence over ours.
_SCRUBBED = ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")
_MAX_ROOT_CHARS = 48  # Ray's unix socket paths (AF_UNIX: 107 bytes) are ROOT/h/session_<40 chars>/sockets/...
_HIDE_SCRIPT = r"""
n=$1; shift
while [ "$n" -gt 0 ]; do
  mount -t tmpfs -o size=1g,mode=0755 flora-hidden "$1" || { echo "$0: cannot mount a tmpfs over $1" >&2; exit 97; }
  shift; n=$((n - 1))
done
cd "$1" || exit 97
shift
exec "$@"
"""
# Waits through the GCS (no driver is started) for the head and a worker node that is not in KNOWN (a JSON list of
# node ids; with none known, exactly these two nodes must be alive) and prints both ids as one JSON line.
_PROBE = r"""
import json, sys, time
from ray._raylet import GcsClient
address, want_cpus, timeout_s, known = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), json.loads(sys.argv[4])
deadline = time.monotonic() + timeout_s
seen, error = [], None
while time.monotonic() < deadline:
    try:
        infos = GcsClient(address=address).get_all_node_info(timeout=5).values()
        alive = [i for i in infos if i.state == 0]  # GcsNodeState.ALIVE
        seen = [(i.is_head_node, dict(i.resources_total)) for i in alive]
        heads = [i for i in alive if i.is_head_node]
        workers = [
            i for i in alive
            if not i.is_head_node and i.node_id.hex() not in known and i.resources_total.get("CPU", 0) == want_cpus
        ]
        if heads and workers and (known or len(alive) == 2):
            print(json.dumps({"head": heads[0].node_id.hex(), "worker": workers[0].node_id.hex()}), flush=True)
            sys.exit(0)
    except Exception as exc:  # the GCS is still starting
        error = repr(exc)
    time.sleep(0.5)
print(f"alive nodes (is_head, resources): {seen}; last error: {error}", file=sys.stderr, flush=True)
sys.exit(1)
"""


class HarnessError(RuntimeError):
    """The two-node cluster could not be set up; the message says why (with the node logs' tail)."""


class _Interrupted(BaseException):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _log(message: str) -> None:
    print(f"{PREFIX} {message}", file=sys.stderr, flush=True)


def _ray_executable() -> str:
    try:
        return ray_executable()
    except FileNotFoundError as exc:
        raise HarnessError(str(exc)) from None


# --- the pytest side -------------------------------------------------------------------------------------------------


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
    for key in _SCRUBBED:
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


# --- the driver side (COMMAND) ---------------------------------------------------------------------------------------


class ControlError(RuntimeError):
    """A ``control`` request failed (the harness's error message) or got no reply in time."""


def control(action: str, timeout_s: float = 60.0) -> dict:
    """Ask the harness around this process (COMMAND) to change the cluster; see the module docstring.

    Args:
        action: ``"kill-worker"`` (SIGKILL every process of the newest worker node not killed yet, like a spot
            reclaim) or ``"add-worker"`` (start a replacement worker node and wait until the GCS reports it alive).
        timeout_s: Bound on the action (the replacement's start); the reply is awaited a little longer.

    Returns:
        The harness's reply: ``{"ok": True, "action": ..., "node_id": ..., "name": ..., "seconds": ...}``, with
        ``"killed_pids"`` for ``"kill-worker"``; ``node_id`` is the killed or the new node's id (hex).

    Raises:
        ControlError: The harness reported a failure, or no reply came within ``timeout_s`` plus a margin (the
            request is then withdrawn if the harness has not taken it yet).
    """
    root = os.environ.get(ENV_DIR)
    if not root:
        raise ControlError(f"${ENV_DIR} is not set: control() works only in the command of the multinode harness")
    directory = Path(root) / CONTROL_DIR
    key = f"{time.time_ns():020d}-{os.getpid()}-{secrets.token_hex(4)}"
    request, reply_path = directory / f"{key}.request", directory / f"{key}.reply"
    _write_json_atomically(request, {"action": action, "timeout_s": timeout_s})
    deadline = time.monotonic() + timeout_s + _CONTROL_REPLY_MARGIN_S
    while not reply_path.exists():
        if time.monotonic() > deadline:
            with contextlib.suppress(OSError):
                request.unlink()
            raise ControlError(
                f"no reply from the harness to {action!r} within {timeout_s + _CONTROL_REPLY_MARGIN_S:.0f} s"
            )
        time.sleep(0.05)
    reply = json.loads(reply_path.read_text())
    with contextlib.suppress(OSError):
        reply_path.unlink()
    if not reply.get("ok"):
        raise ControlError(f"{action!r} failed: {reply.get('error')}")
    return reply


def _write_json_atomically(path: Path, data: Mapping) -> None:
    """Write ``data`` to a dot-file beside ``path``, then rename it to ``path`` (readers never see half a file)."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(data))
    os.replace(partial, path)


# --- inside the namespace ------------------------------------------------------------------------------------------


def _check_network_namespace() -> None:
    names = sorted(name for _index, name in socket.if_nameindex())
    if names != ["lo"]:
        raise HarnessError(
            f"this is not a fresh network namespace (interfaces: {', '.join(names)}): launch the harness as "
            "`unshare --net --fork -- python -m flora_ray.testing.multinode ...`, where Ray can only use 127.0.0.1"
        )
    result = subprocess.run(["ip", "link", "set", "lo", "up"], capture_output=True, text=True, timeout=10, check=False)
    if result.returncode != 0:
        raise HarnessError(f"cannot bring the loopback interface up (`ip link set lo up`): {result.stderr.strip()}")


def _is_within(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


def _check_hidden(hidden: Sequence[Path], temp_root: Path) -> None:
    """The worker must still reach Python, Ray and its own temp directory (made in ``temp_root``)."""
    needed = {"this run's temp directory": temp_root, "the Python installation": Path(sys.prefix).resolve()}
    for module in ("ray", "flora_ray"):
        spec = importlib.util.find_spec(module)
        if spec is not None and spec.origin:
            needed[f"the {module} package"] = Path(spec.origin).resolve().parent
    for directory in hidden:
        if not directory.is_dir():
            raise HarnessError(f"--hide {str(directory)!r} is not an existing directory")
        for what, path in needed.items():
            if _is_within(path, directory):
                raise HarnessError(f"--hide {str(directory)!r} would hide {what} ({path}) from the worker node")


@dataclasses.dataclass
class _WorkerNode:
    """One worker node: ``ray start --block`` in a session and a mount namespace of its own."""

    name: str  # its Ray temp directory's name under the run's root: "w", "w2", ...
    log: str
    process: subprocess.Popen
    node_id: str = ""  # once the GCS reported it alive
    # An open descriptor of its mount namespace once it is up (None if unknown): it keeps the namespace's inode number
    # from being freed (the kernel hands a freed one to the next namespace made) until the node is killed.
    mount_ns_fd: int | None = None
    killed: bool = False


class TwoNodeCluster:
    """A head (no CPUs) and one worker node in this network namespace; ``start``, ``run``, ``stop``; while ``run``
    waits for the command it also serves the command's ``control`` requests (killed and replacement workers)."""

    def __init__(
        self,
        root: Path,
        *,
        port: int,
        hide: Sequence[Path],
        worker_cpus: int,
        worker_gpus: int,
        resources: Mapping[str, float] | None,
        object_store_mb: int,
        dashboard_port: int | None = None,
    ) -> None:
        self.root = root
        self.port = port
        self.address = f"{HOST}:{port}"
        self.head_temp = root / "h"
        self.worker_temp = root / "w"  # the first worker's; replacements get root / "w2", ...
        self.control_dir = root / CONTROL_DIR
        self.hide = [*hide, self.head_temp]  # the worker does not see the head's Ray session either
        self.worker_cpus = worker_cpus
        self.worker_gpus = worker_gpus
        self.resources = dict(resources or {})
        self.object_store_bytes = object_store_mb * 1024**2
        self.dashboard_port = dashboard_port
        self.token = secrets.token_hex(32)
        self.head: subprocess.Popen | None = None
        self.workers: list[_WorkerNode] = []  # oldest first
        self.node_ids: dict[str, str] = {}
        self.env = self._env()

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
        env.update(
            {
                "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN": self.token,
                "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # on SIGTERM stop at once, no 30 s drain
            }
        )
        return env

    def _node_args(self, temp_dir: Path, cpus: int, gpus: int) -> list[str]:
        return [
            "--block",
            f"--node-ip-address={HOST}",
            f"--num-cpus={cpus}",
            f"--num-gpus={gpus}",
            f"--temp-dir={temp_dir}",
            f"--object-store-memory={self.object_store_bytes}",
            "--dashboard-agent-listen-port=0",  # both nodes share 127.0.0.1: no fixed ports
            "--disable-usage-stats",
        ]

    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen:
        with open(self.root / log_name, "wb") as log:
            return subprocess.Popen(
                args,
                cwd=self.root,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )

    def _spawn_worker(self) -> _WorkerNode:
        """Start the next worker node (``w``, then ``w2``, ...) behind the tmpfs shim; it joins ``self.workers``."""
        number = len(self.workers) + 1
        name, log = ("w", "worker.log") if number == 1 else (f"w{number}", f"worker{number}.log")
        temp = self.root / name
        temp.mkdir(parents=True)
        worker_node = self._node_args(temp, self.worker_cpus, self.worker_gpus)
        worker_args = [_ray_executable(), "start", f"--address={self.address}", *worker_node]
        if self.resources:
            worker_args.append(f"--resources={json.dumps(self.resources)}")
        shim = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", _HIDE_SCRIPT, "flora-hide"]
        shim += [str(len(self.hide)), *map(str, self.hide), str(temp)]
        node = _WorkerNode(name, log, self._spawn([*shim, *worker_args], log))
        self.workers.append(node)
        return node

    def start(self, timeout_s: float) -> None:
        """Start the head, then the first worker node, and wait until the GCS reports both alive."""
        deadline = time.monotonic() + timeout_s
        ray = _ray_executable()
        self.head_temp.mkdir(parents=True)
        head_args = [ray, "start", "--head", f"--port={self.port}"]
        if self.dashboard_port is None:
            head_args.append("--include-dashboard=false")
        else:
            head_args += [
                "--include-dashboard=true",
                f"--dashboard-host={HOST}",
                f"--dashboard-port={self.dashboard_port}",
            ]
        self.head = self._spawn([*head_args, *self._node_args(self.head_temp, 0, 0)], "head.log")
        self._wait_for_port(deadline)
        worker = self._spawn_worker()
        self.node_ids = self._wait_for_worker(worker, deadline, "the two nodes were not both alive")
        if self.dashboard_port is not None:
            self._wait_for_job_api(deadline)

    def _wait_for_job_api(self, deadline: float) -> None:
        """Wait until the dashboard's job API answers (``GET /api/jobs/`` with the token): ``ray job submit`` fails
        rather than waits while the dashboard is still starting."""
        url = f"http://{HOST}:{self.dashboard_port}/api/jobs/"
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {self.token}"})
        error = None
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError as exc:  # not listening yet, or the job module not loaded yet (HTTPError too)
                error = exc
            time.sleep(0.5)
        raise HarnessError(f"the job API at {url} did not answer in time ({error!r})\n{self.logs_tail()}")

    def _check_alive(self, workers: Sequence[_WorkerNode] | None = None) -> None:
        workers = [n for n in self.workers if not n.killed] if workers is None else workers
        checked = [("head", self.head)] + [(f"worker {n.name}", n.process) for n in workers]
        for name, process in checked:
            if process is not None and process.poll() is not None:
                raise HarnessError(f"the {name} node exited with {process.returncode}\n{self.logs_tail()}")

    def _wait_for_port(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            self._check_alive()
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.settimeout(1.0)
                if sock.connect_ex((HOST, self.port)) == 0:
                    return
            time.sleep(0.3)
        raise HarnessError(f"the head's GCS did not listen on {self.address} in time\n{self.logs_tail()}")

    def _wait_for_worker(self, worker: _WorkerNode, deadline: float, failure: str) -> dict[str, str]:
        """Wait until the GCS reports the head and ``worker`` (a node id it has not seen before) alive; their ids."""
        left = max(deadline - time.monotonic(), 1.0)
        known = [node_id for node_id in (self.node_ids.get("head"), *(n.node_id for n in self.workers)) if node_id]
        probe = subprocess.Popen(
            [sys.executable, "-c", _PROBE, self.address, str(float(self.worker_cpus)), str(left), json.dumps(known)],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        try:
            while probe.poll() is None:
                self._check_alive([worker])
                if time.monotonic() > deadline + 15:
                    raise HarnessError(f"the node probe hung\n{self.logs_tail()}")
                time.sleep(0.3)
            stdout, stderr = probe.communicate(timeout=5)
        finally:
            if probe.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(probe.pid, signal.SIGKILL)
                probe.wait(timeout=5)
        self._check_alive([worker])
        if probe.returncode != 0:
            raise HarnessError(f"{failure} within the start timeout: {stderr.strip()[-2000:]}\n{self.logs_tail()}")
        ids = json.loads(stdout.strip().splitlines()[-1])
        worker.node_id = ids["worker"]
        worker.mount_ns_fd = _open_mount_namespace(worker.process.pid)
        return ids

    def command_env(self) -> dict[str, str]:
        env = dict(self.env)
        env.pop("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", None)
        env.update({"RAY_ADDRESS": self.address, ENV_DIR: str(self.root)})
        if self.node_ids:
            env.update({ENV_HEAD_NODE: self.node_ids["head"], ENV_WORKER_NODE: self.node_ids["worker"]})
        return env

    def run(self, command: Sequence[str], timeout_s: float | None) -> int:
        """Run ``command`` to its end (its output goes to this process's), serving its ``control`` requests; its exit
        code, 124 after ``timeout_s``."""
        self.control_dir.mkdir(exist_ok=True)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        process = subprocess.Popen(
            list(command), env=self.command_env(), start_new_session=True, preexec_fn=die_with_parent
        )
        try:
            while process.poll() is None:
                if deadline is not None and time.monotonic() >= deadline:
                    _log(f"the command ran past the run's --timeout (it had {timeout_s:.0f} s of it): stopping it")
                    stop_group(process, grace_s=10.0, leader_first=False)
                    return TIMEOUT_EXIT
                self.serve_control()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=_CONTROL_POLL_S)
        except BaseException:
            stop_group(process, grace_s=10.0, leader_first=False)
            raise
        finally:
            # Whatever the command left in its process group (a backgrounded child).
            kill_group(process.pid)
        return process.returncode if process.returncode >= 0 else 128 - process.returncode

    def serve_control(self) -> None:
        """Perform the pending ``control`` requests one at a time, oldest key first, and write their replies."""
        for request in sorted(self.control_dir.glob("*.request")):
            try:
                body = json.loads(request.read_text())
                request.unlink()
            except FileNotFoundError:  # withdrawn by a driver that stopped waiting
                continue
            except (OSError, ValueError) as exc:
                with contextlib.suppress(OSError):
                    request.unlink()
                body = {"invalid": f"unreadable request {request.name}: {exc}"}
            if not isinstance(body, dict):
                body = {"invalid": f"request {request.name} is not a JSON object"}
            reply = self.perform(body)
            try:
                _write_json_atomically(request.with_suffix(".reply"), reply)
            except OSError as exc:
                _log(f"cannot write the reply to {request.name}: {exc}")

    def perform(self, request: Mapping) -> dict:
        """One ``control`` request: its reply (``ok`` false with an ``error`` if it failed)."""
        action = request.get("action")
        started = time.monotonic()
        try:
            if "invalid" in request:
                raise HarnessError(request["invalid"])
            timeout_s = float(request.get("timeout_s", 60.0))
            if action == KILL_WORKER:
                result = self.kill_worker()
            elif action == ADD_WORKER:
                result = self.add_worker(timeout_s)
            else:
                raise HarnessError(f"unknown action {action!r} (known: {KILL_WORKER!r}, {ADD_WORKER!r})")
        except (HarnessError, OSError, ValueError, TypeError, subprocess.SubprocessError) as exc:
            _log(f"control {action!r} failed after {time.monotonic() - started:.1f} s: {exc}")
            return {"ok": False, "action": action, "error": str(exc)}
        _log(f"control {action!r} done in {time.monotonic() - started:.1f} s: {result}")
        return {"ok": True, "action": action, **result, "seconds": round(time.monotonic() - started, 3)}

    def kill_worker(self) -> dict:
        """SIGKILL every process of the newest worker node not killed yet (a spot reclaim: no graceful stop)."""
        node = next((n for n in reversed(self.workers) if not n.killed), None)
        if node is None:
            raise HarnessError("there is no live worker node to kill (add one first)")
        killed = _kill_node(node, self.root / node.name)
        return {"node_id": node.node_id, "name": node.name, "killed_pids": killed}

    def add_worker(self, timeout_s: float) -> dict:
        """Start a replacement worker node with the same settings and a fresh temp dir; wait until it is alive."""
        node = self._spawn_worker()
        try:
            self._wait_for_worker(
                node, time.monotonic() + timeout_s, f"the replacement worker node {node.name} was not alive"
            )
        except HarnessError:
            _kill_node(node, self.root / node.name)  # it never served: no graceful stop needed
            raise
        return {"node_id": node.node_id, "name": node.name}

    def stop(self) -> None:
        """Stop the worker nodes not killed yet (newest first; then SIGKILL what is left in their sessions and mount
        namespaces: Ray's workers have process groups of their own), then the head, then anything left that names this
        run's directory."""
        live = [n for n in reversed(self.workers) if not n.killed]  # a killed one's group id may have been reused
        for node in live:
            stop_group(node.process, grace_s=15.0)
            try:
                if leftovers := _kill_node(node, self.root / node.name):
                    _log(f"killed what worker node {node.name} left after its stop: {leftovers}")
            except HarnessError as exc:
                _log(str(exc))
        if self.head is not None:
            stop_group(self.head, grace_s=15.0)
        self.head = None  # stop() again: no signal to a group id that may have been reused
        deadline = time.monotonic() + 15.0
        while (leftovers := live_processes(str(self.root))) and time.monotonic() < deadline:
            for pid in leftovers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
        if leftovers:
            _log(f"processes still alive after teardown: {leftovers}")
        _forget_current_cluster(self.address)

    def logs_tail(self, lines: int = 15) -> str:
        parts = []
        candidates = [self.root / "head.log", *(self.root / n.log for n in self.workers)]
        for temp in (self.head_temp, *(self.root / n.name for n in self.workers)):
            logs = temp / "session_latest" / "logs"
            candidates += [logs / name for name in ("gcs_server.err", "raylet.err", "raylet.out")]
        for path in candidates:
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace").strip().splitlines()
                if text:
                    parts.append(f"--- {path} (last {min(lines, len(text))} lines)\n" + "\n".join(text[-lines:]))
        return "\n".join(parts) or "(no node logs)"


def _open_mount_namespace(pid: int) -> int | None:
    """An open (close-on-exec) descriptor of the mount namespace of ``pid``, or None if unknown or the same as this
    process's (the node's ``unshare --mount`` has not run yet: matching on it would take in the harness and the head).
    """
    try:
        fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    if os.path.samestat(os.fstat(fd), os.stat("/proc/self/ns/mnt")):
        os.close(fd)
        return None
    return fd


def _node_processes(leader: int | None, mount_ns: os.stat_result | None, temp_dir: Path) -> list[int]:
    """Live (non-zombie) processes, other than this one, of one node: in the process group or session ``leader``,
    in the mount namespace ``mount_ns`` (``fstat`` of a descriptor that holds it), or whose command line names
    ``temp_dir`` (the path itself or below it: ``ROOT/w`` does not match ``ROOT/w2``)."""
    names_dir = re.compile(re.escape(os.fsencode(temp_dir)) + rb"(?=/|\0|$)")
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp sid
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        in_namespace = False
        if mount_ns is not None:
            with contextlib.suppress(OSError):
                in_namespace = os.path.samestat(os.stat(entry / "ns" / "mnt"), mount_ns)
        in_group = leader is not None and leader in (int(fields[2]), int(fields[3]))
        if fields[0] != "Z" and (in_group or in_namespace or names_dir.search(cmdline)):
            pids.append(int(entry.name))
    return pids


def _kill_node(node: _WorkerNode, temp_dir: Path) -> list[int]:
    """SIGKILL every process of ``node`` (see ``_node_processes``) until none is left; the pids killed."""
    node.killed = True
    # Its `ray start` has not been reaped unless it exited on its own: its pid still names its group and session.
    leader = node.process.pid if node.process.returncode is None else None
    if node.mount_ns_fd is None and leader is not None:
        node.mount_ns_fd = _open_mount_namespace(leader)
    mount_ns = None if node.mount_ns_fd is None else os.fstat(node.mount_ns_fd)
    killed: set[int] = set()
    deadline = time.monotonic() + 10.0
    try:
        while pids := _node_processes(leader, mount_ns, temp_dir):
            if time.monotonic() > deadline:
                raise HarnessError(f"processes of worker node {node.name} are still alive after SIGKILL: {pids}")
            if leader is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(leader, signal.SIGKILL)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            killed.update(pids)
            time.sleep(0.1)
    finally:
        if node.mount_ns_fd is not None:
            os.close(node.mount_ns_fd)
            node.mount_ns_fd = None
    with contextlib.suppress(subprocess.TimeoutExpired):
        node.process.wait(timeout=10)
    return sorted(killed)


def live_processes(marker: str) -> list[int]:
    """Live (non-zombie) processes, other than this one, whose command line contains ``marker``."""
    return processes_matching(marker=marker)


def _forget_current_cluster(address: str) -> None:
    """Remove ``/tmp/ray/ray_current_cluster`` if it names this cluster (each node has its own temp dir, so Ray
    should not have written it; this guards against a Ray version that does)."""
    current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    with contextlib.suppress(OSError):
        if current.read_text().strip() == address:
            current.unlink()


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m flora_ray.testing.multinode",
        description="Run COMMAND against a two-node Ray cluster whose worker does not see the --hide directories. "
        "Launch as: unshare --net --fork -- python -m flora_ray.testing.multinode [options] -- COMMAND ...",
    )
    parser.add_argument("--hide", action="append", default=[], type=Path, metavar="DIR", help="hidden from the worker")
    parser.add_argument("--worker-cpus", type=int, default=2, help="CPUs of the worker node (default 2)")
    parser.add_argument("--worker-gpus", type=int, default=0, help="GPUs of the worker node (default 0)")
    parser.add_argument("--resources", type=json.loads, default=None, help="custom resources of the worker (JSON)")
    parser.add_argument("--port", type=int, default=None, help="GCS port (default: random in 20000-39999)")
    parser.add_argument("--timeout", type=float, default=None, help="bound on the whole run in seconds (exit 124)")
    parser.add_argument("--start-timeout", type=float, default=60.0, help="bound on the cluster start (default 60)")
    parser.add_argument(
        "--attempts",
        type=int,
        default=2,
        help="cluster starts to try (default 2; a busy machine can miss Ray's 30 s raylet registration)",
    )
    parser.add_argument("--object-store-mb", type=int, default=200, help="object store of each node (default 200)")
    parser.add_argument("--temp-root", type=Path, default=None, help="parent of this run's temp dir (default /tmp)")
    parser.add_argument("--keep-temp", action="store_true", help="keep the temp dir (node logs) after a success")
    parser.add_argument(
        "--dashboard-port", type=int, default=None, help="run the head's dashboard and job API on this port"
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ...")
    args = parser.parse_args(argv)
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    if not args.command:
        parser.error("give the command after --")
    if args.attempts < 1:
        parser.error("--attempts must be at least 1")
    if args.worker_cpus < 1:
        parser.error("--worker-cpus must be at least 1")
    if args.resources is not None and not isinstance(args.resources, dict):
        parser.error("--resources must be a JSON object")
    return args


def _start(args: argparse.Namespace, root: Path, hidden: list[Path], started: float) -> TwoNodeCluster:
    """Start the cluster, retrying a failed start (attempt n > 1 in a subdirectory: the failed attempt's logs stay
    for the post-mortem)."""
    start_timeout = args.start_timeout if args.timeout is None else min(args.start_timeout, args.timeout)
    for attempt in range(1, args.attempts + 1):
        cluster = TwoNodeCluster(
            root if attempt == 1 else root / str(attempt),
            port=args.port or random.randint(20000, 39999),
            hide=hidden,
            worker_cpus=args.worker_cpus,
            worker_gpus=args.worker_gpus,
            resources=args.resources,
            object_store_mb=args.object_store_mb,
            dashboard_port=args.dashboard_port,
        )
        _log(
            f"starting head and worker on {cluster.address} (temp dir {cluster.root}; hidden from the worker: {hidden})"
        )
        try:
            cluster.start(start_timeout)
            return cluster
        except HarnessError as exc:
            cluster.stop()
            time_left = None if args.timeout is None else args.timeout - (time.monotonic() - started)
            if attempt == args.attempts or (time_left is not None and time_left < start_timeout / 2):
                raise
            _log(f"start attempt {attempt} failed, retrying: {exc}")
    raise HarnessError("no start attempt")  # unreachable: attempts >= 1


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    started = time.monotonic()
    cluster: TwoNodeCluster | None = None
    root: Path | None = None
    failed = True

    def interrupt(signum: int, _frame: object) -> None:
        raise _Interrupted(signum)

    handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    for signum in handled:
        signal.signal(signum, interrupt)
    try:
        _check_network_namespace()
        temp_root = Path(args.temp_root or "/tmp").resolve()
        if len(str(temp_root)) > _MAX_ROOT_CHARS - 14:
            raise HarnessError(f"--temp-root {temp_root} is too long for Ray's unix socket paths; use a short one")
        hidden = [Path(d).resolve() for d in args.hide]
        _check_hidden(hidden, temp_root)
        root = Path(tempfile.mkdtemp(prefix="frmn-", dir=temp_root))
        cluster = _start(args, root, hidden, started)
        _log(f"cluster up in {time.monotonic() - started:.1f} s: nodes {cluster.node_ids}")
        left = None if args.timeout is None else max(args.timeout - (time.monotonic() - started), 1.0)
        code = cluster.run(args.command, left)
        failed = code != 0
        return code
    except HarnessError as exc:
        _log(f"error: {exc}")
        return HARNESS_ERROR_EXIT
    except _Interrupted as exc:
        _log(f"got {exc}: tearing the cluster down")
        return 128 + exc.signum
    finally:
        for signum in handled:  # finish the teardown; every wait in it is bounded
            signal.signal(signum, signal.SIG_IGN)
        if cluster is not None:
            cluster.stop()
        if root is not None:
            if cluster is not None and (failed or args.keep_temp):
                _log(f"node logs kept in {root}")
            else:
                shutil.rmtree(root, ignore_errors=True)
        _log(f"done in {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    sys.exit(main())

"""``TwoNodeCluster``: the head and worker nodes of one harness run, started, served and stopped."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from flora_ray.testing.multinode.nodes import WorkerNode, kill_node, live_processes, open_mount_namespace
from flora_ray.testing.multinode.protocol import (
    ADD_WORKER,
    CONTROL_DIR,
    CONTROL_POLL_S,
    ENV_DIR,
    ENV_HEAD_NODE,
    ENV_WORKER_NODE,
    HOST,
    KILL_WORKER,
    SCRUBBED,
    TIMEOUT_EXIT,
    HarnessError,
    log,
    write_json_atomically,
)
from flora_ray.testing.processes import die_with_parent, kill_group, ray_executable, stop_group

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


def _ray_executable() -> str:
    try:
        return ray_executable()
    except FileNotFoundError as exc:
        raise HarnessError(str(exc)) from None


def _forget_current_cluster(address: str) -> None:
    """Remove ``/tmp/ray/ray_current_cluster`` if it names this cluster (each node has its own temp dir, so Ray
    should not have written it; this guards against a Ray version that does)."""
    current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    with contextlib.suppress(OSError):
        if current.read_text().strip() == address:
            current.unlink()


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
        self.workers: list[WorkerNode] = []  # oldest first
        self.node_ids: dict[str, str] = {}
        self.env = self._env()

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in SCRUBBED}
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

    def _spawn_worker(self) -> WorkerNode:
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
        node = WorkerNode(name, log, self._spawn([*shim, *worker_args], log))
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

    def _check_alive(self, workers: Sequence[WorkerNode] | None = None) -> None:
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

    def _wait_for_worker(self, worker: WorkerNode, deadline: float, failure: str) -> dict[str, str]:
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
        worker.mount_ns_fd = open_mount_namespace(worker.process.pid)
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
                    log(f"the command ran past the run's --timeout (it had {timeout_s:.0f} s of it): stopping it")
                    stop_group(process, grace_s=10.0, leader_first=False)
                    return TIMEOUT_EXIT
                self.serve_control()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=CONTROL_POLL_S)
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
                write_json_atomically(request.with_suffix(".reply"), reply)
            except OSError as exc:
                log(f"cannot write the reply to {request.name}: {exc}")

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
            log(f"control {action!r} failed after {time.monotonic() - started:.1f} s: {exc}")
            return {"ok": False, "action": action, "error": str(exc)}
        log(f"control {action!r} done in {time.monotonic() - started:.1f} s: {result}")
        return {"ok": True, "action": action, **result, "seconds": round(time.monotonic() - started, 3)}

    def kill_worker(self) -> dict:
        """SIGKILL every process of the newest worker node not killed yet (a spot reclaim: no graceful stop)."""
        node = next((n for n in reversed(self.workers) if not n.killed), None)
        if node is None:
            raise HarnessError("there is no live worker node to kill (add one first)")
        killed = kill_node(node, self.root / node.name)
        return {"node_id": node.node_id, "name": node.name, "killed_pids": killed}

    def add_worker(self, timeout_s: float) -> dict:
        """Start a replacement worker node with the same settings and a fresh temp dir; wait until it is alive."""
        node = self._spawn_worker()
        try:
            self._wait_for_worker(
                node, time.monotonic() + timeout_s, f"the replacement worker node {node.name} was not alive"
            )
        except HarnessError:
            kill_node(node, self.root / node.name)  # it never served: no graceful stop needed
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
                if leftovers := kill_node(node, self.root / node.name):
                    log(f"killed what worker node {node.name} left after its stop: {leftovers}")
            except HarnessError as exc:
                log(str(exc))
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
            log(f"processes still alive after teardown: {leftovers}")
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

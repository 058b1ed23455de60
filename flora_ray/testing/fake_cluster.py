"""Start and stop a local autoscaling Ray cluster with Ray's ``fake_multinode`` node provider.

The provider launches extra raylets on this machine as "nodes" when the autoscaler asks for them, so the resource
demands of the stages (training workers, filter tasks, search evaluators) can be checked against a real
autoscaler without a cloud. Ray's ``AutoscalingCluster`` helper is not usable as shipped (it reads an
``example.yaml`` the wheel lacks and runs ``ray stop --force``, which kills every Ray process on the machine), so
this module writes the autoscaler config itself and owns exactly the processes it starts:

* the head is ``ray start --head --block`` in a new session (``start_new_session``), with its own short temp
  directory (so ``ray.init()`` elsewhere on the machine never finds it) and its own auth token file;
* stopping sends SIGTERM to the head (the ``ray start`` process, leader of its process group), SIGKILL to the
  group after a grace period, then SIGKILL to anything still in the head's session or using its temp directory
  (the fake nodes' raylets are children of the autoscaler monitor; their worker processes have process groups of
  their own but stay in the session);
* if the process that started the head dies, the kernel sends the head SIGTERM (``PR_SET_PDEATHSIG``), and it
  stops its own processes;
* ``watch`` (``python -m flora_ray.testing.fake_cluster watch``) samples the alive nodes and the autoscaler's pending
  demand from the GCS into a JSON-lines file, one line per sample.

The provider dials the GCS on the default port, so the head always listens on 127.0.0.1:6379: one such cluster
per machine at a time (``port_in_use`` tells whether the port is taken).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from flora_ray.testing.processes import die_with_parent, live_processes, port_in_use, ray_executable, stop_group

logger = logging.getLogger(__name__)

HEAD_PORT = 6379
ADDRESS = f"127.0.0.1:{HEAD_PORT}"
HEAD_NODE_TYPE = "ray.head.default"  # the name FakeMultiNodeProvider gives its head node
WORKER_NODE_TYPE = "ray.worker.accel"
# Fields the autoscaler reads without defaults (the launcher's `ray up` would fill them in).
_EMPTY_LISTS = (
    "cluster_synced_files",
    "rsync_exclude",
    "rsync_filter",
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)
_STATUS_KEY = b"__autoscaling_status"  # ray_constants.DEBUG_AUTOSCALING_STATUS, what `ray status` reads


def autoscaler_config(
    worker_resources: dict[str, int] | None = None,
    *,
    max_workers: int = 2,
    idle_timeout_minutes: float = 0.1,
    object_store_memory: int = 100 * 1024**2,
    upscaling_speed: float = 2.0,
) -> dict[str, Any]:
    """The autoscaler config: a head with no CPUs, one worker type from 0 to ``max_workers`` nodes.

    Args:
        worker_resources: Resources of one worker node (default ``{"CPU": 1, "accel": 1}``).
        max_workers: Most worker nodes at once.
        idle_timeout_minutes: Idle time after which a worker node is removed (fractions allowed).
        object_store_memory: Object store bytes of each worker node.
        upscaling_speed: How many nodes may be pending per running node (the autoscaler's ramp-up).
    """
    if max_workers < 1:
        raise ValueError(f"max_workers={max_workers!r} is invalid: must be at least 1")
    if idle_timeout_minutes < 0:
        raise ValueError(f"idle_timeout_minutes={idle_timeout_minutes!r} is invalid: must be >= 0")
    resources = dict(worker_resources or {"CPU": 1, "accel": 1})
    resources["object_store_memory"] = int(object_store_memory)
    config: dict[str, Any] = {
        "cluster_name": "flora-fake",
        "max_workers": max_workers,
        "upscaling_speed": upscaling_speed,
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {
            "type": "fake_multinode",
            "disable_launch_config_check": True,
            "disable_node_updaters": True,
            "use_node_id_as_ip": True,
        },
        "auth": {},
        "docker": {},
        "head_node_type": HEAD_NODE_TYPE,
        "available_node_types": {
            HEAD_NODE_TYPE: {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            WORKER_NODE_TYPE: {
                "resources": resources,
                "node_config": {},
                "min_workers": 0,
                "max_workers": max_workers,
            },
        },
        "file_mounts": {},
        "file_mounts_sync_continuously": False,
    }
    config.update({key: [] for key in _EMPTY_LISTS})
    return config


class FakeCluster:
    """A running fake-multinode cluster; use as a context manager or call ``stop``.

    Attributes:
        workdir: Directory with the autoscaler config, the token file, the head's log and the watch file.
        env: Environment a client process needs (token authentication on, this cluster's token).
        address: GCS address to pass as ``--address``.
    """

    address = ADDRESS

    def __init__(self, workdir: Path, process: subprocess.Popen, temp_dir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.process = process
        self.temp_dir = temp_dir
        self.env = env
        self._watcher: subprocess.Popen | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / "head.log"

    @property
    def watch_path(self) -> Path:
        return self.workdir / "nodes.jsonl"

    def __enter__(self) -> FakeCluster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start_watch(self, interval_s: float = 0.5) -> None:
        """Start sampling nodes and demand into ``watch_path`` (a subprocess with this cluster's environment)."""
        if self._watcher is not None:
            return
        self.watch_path.unlink(missing_ok=True)
        command = [sys.executable, "-m", "flora_ray.testing.fake_cluster", "watch", "--address", self.address]
        command += ["--out", str(self.watch_path), "--interval", str(interval_s)]
        log = open(self.workdir / "watch.log", "ab")  # noqa: SIM115 - the child holds it open
        self._watcher = subprocess.Popen(
            command,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        log.close()

    def run_cli(self, args: Sequence[str], log_path: Path, timeout_s: float = 600.0) -> dict[str, Any]:
        """Run ``flora-ray ARGS --address`` this cluster in a subprocess with its environment.

        Returns:
            ``returncode``, ``started`` and ``ended`` (wall-clock seconds) and ``seconds``; output goes to ``log_path``.
        """
        command = [sys.executable, "-m", "flora_ray.cli", *args, "--address", self.address]
        started = time.time()
        with open(log_path, "wb") as log:
            proc = subprocess.run(command, env=self.env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s)
        ended = time.time()
        return {"returncode": proc.returncode, "started": started, "ended": ended, "seconds": ended - started}

    def samples(self) -> list[dict[str, Any]]:
        """The watch samples so far (complete lines only)."""
        if not self.watch_path.is_file():
            return []
        lines = self.watch_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.endswith("}")]

    def wait_for_workers(self, count: int, timeout_s: float, compare: str = "eq") -> float | None:
        """Wait until the sampled alive worker count equals (``eq``) or reaches (``ge``) ``count``.

        Returns:
            The wall-clock time of the first matching sample, or ``None`` on timeout.
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for sample in reversed(self.samples()[-5:]):
                workers = sample["workers"]
                if workers == count or (compare == "ge" and workers >= count):
                    return sample["t"]
            time.sleep(0.5)
        return None

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop the watcher, the head (TERM, then KILL of its group after ``grace_s``) and whatever is left."""
        if self._watcher is not None:
            stop_group(self._watcher, 5.0)
            self._watcher = None
        if self.process.returncode is None or self.leftover_processes():
            # A pid still in use as a session id is never reused, so the group id is still this head's.
            stop_group(self.process, grace_s)
            deadline = time.monotonic() + 15.0
            while (leftovers := self.leftover_processes()) and time.monotonic() < deadline:
                logger.info("fake cluster: killing %d leftover processes", len(leftovers))
                for pid in leftovers:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                time.sleep(0.2)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def leftover_processes(self) -> list[int]:
        """Live processes of this cluster: in the head's session, or using its temp directory (the fake nodes'
        raylets are children of the autoscaler monitor; their workers have process groups of their own)."""
        return live_processes(sid=self.process.pid, marker=str(self.temp_dir))


def client_env(token_file: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a process that joins the cluster: loopback only, token mode with this token file."""
    env = dict(os.environ if base is None else base)
    for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN"):  # RAY_AUTH_TOKEN would take precedence over the file
        env.pop(key, None)
    env.update(
        {
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token_file),
            "RAY_USAGE_STATS_ENABLED": "0",
        }
    )
    return env


def start_fake_cluster(
    workdir: str | os.PathLike,
    config: dict[str, Any] | None = None,
    *,
    timeout_s: float = 90.0,
    watch_interval_s: float | None = 0.5,
    head_object_store_memory: int = 200 * 1024**2,
    attempts: int = 2,
) -> FakeCluster:
    """Start the head of a fake-multinode autoscaling cluster on 127.0.0.1:6379 and wait until it is up.

    Args:
        workdir: Directory for the config, token, logs and samples (created).
        config: Autoscaler config (default ``autoscaler_config()``).
        timeout_s: How long to wait for the head.
        watch_interval_s: Start the node watcher at this interval (``None``: do not).
        head_object_store_memory: Object store bytes of the head (weights the driver puts travel through it).
        attempts: Head starts to try; Ray gives a raylet 30 s to register, which a busy machine can miss.

    Raises:
        RuntimeError: The port is taken, or the head exited or did not come up in time (with its log's tail).
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "autoscaler.yaml"
    config_path.write_text(yaml.safe_dump(config or autoscaler_config(), sort_keys=False))
    token_file = workdir / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    for attempt in range(1, attempts + 1):
        if port_in_use(HEAD_PORT):
            raise RuntimeError(f"port {HEAD_PORT} is in use: another Ray head is running on this machine")
        cluster = _launch_head(workdir, config_path, client_env(token_file), head_object_store_memory)
        try:
            _wait_for_head(cluster, timeout_s)
            if watch_interval_s is not None:
                cluster.start_watch(watch_interval_s)
                _wait_for_first_sample(cluster, timeout_s)
            return cluster
        except RuntimeError as exc:
            cluster.stop()
            if attempt == attempts:
                raise
            logger.warning("fake cluster: start %d of %d failed, retrying: %s", attempt, attempts, exc)
        except BaseException:
            cluster.stop()
            raise
    raise AssertionError("unreachable")


def _launch_head(workdir: Path, config_path: Path, env: dict[str, str], object_store_memory: int) -> FakeCluster:
    # Ray's unix socket paths must stay short: its temp directory lives directly under /tmp.
    temp_dir = Path(tempfile.mkdtemp(prefix="flora-fc-", dir="/tmp"))
    head_env = {
        **env,
        "RAY_FAKE_CLUSTER": "1",
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # on SIGTERM stop at once, no 30 s node drain
    }
    command = [
        ray_executable(),
        "start",
        "--head",
        "--block",
        f"--port={HEAD_PORT}",
        "--num-cpus=0",
        f"--autoscaling-config={config_path}",
        f"--temp-dir={temp_dir}",
        "--include-dashboard=false",
        "--dashboard-agent-listen-port=0",
        f"--object-store-memory={object_store_memory}",
        "--disable-usage-stats",
    ]
    with open(workdir / "head.log", "wb") as log:
        process = subprocess.Popen(
            command,
            env=head_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
    return FakeCluster(workdir, process, temp_dir, env)


def _wait_for_head(cluster: FakeCluster, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cluster.process.poll() is not None:
            raise RuntimeError(f"the fake cluster's head exited ({cluster.process.returncode}): {_tail(cluster)}")
        if "Ray runtime started" in cluster.log_path.read_text(errors="replace") and port_in_use(HEAD_PORT):
            return
        time.sleep(0.5)
    raise RuntimeError(f"the fake cluster's head did not start within {timeout_s:.0f} s: {_tail(cluster)}")


def _wait_for_first_sample(cluster: FakeCluster, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not cluster.samples():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the node watcher wrote nothing within {timeout_s:.0f} s (see {cluster.workdir})")
        time.sleep(0.2)


def _tail(cluster: FakeCluster, lines: int = 5) -> str:
    text = cluster.log_path.read_text(errors="replace").strip().splitlines()
    return " | ".join(text[-lines:]) or "(empty log)"


# --- watching ------------------------------------------------------------------------------------------------------


def cluster_state(gcs_client) -> dict[str, Any]:
    """Alive worker nodes and the autoscaler's view (pending launches, resource demand) from the GCS."""
    alive = []
    for info in gcs_client.get_all_node_info().values():
        if info.state == 0 and not info.is_head_node:  # GcsNodeState.ALIVE == 0
            alive.append(dict(info.resources_total))
    state: dict[str, Any] = {"workers": len(alive), "worker_resources": alive, "pending": 0, "demand": []}
    raw = gcs_client.internal_kv_get(_STATUS_KEY, namespace=None)
    if raw:
        status = json.loads(raw)
        report = status.get("autoscaler_report") or {}
        state["pending"] = sum((report.get("pending_launches") or {}).values()) + len(report.get("pending_nodes") or [])
        state["demand"] = _demand(status.get("load_metrics_report") or {})
    return state


def _demand(load: dict[str, Any]) -> list[list]:
    """``[bundle, count]`` pairs the autoscaler sees: queued tasks and actors, explicit resource requests (Ray
    Train asks through ``request_resources``), then pending placement groups."""
    demand = [list(pair) for key in ("resource_demand", "request_demand") for pair in load.get(key) or []]
    for group, groups in load.get("pg_demand") or []:
        demand += [[bundle, count * groups] for bundle, count in group.get("bundles", [])]
    return demand


def watch(address: str, out: Path, interval_s: float, max_failures: int = 20) -> None:
    """Append one JSON line per sample (``t`` = wall-clock seconds, plus ``cluster_state``) until killed, or until
    ``max_failures`` samples in a row fail (the GCS is gone)."""
    from ray._raylet import GcsClient

    client = GcsClient(address=address)
    failures = 0
    with open(out, "a") as stream:
        while failures < max_failures:
            try:
                sample = {"t": time.time(), **cluster_state(client)}
            except Exception as exc:  # a GCS call that timed out under load, or the GCS shutting down
                failures += 1
                logger.warning("watch: %s", exc)
            else:
                failures = 0
                stream.write(json.dumps(sample) + "\n")
                stream.flush()
            time.sleep(interval_s)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flora_ray.testing.fake_cluster watch --address A --out FILE``."""
    parser = argparse.ArgumentParser(prog="python -m flora_ray.testing.fake_cluster")
    sub = parser.add_subparsers(dest="command", required=True)
    watch_parser = sub.add_parser("watch", help="sample alive nodes and demand into a JSON-lines file")
    watch_parser.add_argument("--address", default=ADDRESS)
    watch_parser.add_argument("--out", type=Path, required=True)
    watch_parser.add_argument("--interval", type=float, default=0.5)
    args = parser.parse_args(argv)
    watch(args.address, args.out, args.interval)
    return 0


if __name__ == "__main__":
    sys.exit(main())

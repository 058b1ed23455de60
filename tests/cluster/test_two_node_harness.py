"""The two-node harness (``flora_ray.testing.multinode``): a head without CPUs and a worker that does not see the
head's directories, in a network namespace of their own.

One cluster (a module fixture) serves both tests. The driver connects with ``ray.init(address="auto")``
(``RAY_ADDRESS`` and the token come from the harness), checks that two nodes are alive and runs a 1-CPU task, which
can only land on the worker node. The task reports whether it sees the marker file of the hidden ``tmp/head`` (it
must not), writes into the shared ``tmp/storage`` (the driver reads it back) and into ``tmp/head`` (the head must
not see that), and its node id (not the head's). After the harness exits no process of the cluster may be left and
``/tmp/ray/ray_current_cluster`` must not name it.

Then, in the same driver, a spot reclaim (``control("kill-worker")``) and the return of capacity
(``control("add-worker")``): the worker node dies for the GCS (its health checks are shortened as in the preemption
tests), a 1-CPU task stays pending while no worker exists and runs on the replacement once it is up; a second kill
targets the replacement, a third finds no live worker, and a third worker node is left for the teardown.
"""

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from flora_ray.testing.multinode import live_processes, require_namespaces, run_on_two_nodes
from flora_ray.testing.preemption import FAST_FAILURE_DETECTION

pytestmark = pytest.mark.slow

DRIVER = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path

    import ray

    from flora_ray.testing.multinode import ControlError, control

    head_dir, storage_dir = Path(sys.argv[1]), Path(sys.argv[2])
    ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
    alive = [node for node in ray.nodes() if node["Alive"]]
    driver_node = ray.get_runtime_context().get_node_id()


    @ray.remote(num_cpus=1)
    def on_worker(head_dir, storage_dir):
        node_id = ray.get_runtime_context().get_node_id()
        (storage_dir / "from_worker.txt").write_text(node_id)
        (head_dir / "from_worker.txt").write_text(node_id)  # lands on the worker's own (hidden) copy
        return {
            "node_id": node_id,
            "sees_marker": (head_dir / "marker").exists(),
            "head_listing": sorted(os.listdir(head_dir)),
        }


    def start_time(pid):  # (pid, start time) names a process; None: gone or a zombie
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return None if fields[0] == "Z" else int(fields[19])


    @ray.remote(num_cpus=1)
    def where():  # this node's id and processes: all of them, and only they, are in this mount namespace
        own = os.readlink("/proc/self/ns/mnt")
        processes = []
        for pid in (int(name) for name in os.listdir("/proc") if name.isdigit()):
            try:
                started = start_time(pid) if os.readlink(f"/proc/{pid}/ns/mnt") == own else None
            except OSError:
                started = None
            if started is not None:
                processes.append([pid, started])
        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "mount_ns": own,
            "processes": processes,
        }


    def survivors(processes):
        return [pid for pid, started in processes if start_time(pid) == started]


    def alive_now(node_id):
        return {node["NodeID"]: node["Alive"] for node in ray.nodes()}.get(node_id)


    def control_error(action):
        try:
            control(action, timeout_s=10)
        except ControlError as exc:
            return str(exc)
        return None


    task = ray.get(on_worker.remote(head_dir, storage_dir), timeout=60)
    report = {
        "alive_nodes": len(alive),
        "driver_node": driver_node,
        "head_node": os.environ["FLORA_MULTINODE_HEAD_NODE_ID"],
        "worker_node": os.environ["FLORA_MULTINODE_WORKER_NODE_ID"],
        "task": task,
        "storage_readback": (storage_dir / "from_worker.txt").read_text(),
        "head_sees_worker_file": (head_dir / "from_worker.txt").exists(),
        "auth_mode": os.environ.get("RAY_AUTH_MODE"),
    }
    ok = (
        len(alive) == 2
        and not task["sees_marker"]
        and report["storage_readback"] == task["node_id"]
        and task["node_id"] != driver_node
        and not report["head_sees_worker_file"]
    )

    # The spot reclaim and the return of capacity.
    report["first"] = ray.get(where.remote(), timeout=60)
    started = time.monotonic()
    report["kill"] = control("kill-worker")
    report["survivors_of_kill"] = survivors(report["first"]["processes"])
    while alive_now(report["first"]["node_id"]) is not False and time.monotonic() - started < 30:
        time.sleep(0.25)
    report["first_alive_after_kill"] = alive_now(report["first"]["node_id"])
    report["dead_after_s"] = round(time.monotonic() - started, 1)
    pending = where.remote()
    report["ran_without_worker"] = bool(ray.wait([pending], timeout=3)[0])
    report["bad_action_error"] = control_error("reboot-worker")
    report["add"] = control("add-worker")
    report["second"] = ray.get(pending, timeout=60)
    report["kill_again"] = control("kill-worker")  # the newest live worker: the replacement
    report["survivors_of_kill_again"] = survivors(report["second"]["processes"])
    report["kill_none_error"] = control_error("kill-worker")
    report["add_again"] = control("add-worker")
    report["third"] = ray.get(where.remote(), timeout=60)
    print("REPORT " + json.dumps(report), flush=True)
    sys.exit(0 if ok else 1)
    """
)


def _last_report(result, seconds: float) -> tuple[dict, str]:
    """The driver's last ``REPORT {json}`` line, and the run's output for assertion messages."""
    output = f"exit {result.returncode} after {seconds:.0f} s\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    reports = [line[len("REPORT ") :] for line in result.stdout.splitlines() if line.startswith("REPORT ")]
    assert reports, output
    return json.loads(reports[-1]), output


@pytest.fixture(scope="module")
def namespaces():
    require_namespaces("the two-node harness test")


@pytest.fixture(scope="module")
def harness_run(namespaces, tmp_path_factory):
    """The driver's run on one cluster: its report, output for messages, exit code and what the checks need."""
    tmp_path = tmp_path_factory.mktemp("harness")
    head_dir = tmp_path / "tmp" / "head"
    storage = tmp_path / "tmp" / "storage"
    head_dir.mkdir(parents=True)
    storage.mkdir()
    (head_dir / "marker").write_text("head only")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    # Short: Ray's unix socket paths live below it.
    temp_root = Path(tempfile.mkdtemp(prefix="frt-", dir="/tmp"))
    port = random.randint(20000, 39999)
    try:
        started = time.monotonic()
        result = run_on_two_nodes(
            [sys.executable, str(driver), str(head_dir), str(storage)],
            hide=[head_dir],
            env=FAST_FAILURE_DETECTION,
            timeout_s=150,
            worker_cpus=2,
            port=port,
            temp_root=temp_root,
        )
        seconds = time.monotonic() - started
        report, output = _last_report(result, seconds)
        yield {"report": report, "output": output, "returncode": result.returncode, "seconds": seconds,
               "head_dir": head_dir, "storage": storage, "temp_root": temp_root, "port": port}  # fmt: skip
    finally:
        shutil.rmtree(temp_root, ignore_errors=True)


def _check_torn_down(run: dict) -> None:
    """Nothing of the cluster is left (the live third worker node included)."""
    temp_root, output = run["temp_root"], run["output"]
    assert live_processes(str(temp_root)) == [], output
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True, check=True).stdout
    assert not [line for line in ps.splitlines() if str(temp_root) in line], ps
    assert list(temp_root.iterdir()) == [], "the harness left its temp dir after a success"


@pytest.mark.timeout(240)
def test_two_node_cluster_hides_the_heads_files_and_shares_storage(harness_run):
    report, output, storage, head_dir = (harness_run[k] for k in ("report", "output", "storage", "head_dir"))
    task = report["task"]
    assert report["alive_nodes"] == 2, output
    assert report["auth_mode"] == "token", output
    assert report["driver_node"] == report["head_node"], output
    assert task["node_id"] == report["worker_node"] != report["head_node"], output
    assert not task["sees_marker"] and "marker" not in task["head_listing"], output
    assert report["storage_readback"] == task["node_id"], output
    assert (storage / "from_worker.txt").read_text() == task["node_id"]
    assert not report["head_sees_worker_file"] and not (head_dir / "from_worker.txt").exists(), output
    assert harness_run["returncode"] == 0, output

    # Torn down: nothing of the cluster is left, and Ray's "current cluster" file does not name it.
    _check_torn_down(harness_run)
    current = Path("/tmp/ray/ray_current_cluster")
    assert not current.exists() or f":{harness_run['port']}" not in current.read_text(), current.read_text()


def _survivors(processes: list[list[int]]) -> list[int]:
    """The pids of ``processes`` (``[pid, start time]`` pairs) still alive (and not zombies)."""
    alive = []
    for pid, started in processes:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[19]) == started:
            alive.append(pid)
    return alive


@pytest.mark.timeout(240)
def test_the_driver_kills_the_worker_node_and_adds_a_replacement(harness_run):
    report, output = harness_run["report"], harness_run["output"]
    first, second, third = report["first"], report["second"], report["third"]
    assert harness_run["returncode"] == 0, output
    # The reclaim: every process of the first worker node got SIGKILL, and the GCS marked the node dead.
    assert first["node_id"] == report["worker_node"] != report["head_node"], output
    assert report["kill"]["node_id"] == first["node_id"] and report["kill"]["name"] == "w", output
    assert first["pid"] in report["kill"]["killed_pids"], output
    assert {pid for pid, _ in first["processes"]} <= set(report["kill"]["killed_pids"]), output
    assert report["survivors_of_kill"] == [], output
    assert report["first_alive_after_kill"] is False, output
    # No worker, no CPU: the task waited for the replacement and ran there.
    assert not report["ran_without_worker"], output
    assert report["add"]["name"] == "w2" and second["node_id"] == report["add"]["node_id"], output
    assert len({report["head_node"], first["node_id"], second["node_id"], third["node_id"]}) == 4, output
    # (The kernel may give a killed node's mount namespace number to the next one made.)
    assert os.readlink("/proc/self/ns/mnt") not in {first["mount_ns"], second["mount_ns"], third["mount_ns"]}
    assert len(third["processes"]) >= 3, output  # ray start, raylet, this worker, ...
    # A kill targets the newest live worker; with none left it is an error, as is an unknown action.
    assert report["kill_again"]["node_id"] == second["node_id"] and report["kill_again"]["name"] == "w2", output
    assert report["survivors_of_kill_again"] == [], output
    assert "no live worker node" in (report["kill_none_error"] or ""), output
    assert "unknown action" in (report["bad_action_error"] or ""), output
    assert report["add_again"]["name"] == "w3" and third["node_id"] == report["add_again"]["node_id"], output

    # Torn down (the live third worker node included): nothing of the cluster is left.
    _check_torn_down(harness_run)
    assert _survivors(first["processes"] + second["processes"] + third["processes"]) == [], output
    print(f"harness run: {harness_run['seconds']:.1f} s, node marked dead {report['dead_after_s']} s after the kill")

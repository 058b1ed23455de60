"""The two-node harness (``flora_ray.testing.multinode``): a head without CPUs and a worker that does not see the
head's directories, in a network namespace of their own.

The driver connects with ``ray.init(address="auto")`` (``RAY_ADDRESS`` and the token come from the harness), checks
that two nodes are alive and runs a 1-CPU task, which can only land on the worker node. The task reports whether it
sees the marker file of the hidden ``tmp/head`` (it must not), writes into the shared ``tmp/storage`` (the driver
reads it back) and into ``tmp/head`` (the head must not see that), and its node id (not the head's). After the
harness exits no process of the cluster may be left and ``/tmp/ray/ray_current_cluster`` must not name it.
"""

import json
import random
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from flora_ray.testing.multinode import can_make_namespaces, live_processes, run_on_two_nodes

pytestmark = pytest.mark.slow

DRIVER = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path

    import ray

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
    print("REPORT " + json.dumps(report), flush=True)
    ok = (
        len(alive) == 2
        and not task["sees_marker"]
        and report["storage_readback"] == task["node_id"]
        and task["node_id"] != driver_node
        and not report["head_sees_worker_file"]
    )
    sys.exit(0 if ok else 1)
    """
)


@pytest.fixture(scope="module")
def namespaces():
    if not can_make_namespaces():
        pytest.skip("cannot make network and mount namespaces here (unshare needs root or user namespaces)")


@pytest.mark.timeout(150)
def test_two_node_cluster_hides_the_heads_files_and_shares_storage(namespaces, tmp_path):
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
            timeout_s=110,
            worker_cpus=2,
            port=port,
            temp_root=temp_root,
        )
        seconds = time.monotonic() - started
        output = (
            f"exit {result.returncode} after {seconds:.0f} s\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
        )
        reports = [line[len("REPORT ") :] for line in result.stdout.splitlines() if line.startswith("REPORT ")]
        assert reports, output
        report = json.loads(reports[-1])
        task = report["task"]
        assert report["alive_nodes"] == 2, output
        assert report["auth_mode"] == "token", output
        assert report["driver_node"] == report["head_node"], output
        assert task["node_id"] == report["worker_node"] != report["head_node"], output
        assert not task["sees_marker"] and "marker" not in task["head_listing"], output
        assert report["storage_readback"] == task["node_id"], output
        assert (storage / "from_worker.txt").read_text() == task["node_id"]
        assert not report["head_sees_worker_file"] and not (head_dir / "from_worker.txt").exists(), output
        assert result.returncode == 0, output

        # Torn down: nothing of the cluster is left, and Ray's "current cluster" file does not name it.
        assert live_processes(str(temp_root)) == [], output
        ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True, check=True).stdout
        assert not [line for line in ps.splitlines() if str(temp_root) in line], ps
        current = Path("/tmp/ray/ray_current_cluster")
        assert not current.exists() or f":{port}" not in current.read_text(), current.read_text()
        assert list(temp_root.iterdir()) == [], "the harness left its temp dir after a success"
    finally:
        shutil.rmtree(temp_root, ignore_errors=True)

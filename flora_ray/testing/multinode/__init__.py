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

The package: ``launch`` (the pytest side), ``protocol`` (constants, errors, ``control``), ``nodes`` (finding and
killing a node's processes), ``cluster`` (``TwoNodeCluster``), ``__main__`` (the command line).

For pytest: ``can_make_namespaces()`` (skip where ``unshare`` is not permitted) and ``run_on_two_nodes(...)``, which
builds the ``unshare`` command line and returns a ``subprocess.CompletedProcess``; for COMMAND: ``control(...)``.
"""

from __future__ import annotations

from flora_ray.testing.multinode.launch import (
    can_make_namespaces,
    harness_command,
    require_namespaces,
    run_on_two_nodes,
)
from flora_ray.testing.multinode.nodes import live_processes
from flora_ray.testing.multinode.protocol import (
    ADD_WORKER,
    CONTROL_DIR,
    ENV_DIR,
    ENV_HEAD_NODE,
    ENV_WORKER_NODE,
    HARNESS_ERROR_EXIT,
    HOST,
    KILL_WORKER,
    PREFIX,
    TIMEOUT_EXIT,
    ControlError,
    HarnessError,
    control,
)

__all__ = [
    "ADD_WORKER",
    "CONTROL_DIR",
    "ENV_DIR",
    "ENV_HEAD_NODE",
    "ENV_WORKER_NODE",
    "HARNESS_ERROR_EXIT",
    "HOST",
    "KILL_WORKER",
    "PREFIX",
    "TIMEOUT_EXIT",
    "ControlError",
    "HarnessError",
    "can_make_namespaces",
    "control",
    "harness_command",
    "live_processes",
    "require_namespaces",
    "run_on_two_nodes",
]

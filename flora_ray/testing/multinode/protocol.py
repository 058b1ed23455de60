"""The harness's constants, its error, and the control protocol a driver uses to kill and add worker nodes
(``control``: request and reply files under ``$FLORA_MULTINODE_DIR/control/``)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import sys
import time
from collections.abc import Mapping
from pathlib import Path

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

CONTROL_POLL_S = 0.2

_CONTROL_REPLY_MARGIN_S = 30.0  # the harness's own bookkeeping on top of an action's timeout (a failed start's stop)

# Removed from the environment of the nodes and of COMMAND: a loopback-only setting (it makes `ray start` refuse a
# second node here), an outer cluster's address, a token source that would take precedence over ours.
SCRUBBED = ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")


class HarnessError(RuntimeError):
    """The two-node cluster could not be set up; the message says why (with the node logs' tail)."""


def log(message: str) -> None:
    print(f"{PREFIX} {message}", file=sys.stderr, flush=True)


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
    write_json_atomically(request, {"action": action, "timeout_s": timeout_s})
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


def write_json_atomically(path: Path, data: Mapping) -> None:
    """Write ``data`` to a dot-file beside ``path``, then rename it to ``path`` (readers never see half a file)."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(data))
    os.replace(partial, path)

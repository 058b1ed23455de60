"""Worker nodes as processes: finding every process of a node (its session, its mount namespace, its Ray temp
directory) and killing them all, as a spot reclaim does."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from flora_ray.testing.multinode.protocol import HarnessError
from flora_ray.testing.processes import live_processes as processes_matching


@dataclasses.dataclass
class WorkerNode:
    """One worker node: ``ray start --block`` in a session and a mount namespace of its own."""

    name: str  # its Ray temp directory's name under the run's root: "w", "w2", ...
    log: str
    process: subprocess.Popen
    node_id: str = ""  # once the GCS reported it alive
    # An open descriptor of its mount namespace once it is up (None if unknown): it keeps the namespace's inode number
    # from being freed (the kernel hands a freed one to the next namespace made) until the node is killed.
    mount_ns_fd: int | None = None
    killed: bool = False


def open_mount_namespace(pid: int) -> int | None:
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


def kill_node(node: WorkerNode, temp_dir: Path) -> list[int]:
    """SIGKILL every process of ``node`` (see ``_node_processes``) until none is left; the pids killed."""
    node.killed = True
    # Its `ray start` has not been reaped unless it exited on its own: its pid still names its group and session.
    leader = node.process.pid if node.process.returncode is None else None
    if node.mount_ns_fd is None and leader is not None:
        node.mount_ns_fd = open_mount_namespace(leader)
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

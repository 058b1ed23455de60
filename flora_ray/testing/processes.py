"""Processes the test harnesses start and stop: Ray nodes, S3 servers, drivers run in a session of their own.

Every helper here is Linux-specific where it says so (``/proc``, ``PR_SET_PDEATHSIG``), as the harnesses are.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path


def die_with_parent() -> None:
    """``preexec_fn``: SIGTERM this child when the thread that started it dies (Linux ``PR_SET_PDEATHSIG``), so a
    killed test run or benchmark leaves no Ray head holding its port and no S3 server behind (``ray start --block``
    stops its processes on SIGTERM; a SIGKILL would orphan the raylet's agents)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def ray_executable() -> str:
    """The ``ray`` command of this Python's environment (beside the interpreter), else the one on PATH."""
    beside = Path(sys.executable).parent / "ray"
    found = str(beside) if beside.is_file() else shutil.which("ray")
    if not found:
        raise FileNotFoundError("the `ray` command is not installed next to this Python or on PATH")
    return found


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == 0


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    """Signal a whole process group; nothing if it is gone (a group id still in use is never reused)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def stop_group(process: subprocess.Popen, grace_s: float, *, leader_first: bool = True) -> None:
    """Stop the process group that ``process`` leads (started with ``start_new_session``): SIGTERM to the leader
    alone (``leader_first``) or to the whole group, wait ``grace_s``, then SIGKILL the group.

    ``ray start --block`` stops its GCS, raylet and monitor in order on a SIGTERM to the leader, which takes a few
    seconds; a SIGTERM to its whole group also hits Ray's reaper and the GCS at once, and the leader's shutdown then
    hangs until the SIGKILL. A driver's group (a command that may have children) gets the SIGTERM as a whole.
    """
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            if leader_first:
                os.kill(process.pid, signal.SIGTERM)
            else:
                os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace_s)
    kill_group(process.pid)  # the leader if it hung, and children that outlived it
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


def live_processes(sid: int | None = None, marker: str | None = None) -> list[int]:
    """Live (non-zombie) processes other than this one, in session ``sid`` or whose command line contains
    ``marker``, from ``/proc``.

    The kernel does not reuse a pid still in use as a session id, so a session started with ``start_new_session``
    holds only that process's descendants.
    """
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp session ...
        if fields[0] == "Z":
            continue
        if (sid is not None and int(fields[3]) == sid) or (marker and marker in cmdline):
            pids.append(int(entry.name))
    return pids

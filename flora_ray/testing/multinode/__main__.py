"""``python -m flora_ray.testing.multinode [options] -- COMMAND ...``: the harness's command line (inside
``unshare --net --fork``): check the namespace, start the cluster, run COMMAND, tear down."""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from flora_ray.testing.multinode.cluster import TwoNodeCluster
from flora_ray.testing.multinode.protocol import HARNESS_ERROR_EXIT, HarnessError, log

_MAX_ROOT_CHARS = 48  # Ray's unix socket paths (AF_UNIX: 107 bytes) are ROOT/h/session_<40 chars>/sockets/...


class _Interrupted(BaseException):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


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
        log(
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
            log(f"start attempt {attempt} failed, retrying: {exc}")
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
        log(f"cluster up in {time.monotonic() - started:.1f} s: nodes {cluster.node_ids}")
        left = None if args.timeout is None else max(args.timeout - (time.monotonic() - started), 1.0)
        code = cluster.run(args.command, left)
        failed = code != 0
        return code
    except HarnessError as exc:
        log(f"error: {exc}")
        return HARNESS_ERROR_EXIT
    except _Interrupted as exc:
        log(f"got {exc}: tearing the cluster down")
        return 128 + exc.signum
    finally:
        for signum in handled:  # finish the teardown; every wait in it is bounded
            signal.signal(signum, signal.SIG_IGN)
        if cluster is not None:
            cluster.stop()
        if root is not None:
            if cluster is not None and (failed or args.keep_temp):
                log(f"node logs kept in {root}")
            else:
                shutil.rmtree(root, ignore_errors=True)
        log(f"done in {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    sys.exit(main())

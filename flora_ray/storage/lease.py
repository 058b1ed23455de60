"""One writer per run: a lease object (``lease.json``) in the run's storage.

A job that writes a run (``flora-ray run``, a stage command, ``flora_ray.run``) first creates the lease if it is
absent; it renews it from a background thread every ``ttl_s / 4`` seconds while it runs and deletes it at the end
(also on failure and Ctrl-C), after recording how the job ended in ``job.json``. A second job on the same run finds
the lease and refuses in one line naming the holder (``InputError``).

The lease holds the holder's host, pid, job id (``FLORA_RAY_JOB_ID`` or ``SLURM_JOB_ID`` when set), a random nonce,
when it was acquired and last renewed, and its ``ttl_s``. It is **stale**, and the next job takes it over, when it
was not renewed for ``ttl_s`` seconds (the holder was killed, or its node was lost), or at once when its holder ran on
this host and its pid no longer exists. Comparing ``renewed_at`` with this machine's clock assumes clocks agree to
well within ``ttl_s`` (NTP).

Create-if-absent, per storage:

* **Local paths** (and shared mounts): the lease is written to a temporary file and hard-linked to ``lease.json``;
  ``link`` fails if the name exists, so exactly one job creates it. Takeovers of a stale lease are serialised by a
  lock file created with ``O_EXCL`` (removed when older than ``TAKEOVER_LOCK_STALE_S``: its taker died); the taker
  checks the nonce again under the lock and replaces the file atomically (``rename``), so the lease never
  disappears. Renewal verifies the nonce, then replaces the file; a takeover between the two (only possible once
  the holder has not renewed for ``ttl_s``) is overwritten, and the job that took over finds its nonce gone at its
  next renewal and stops before its next stage.
* **S3** (with ``boto3`` installed, as with the ``dev`` extra): a conditional put, ``If-None-Match: *``; renewal and
  takeover are puts with ``If-Match: <ETag>`` of the version read, so of two jobs taking over one stale lease only
  one succeeds. ``pyarrow``'s ``S3FileSystem`` has no conditional writes.
* **Other object stores** (GCS, or S3 without ``boto3``): write, wait ``SETTLE_S`` and read back the nonce. Two jobs
  that start within that window of each other can both believe they hold the lease; the one whose write landed
  first finds the other's nonce at its next renewal and stops before its next stage.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flora_ray.errors import InputError
from flora_ray.storage.run_store import ARTEFACTS, RunStore

logger = logging.getLogger(__name__)

LEASE_TTL_S = 120.0
"""A lease not renewed for this long is stale (the holder renews every quarter of it)."""
SETTLE_S = 1.0
"""Object stores without conditional writes: how long a job waits before reading back the lease it wrote."""
TAKEOVER_LOCK_STALE_S = 30.0
"""Local paths: a takeover lock older than this was left by a job that died while taking over; it is removed."""
JOB_ID_VARIABLES = ("FLORA_RAY_JOB_ID", "SLURM_JOB_ID")
"""Environment variables whose value is recorded as the holder's job id (the first one set)."""

_HELD: dict[str, RunLease] = {}  # leases this process holds, by run URI (re-entrant: nested holders share one)
_HELD_LOCK = threading.Lock()


def now_iso(seconds: float | None = None) -> str:
    """A UTC time as ISO 8601 (``seconds``: Unix time; default now)."""
    moment = time.time() if seconds is None else seconds
    return datetime.fromtimestamp(moment, timezone.utc).isoformat(timespec="seconds")


def unix_time(iso: str) -> float:
    """The Unix time of an ISO 8601 string written by ``now_iso``."""
    return datetime.fromisoformat(iso).timestamp()


def holder_record(ttl_s: float) -> dict[str, Any]:
    """A new lease's content: this process as the holder."""
    job = next((os.environ[v] for v in JOB_ID_VARIABLES if os.environ.get(v)), None)
    stamp = now_iso()
    return {"host": socket.gethostname(), "pid": os.getpid(), "job": job, "nonce": uuid.uuid4().hex,
            "acquired_at": stamp, "renewed_at": stamp, "ttl_s": ttl_s}  # fmt: skip


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def staleness(lease: dict[str, Any], now: float | None = None) -> str | None:
    """Why ``lease`` is stale (a phrase), or ``None`` while its holder is alive by the rule of this module."""
    now = time.time() if now is None else now
    age = now - unix_time(lease["renewed_at"])
    if age > float(lease.get("ttl_s", LEASE_TTL_S)):
        return f"not renewed for {age:.0f} s (ttl {float(lease.get('ttl_s', LEASE_TTL_S)):.0f} s)"
    if lease.get("host") == socket.gethostname() and not pid_alive(int(lease["pid"])):
        return f"its process {lease['pid']} on this host no longer exists"
    return None


def describe_holder(lease: dict[str, Any], now: float | None = None) -> str:
    """``host H pid P (job J) since T, renewed N s ago``."""
    now = time.time() if now is None else now
    job = f" (job {lease['job']})" if lease.get("job") else ""
    age = now - unix_time(lease["renewed_at"])
    return f"host {lease['host']} pid {lease['pid']}{job} since {lease['acquired_at']}, renewed {age:.0f} s ago"


class LocalLeaseFile:
    """Create-if-absent and conditional replace of a file on a local (or mounted) filesystem; the token is the
    nonce."""

    def __init__(self, store: RunStore) -> None:
        self.path = str(store.local_path(ARTEFACTS.lease))

    def _staged(self, data: bytes) -> str:
        folder, name = os.path.split(self.path)
        tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:8]}.tmp")
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        return tmp

    def read(self) -> tuple[dict[str, Any], str] | None:
        try:
            with open(self.path, "rb") as handle:
                lease = json.loads(handle.read())
        except FileNotFoundError:
            return None
        return lease, lease["nonce"]

    def create(self, lease: dict[str, Any]) -> str | None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = self._staged(json.dumps(lease).encode())
        try:
            os.link(tmp, self.path)  # fails if the name exists: exactly one creator
        except FileExistsError:
            return None
        finally:
            os.unlink(tmp)
        return lease["nonce"]

    def take_over(self, lease: dict[str, Any], token: str) -> str | None:
        """Replace the stale lease whose nonce is ``token``; ``None`` when another job is taking it or took it.

        Takeovers are serialised by a lock file (created with ``O_EXCL``); the lease is replaced atomically, so it
        never disappears and no create slips in between."""
        folder, name = os.path.split(self.path)
        lock = os.path.join(folder, f".{name}.takeover")
        try:
            os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):
                if time.time() - os.stat(lock).st_mtime > TAKEOVER_LOCK_STALE_S:  # its taker died mid-takeover
                    os.unlink(lock)
            return None
        try:
            current = self.read()
            if current is None:
                return self.create(lease)
            if current[1] != token:
                return None
            os.replace(self._staged(json.dumps(lease).encode()), self.path)
            return lease["nonce"]
        finally:
            os.unlink(lock)

    def renew(self, lease: dict[str, Any], token: str) -> str | None:
        current = self.read()
        if current is None or current[1] != token:
            return None
        tmp = self._staged(json.dumps(lease).encode())
        os.replace(tmp, self.path)
        return lease["nonce"]

    def delete(self, token: str) -> None:
        current = self.read()
        if current is not None and current[1] == token:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


class S3LeaseObject:
    """Create-if-absent (``If-None-Match: *``) and compare-and-swap (``If-Match``) of an S3 object with boto3,
    configured from the same AWS variables as ``flora_ray.storage.filesystems``; the token is the ETag."""

    def __init__(self, store: RunStore) -> None:
        import boto3
        from botocore.config import Config

        from flora_ray.storage import filesystems

        self.bucket, _, key = store.location(ARTEFACTS.lease).partition("/")
        self.key = key
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")  # None: boto3 looks it up
        config = Config(connect_timeout=filesystems.S3_CONNECT_TIMEOUT_S, read_timeout=filesystems.S3_REQUEST_TIMEOUT_S,
                        retries={"max_attempts": filesystems.S3_MAX_ATTEMPTS, "mode": "standard"})  # fmt: skip
        self.client = boto3.client("s3", endpoint_url=filesystems.s3_endpoint(), region_name=region, config=config)

    def _put(self, lease: dict[str, Any], **condition: str) -> str | None:
        from botocore.exceptions import ClientError

        try:
            answer = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=json.dumps(lease).encode(),
                                            ContentType="application/json", **condition)  # fmt: skip
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey") or status in (409, 412):
                return None
            raise
        return answer["ETag"]

    def read(self) -> tuple[dict[str, Any], str] | None:
        from botocore.exceptions import ClientError

        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        return json.loads(answer["Body"].read()), answer["ETag"]

    def create(self, lease: dict[str, Any]) -> str | None:
        return self._put(lease, IfNoneMatch="*")

    def take_over(self, lease: dict[str, Any], token: str) -> str | None:
        return self._put(lease, IfMatch=token)

    def renew(self, lease: dict[str, Any], token: str) -> str | None:
        return self._put(lease, IfMatch=token)

    def delete(self, token: str) -> None:
        current = self.read()
        if current is not None and current[1] == token:
            self.client.delete_object(Bucket=self.bucket, Key=self.key)


class StoreLeaseObject:
    """Any ``pyarrow`` filesystem without conditional writes: write, wait ``SETTLE_S``, read back the nonce (see the
    module's note on the window this leaves)."""

    def __init__(self, store: RunStore) -> None:
        self.store = store

    def read(self) -> tuple[dict[str, Any], str] | None:
        if not self.store.is_file(ARTEFACTS.lease):
            return None
        lease = self.store.read_json(ARTEFACTS.lease, "lease")
        return lease, lease["nonce"]

    def _write_and_check(self, lease: dict[str, Any]) -> str | None:
        self.store.write_json(ARTEFACTS.lease, lease)
        time.sleep(SETTLE_S)
        current = self.read()
        return lease["nonce"] if current is not None and current[1] == lease["nonce"] else None

    def create(self, lease: dict[str, Any]) -> str | None:
        return None if self.read() is not None else self._write_and_check(lease)

    def take_over(self, lease: dict[str, Any], token: str) -> str | None:
        current = self.read()
        return self._write_and_check(lease) if current is None or current[1] == token else None

    def renew(self, lease: dict[str, Any], token: str) -> str | None:
        current = self.read()
        if current is None or current[1] != token:
            return None
        self.store.write_json(ARTEFACTS.lease, lease)
        return lease["nonce"]

    def delete(self, token: str) -> None:
        current = self.read()
        if current is not None and current[1] == token:
            self.store.filesystem.delete_file(self.store.location(ARTEFACTS.lease))


def lease_object(store: RunStore) -> LocalLeaseFile | S3LeaseObject | StoreLeaseObject:
    """The create-if-absent primitive for the store's filesystem."""
    if store.is_local:
        return LocalLeaseFile(store)
    if store.filesystem.type_name == "s3":
        try:
            return S3LeaseObject(store)
        except ImportError:
            logger.warning("boto3 is not installed: the lease on %s uses write-then-read-back", store.uri)
    return StoreLeaseObject(store)


def read_lease(store: RunStore) -> dict[str, Any] | None:
    """The run's lease as stored, or ``None`` when no job holds it."""
    if not store.is_file(ARTEFACTS.lease):
        return None
    try:
        return store.read_json(ARTEFACTS.lease, "lease")
    except FileNotFoundError:  # released between the two calls
        return None


class RunLease:
    """This process's lease on one run: ``acquire``, renewal in a daemon thread, ``release``.

    Args:
        store: The run.
        ttl_s: Seconds without renewal after which the lease is stale (renewed every quarter of it).
    """

    def __init__(self, store: RunStore, ttl_s: float = LEASE_TTL_S) -> None:
        self.store, self.ttl_s = store, ttl_s
        self.io = lease_object(store)
        self.lease: dict[str, Any] | None = None
        self.token: str | None = None
        self.lost = threading.Event()
        self.record = True  # write job.json at release (False: the job was refused before it started any work)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.made_dirs = missing_dirs(store)  # the run's local folders the lease creates: gone again after a refusal

    def acquire(self) -> None:
        """Create the lease, or take over a stale one; ``InputError`` naming the holder when it is held."""
        lease = holder_record(self.ttl_s)
        for attempt in range(5):  # the lease may be released or taken between our read and our write: look again
            time.sleep(0.2 * attempt)
            token = self.io.create(lease)
            if token is None:
                current = self.io.read()
                if current is None:
                    continue
                why = staleness(current[0])
                if why is None:
                    raise InputError(
                        f"run {self.store.uri!r} is being written by {describe_holder(current[0])}: wait for that "
                        f"job to end or stop it (a lease not renewed for {current[0].get('ttl_s', LEASE_TTL_S):.0f} s "
                        "is taken over), or choose another run.name"
                    )
                logger.warning("run %s: taking over the lease of %s (%s)", self.store.uri, current[0]["host"], why)
                token = self.io.take_over(lease, current[1])
            if token is not None:
                self.lease, self.token = lease, token
                return
        raise InputError(f"run {self.store.uri!r}: another job is taking its lease right now; try again")

    def renew(self) -> bool:
        """Renew the lease; ``False`` (and ``lost`` set) when another job holds it now."""
        assert self.lease is not None and self.token is not None
        lease = {**self.lease, "renewed_at": now_iso()}
        token = self.io.renew(lease, self.token)
        if token is None:
            self.lost.set()
            return False
        self.lease, self.token = lease, token
        return True

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                if not self.renew():
                    logger.error("run %s: lease lost to another job; this job stops before its next stage",
                                 self.store.uri)  # fmt: skip
                    return
            except Exception as exc:  # storage briefly unreachable: try again at the next interval
                logger.warning("run %s: could not renew the lease (%s)", self.store.uri, exc)

    def start_renewing(self) -> None:
        self._thread = threading.Thread(target=self._renew_loop, name="flora-ray-lease", daemon=True)
        self._thread.start()

    def release(self, error: BaseException | None = None) -> None:
        """Stop renewing, record how the job ended (``job.json``) and delete the lease."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.lease is None or self.lost.is_set():
            return
        if not self.record:
            with contextlib.suppress(Exception):
                self.io.delete(self.token)
            for folder in self.made_dirs:  # deepest first; only while empty (nothing else was written)
                with contextlib.suppress(OSError):
                    folder.rmdir()
            return
        outcome = "ok" if error is None else "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
        record = {**{k: v for k, v in self.lease.items() if k != "nonce"}, "ended_at": now_iso(), "outcome": outcome,
                  "error": None if error is None else f"{type(error).__name__}: {first_line(error)}"}  # fmt: skip
        try:
            self.store.write_json(ARTEFACTS.job, record)
            self.io.delete(self.token)
        except Exception as exc:  # the lease then goes stale and is taken over after ttl_s
            logger.warning("run %s: could not release the lease (%s)", self.store.uri, exc)


def missing_dirs(store: RunStore) -> list[Path]:
    """The run directory of a local store and its ancestors that do not exist yet, deepest first."""
    if not store.is_local:
        return []
    missing, folder = [], Path(store.root)
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return " ".join(text.splitlines()[0].split())[:300] if text else ""


@contextlib.contextmanager
def hold_lease(store: RunStore, ttl_s: float = LEASE_TTL_S) -> Iterator[RunLease]:
    """Hold the run's lease for the block (re-entrant within a process: an inner holder shares the outer one)."""
    with _HELD_LOCK:
        held = _HELD.get(store.uri)
    if held is not None:
        yield held
        return
    lease = RunLease(store, ttl_s)
    lease.acquire()
    with _HELD_LOCK:
        _HELD[store.uri] = lease
    lease.start_renewing()
    error: BaseException | None = None
    try:
        yield lease
    except BaseException as exc:
        error = exc
        raise
    finally:
        with _HELD_LOCK:
            _HELD.pop(store.uri, None)
        lease.release(error)


def holds_lease(store: RunStore) -> bool:
    """Whether this process holds the run's lease already (``hold_lease`` then shares it)."""
    with _HELD_LOCK:
        return store.uri in _HELD


def check_lease(store: RunStore) -> None:
    """Raise when this process held the run's lease and another job has taken it over."""
    with _HELD_LOCK:
        held = _HELD.get(store.uri)
    if held is not None and held.lost.is_set():
        raise RuntimeError(f"run {store.uri!r}: another job took over this job's lease; stopped before the next stage")

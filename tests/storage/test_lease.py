"""The run lease (``flora_ray.storage.lease``) on a local directory and on the moto S3 server: one holder, refusal in
one line naming it, renewal, release with the job's outcome, takeover of a stale lease, and races between jobs."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from flora_ray.errors import InputError
from flora_ray.storage.lease import RunLease, S3LeaseObject, check_lease, hold_lease, read_lease
from flora_ray.storage.run_store import ARTEFACTS, RunStore

LONG_AGO = "2020-01-01T00:00:00+00:00"


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path, monkeypatch):
    """A run store on a local directory or on a fresh bucket of the moto server."""
    if request.param == "local":
        return RunStore(tmp_path / "run")
    server = request.getfixturevalue("s3")
    server.patch_env(monkeypatch)
    bucket = f"lease-{os.getpid()}-{time.monotonic_ns()}"
    return RunStore(f"{server.make_bucket(bucket)}/prefix/run")


def stale_lease(**changes):
    """A lease written by a job on another host that stopped renewing it long ago."""
    return {"host": "elsewhere", "pid": 1, "job": "1234", "nonce": "old", "acquired_at": LONG_AGO,
            "renewed_at": LONG_AGO, "ttl_s": 120.0, **changes}  # fmt: skip


def test_a_second_holder_is_refused_in_one_line_naming_the_first(store):
    with hold_lease(store) as held:
        lease = read_lease(store)
        assert lease["nonce"] == held.lease["nonce"]
        assert (lease["host"], lease["pid"]) == (socket.gethostname(), os.getpid())
        with pytest.raises(InputError) as refused:
            RunLease(store).acquire()
        message = str(refused.value)
        assert "\n" not in message and store.uri in message
        assert f"host {socket.gethostname()} pid {os.getpid()}" in message and "another run.name" in message
        assert read_lease(store)["nonce"] == held.lease["nonce"]  # the refused job changed nothing
    assert read_lease(store) is None
    job = store.read_json(ARTEFACTS.job)
    assert job["outcome"] == "ok" and job["pid"] == os.getpid() and job["error"] is None


def test_the_create_is_conditional_on_the_server(store):
    """The object store itself refuses the second create (``If-None-Match: *``), not only our read before it."""
    if store.is_local:
        pytest.skip("the local create is a hard link (covered by the race test)")
    obj = S3LeaseObject(store)
    assert obj.create(stale_lease(nonce="first")) is not None
    assert obj.create(stale_lease(nonce="second")) is None
    assert read_lease(store)["nonce"] == "first"


def test_the_lease_is_renewed_while_held_and_never_goes_stale(store):
    with hold_lease(store, ttl_s=3) as held:
        first = held.lease["renewed_at"]
        time.sleep(7)  # over twice the ttl: renewed every 0.75 s, so still fresh
        with pytest.raises(InputError):
            RunLease(store).acquire()
        assert read_lease(store)["renewed_at"] > first


def test_failure_and_interruption_release_the_lease_and_record_the_outcome(store):
    with pytest.raises(ZeroDivisionError), hold_lease(store):
        1 / 0  # noqa: B018
    assert read_lease(store) is None
    job = store.read_json(ARTEFACTS.job)
    assert job["outcome"] == "failed" and job["error"] == "ZeroDivisionError: division by zero"
    with pytest.raises(KeyboardInterrupt), hold_lease(store):
        raise KeyboardInterrupt
    assert read_lease(store) is None and store.read_json(ARTEFACTS.job)["outcome"] == "interrupted"


def test_a_stale_lease_is_taken_over_and_its_old_holder_finds_it_lost(store):
    store.write_json(ARTEFACTS.lease, stale_lease())
    with hold_lease(store) as held:
        assert read_lease(store)["nonce"] == held.lease["nonce"] != "old"
    # The old holder comes back (it was only paused): its renewal fails, and its next stage is refused.
    old = RunLease(store)
    old.acquire()
    store.write_json(ARTEFACTS.lease, {**read_lease(store), "renewed_at": LONG_AGO, "host": "elsewhere"})
    with hold_lease(store) as new:
        assert old.renew() is False and old.lost.is_set()
        assert read_lease(store)["nonce"] == new.lease["nonce"]


def test_a_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(store):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
    store.write_json(ARTEFACTS.lease, stale_lease(host=socket.gethostname(), pid=dead.pid, renewed_at=stamp))
    with hold_lease(store) as held:
        assert read_lease(store)["pid"] == os.getpid() == held.lease["pid"]


@pytest.mark.parametrize("start", ["empty", "stale"])
def test_of_jobs_racing_for_one_lease_exactly_one_wins(store, start):
    if start == "stale":
        store.write_json(ARTEFACTS.lease, stale_lease())
    leases = [RunLease(store) for _ in range(6)]
    outcomes: list[str] = []
    barrier = threading.Barrier(len(leases))

    def race(lease):
        barrier.wait()
        try:
            lease.acquire()
            outcomes.append("won")
        except InputError:
            outcomes.append("refused")

    threads = [threading.Thread(target=race, args=(lease,)) for lease in leases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["refused"] * 5 + ["won"], outcomes
    winner = next(lease for lease in leases if lease.lease is not None)
    assert read_lease(store)["nonce"] == winner.lease["nonce"]
    winner.release()
    assert read_lease(store) is None


def test_a_lost_lease_stops_the_job_before_its_next_stage(tmp_path):
    store = RunStore(tmp_path / "run")
    with hold_lease(store, ttl_s=0.4) as held:
        check_lease(store)  # held: nothing to say
        store.write_json(
            ARTEFACTS.lease, stale_lease(renewed_at=time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()))
        )
        assert held.lost.wait(5)
        with pytest.raises(RuntimeError, match="took over this job's lease"):
            check_lease(store)
    assert json.loads((tmp_path / "run" / ARTEFACTS.lease).read_text())["nonce"] == "old"  # not deleted by the loser

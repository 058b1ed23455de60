"""notify.webhook: one JSON POST per event (a stage done, the run finished, a stage failed) to a loopback server;
a webhook that cannot be reached never stops the run; a secret URL comes from the environment."""

import dataclasses
import http.server
import json
import shutil
import socket
import threading

import pytest

from flora_ray.backends.local import LocalBackend
from flora_ray.config import NotifyConfig, dump_config
from flora_ray.errors import InputError, MissingInput
from flora_ray.notify import check_notify
from flora_ray.pipeline import run_pipeline
from flora_ray.storage.run_store import ARTEFACTS


@pytest.fixture
def webhook():
    """A loopback HTTP server that records every POSTed JSON body; yields (URL, bodies)."""
    bodies: list[dict] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", bodies
    server.shutdown()


def _copy_without(in_process_run, tmp_path, webhook_url, *remove):
    """The shared in-process run, copied, its report stage not done yet (and ``remove`` deleted), notifying."""
    cfg, _, _ = in_process_run
    run_dir = tmp_path / "runs" / cfg.run.name
    shutil.copytree(cfg.run.run_dir, run_dir)
    for name in (ARTEFACTS.stage_marker("report"), *remove):
        (run_dir / name).unlink()
    run = dataclasses.replace(cfg.run, output_dir=str(tmp_path / "runs"))
    return dataclasses.replace(cfg, run=run, notify=NotifyConfig(webhook=webhook_url))


def test_one_post_per_stage_and_one_when_the_run_finishes(in_process_run, tmp_path, webhook):
    url, bodies = webhook
    cfg = _copy_without(in_process_run, tmp_path, url)
    markers = run_pipeline(cfg, LocalBackend())
    assert [b["event"] for b in bodies] == ["stage", "finished"]
    stage, finished = bodies
    assert stage["stage"] == "report" and stage["text"].startswith(f"flora-ray {cfg.run.name}: stage report done in")
    search = markers["search"]["summary"]
    assert finished["front_size"] == search["front_size"] and finished["trials"] == search["complete"]
    assert f"front of {search['front_size']} from {search['complete']} trials" in finished["text"]
    assert finished["location"].endswith(f"/runs/{cfg.run.name}")


def test_a_failed_stage_is_posted_and_still_raised(in_process_run, tmp_path, webhook):
    url, bodies = webhook
    cfg = _copy_without(in_process_run, tmp_path, url, ARTEFACTS.search_summary)
    with pytest.raises(MissingInput):
        run_pipeline(cfg, LocalBackend())
    assert len(bodies) == 1 and bodies[0]["event"] == "failed" and bodies[0]["stage"] == "report"
    assert bodies[0]["error"] == "MissingInput" and "stage report failed: MissingInput:" in bodies[0]["text"]


def test_an_unreachable_webhook_never_stops_the_run(in_process_run, tmp_path, caplog):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    cfg = _copy_without(in_process_run, tmp_path, f"http://127.0.0.1:{closed}/hook")
    run_pipeline(cfg, LocalBackend())
    assert (cfg.run.run_dir / ARTEFACTS.stage_marker("report")).is_file()
    assert "could not be delivered" in caplog.text


def test_a_secret_url_comes_from_the_environment(in_process_run, tmp_path, webhook, monkeypatch):
    url, bodies = webhook
    cfg = _copy_without(in_process_run, tmp_path, "$FLORA_TEST_WEBHOOK")
    monkeypatch.delenv("FLORA_TEST_WEBHOOK", raising=False)
    with pytest.raises(InputError, match="FLORA_TEST_WEBHOOK, which is not set"):
        check_notify(cfg)
    monkeypatch.setenv("FLORA_TEST_WEBHOOK", url)
    check_notify(cfg)
    run_pipeline(cfg, LocalBackend())
    assert [b["event"] for b in bodies] == ["stage", "finished"]
    recorded = dump_config(cfg)  # what a new run records (run_config.yaml, Parquet provenance): the name, not the URL
    assert "$FLORA_TEST_WEBHOOK" in recorded and url not in recorded

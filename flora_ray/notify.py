"""Notifications: a JSON POST to ``notify.webhook`` when a stage finishes, the run finishes, or a stage fails.

The body is Slack-compatible (``text``, one line a person reads) and carries the event's fields for programs:
``event`` (``stage``, ``finished``, ``failed``, ``interrupted``), ``run``, ``location``, ``stage``, ``seconds``,
``error`` (a failure's exception type), and for a finished run the front's size and the trials. A notification that
cannot be delivered is logged as a warning: it never stops or fails the run.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.request
from typing import Any

from flora_ray.config import Config
from flora_ray.errors import InputError

logger = logging.getLogger(__name__)


def webhook_url(cfg: Config) -> str | None:
    """The URL notifications go to: ``notify.webhook``, or the environment variable it names (``$NAME``)."""
    value = cfg.notify.webhook
    if value is None or not value.startswith("$"):
        return value
    return os.environ.get(value[1:]) or None


def check_notify(cfg: Config) -> None:
    """Preflight: a webhook named by an environment variable needs that variable here."""
    value = cfg.notify.webhook
    if value is not None and value.startswith("$") and webhook_url(cfg) is None:
        raise InputError(f"notify.webhook={value!r} names the environment variable {value[1:]}, which is not set: "
                         "export it (the webhook's URL) or unset notify.webhook")  # fmt: skip


def send(cfg: Config, event: str, text: str, **fields: Any) -> bool:
    """POST one notification; ``True`` when the webhook answered 2xx, ``False`` when none is set or it failed."""
    url = webhook_url(cfg)
    if url is None:
        return False
    from flora_ray.storage.run_store import RunStore

    body = {"text": f"flora-ray {cfg.run.name}: {text}", "event": event, "run": cfg.run.name,
            "location": RunStore.for_config(cfg).uri, **fields}  # fmt: skip
    request = urllib.request.Request(url, data=json.dumps(body, default=str).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=cfg.notify.timeout_s) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError, ValueError) as exc:
        logger.warning("notify: the %s notification could not be delivered (%s)", event, exc)
        return False


def stage_done(cfg: Config, stage: str, seconds: float) -> None:
    if cfg.notify.stages:
        send(cfg, "stage", f"stage {stage} done in {seconds:.0f} s", stage=stage, seconds=round(seconds, 1))


def stage_failed(cfg: Config, stage: str, error: BaseException) -> None:
    interrupted = isinstance(error, KeyboardInterrupt)
    event = "interrupted" if interrupted else "failed"
    what = "interrupted" if interrupted else f"failed: {type(error).__name__}: {' '.join(str(error).split())[:300]}"
    send(cfg, event, f"stage {stage} {what}", stage=stage, error=None if interrupted else type(error).__name__)


def run_finished(cfg: Config, markers: dict[str, dict[str, Any]], seconds: float) -> None:
    """The run's end, with its search's front size and trials (when it searched)."""
    from flora_ray.records import SearchSummary

    summary = (markers.get("search") or {}).get("summary")
    search = SearchSummary.from_dict(summary, source="the search stage's summary") if summary else None
    front_size, trials = (search.front_size, search.complete) if search else (None, None)
    front = f"; front of {front_size} from {trials} trials" if front_size is not None else ""
    send(cfg, "finished", f"finished in {seconds:.0f} s{front}", seconds=round(seconds, 1), front_size=front_size,
         trials=trials)  # fmt: skip

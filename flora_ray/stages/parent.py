"""Child runs: search again on a trained supernet (``run.parent``).

A child run names a finished parent run (a local path or a storage URI). Its configuration may differ from the
parent's only in what comes after the supernet (``search``, ``finetune``, ``profile``, ``tracking``, ...): every
result-changing key of the stages it takes over (``UPSTREAM``: the teacher, the filter and the supernet, and the
seed) must equal the parent's, or the child is refused, in one line, before anything is written. The child then
copies the parent's teacher, rank space, filter scores, supernet and their stage markers (and the latency table
when the profile settings match), so its own pipeline skips those stages and runs only profile (if needed), search,
export, fine-tune and report. The parent is only read.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import yaml

from flora_ray.config import Config, changed_result_keys, config_to_dict, describe_change
from flora_ray.errors import InputError, MissingInput
from flora_ray.records import StageMarker
from flora_ray.storage.run_store import ARTEFACTS, RunStore

logger = logging.getLogger(__name__)

UPSTREAM = ("model", "data", "pretrain", "filter", "train", "run.seed")
"""The configuration a child run shares with its parent: what the teacher, the filter and the supernet were made
with (sections, or dotted keys)."""
TAKEN_OVER = {
    "pretrain": [ARTEFACTS.teacher, ARTEFACTS.history("pretrain")],
    "filter": [ARTEFACTS.space, ARTEFACTS.filter_scores],
    "train": [ARTEFACTS.supernet, ARTEFACTS.history("train")],
}
"""The stages a child takes over from its parent, and their artefacts (a missing history file is skipped)."""
PROFILE = {"profile": [ARTEFACTS.latency_table]}


def parent_config(parent: RunStore) -> dict[str, Any]:
    """The parent run's recorded configuration; ``InputError`` when ``parent`` is not a run."""
    if not parent.is_file(ARTEFACTS.run_config):
        raise MissingInput(f"run.parent {parent.uri!r} is not a flora-ray run (no {ARTEFACTS.run_config}): give the "
                           "directory or URI of a run whose supernet is trained")  # fmt: skip
    return yaml.safe_load(parent.read_text(ARTEFACTS.run_config)) or {}


def upstream_changes(parent: dict[str, Any], child: dict[str, Any]) -> list[str]:
    """The result-changing keys of ``UPSTREAM`` on which the child's configuration differs from the parent's."""
    changed = changed_result_keys(parent, child)
    return [k for k in changed if any(k == u or k.startswith(f"{u}.") for u in UPSTREAM)]


def check_parent(cfg: Config) -> RunStore | None:
    """Before any work: the parent exists, has trained its supernet, and was made with the child's upstream
    configuration. Returns the parent's store (``None`` without ``run.parent``)."""
    if cfg.run.parent is None:
        return None
    parent = RunStore(cfg.run.parent)
    stored, child = parent_config(parent), config_to_dict(cfg)
    changed = upstream_changes(stored, child)
    if changed:
        shown = "; ".join(describe_change(stored, child, k) for k in changed[:3])
        raise InputError(
            f"run.parent {parent.uri!r} was made with a different configuration for the stages a child takes over "
            f"({shown}): a child may change only what comes after the supernet (search, finetune, profile); "
            "start a new run to change these"
        )
    missing = [stage for stage in TAKEN_OVER if not parent.is_file(ARTEFACTS.stage_marker(stage))]
    if missing:
        raise InputError(f"run.parent {parent.uri!r} has not finished {', '.join(missing)}: finish it first "
                         "(`flora-ray run` on the parent)")  # fmt: skip
    return parent


def adopt_parent(cfg: Config, store: RunStore, parent: RunStore | None) -> list[str]:
    """Copy the parent's teacher, space, filter scores, supernet and their stage markers into the child's run (and
    the latency table, when the profile settings match); returns the stages taken over. Idempotent. ``parent``:
    what ``check_parent`` returned."""
    if parent is None:
        return []
    stages = dict(TAKEN_OVER)
    changed = changed_result_keys(parent_config(parent), config_to_dict(cfg))
    same_profile = not any(k.startswith("profile.") for k in changed)
    if same_profile and parent.is_file(ARTEFACTS.stage_marker("profile")):  # the same device: its latency table too
        stages.update(PROFILE)
    adopted = []
    for stage, names in stages.items():
        if store.is_file(ARTEFACTS.stage_marker(stage)):
            continue
        for name in names:
            if parent.is_file(name):
                store.write_bytes(name, parent.read_bytes(name))
        marker = StageMarker.read(parent, stage=stage)
        # last: the stage counts as done once its files are
        replace(marker, summary={**marker.summary, "from_parent": parent.uri}).write(store)
        adopted.append(stage)
    if adopted:
        logger.info("child run: took over %s from %s", ", ".join(adopted), parent.uri)
    return adopted

"""Optuna's NSGA-II sampler in a form that pickles whatever the installed Optuna keeps in it.

Ray Tune pickles the search algorithm, and with it the sampler, when a ``Tuner`` is built (``tuner.pkl``) and at
every searcher checkpoint (``Searcher.save``). Optuna 5.1 added a ``threading.Lock`` to its genetic samplers
(``BaseGASampler._thread_lock``), which no pickler can write, so a plain ``NSGAIISampler`` fails every Ray search.
As Optuna's own storages do, this sampler leaves its locks and thread-locals out of its pickled state and makes new,
unheld ones when it is unpickled: a lock guards one process's threads and means nothing in another process.
"""

from __future__ import annotations

import threading
from typing import Any

import optuna

# Kinds of attribute that cannot be pickled and carry no state worth keeping: recreated empty on unpickling.
FRESH_ON_UNPICKLE: dict[str, tuple[type, Any]] = {
    "lock": (type(threading.Lock()), threading.Lock),
    "rlock": (type(threading.RLock()), threading.RLock),
    "local": (threading.local, threading.local),
}
FRESH_KEY = "__flora_ray_fresh__"  # in the pickled state: attribute name -> kind to recreate


def fresh_kind(value: Any) -> str | None:
    """The ``FRESH_ON_UNPICKLE`` kind of ``value``, or ``None`` when it pickles as it is."""
    return next((kind for kind, (cls, _) in FRESH_ON_UNPICKLE.items() if isinstance(value, cls)), None)


class NSGAIISampler(optuna.samplers.NSGAIISampler):
    """``optuna.samplers.NSGAIISampler`` that pickles: locks and thread-locals are recreated, not copied."""

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        fresh = {name: kind for name, value in state.items() if (kind := fresh_kind(value)) is not None}
        for name in fresh:
            del state[name]
        state[FRESH_KEY] = fresh
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        fresh = state.pop(FRESH_KEY, {})
        self.__dict__.update(state)
        for name, kind in fresh.items():
            setattr(self, name, FRESH_ON_UNPICKLE[kind][1]())

"""Figures of a search: the front against the trials and the uniform baseline, hypervolume by trial."""

from __future__ import annotations

import pandas as pd

from flora_ray.results import COST_UNITS, hypervolume

AXIS_LABELS = {"macs": "GMACs per image", "params": "M parameters", "latency_ms": "predicted latency (ms)"}


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def front_figure(trials: pd.DataFrame, front: pd.DataFrame, uniform: pd.DataFrame, cost: str = "macs"):
    """Accuracy versus the cost axis: every trial, the front, the uniform baseline and the full-rank model."""
    scale = COST_UNITS[cost][1]
    fig, ax = pyplot().subplots(figsize=(6.4, 4.4))
    ax.scatter(trials[cost] / scale, trials["accuracy"], s=10, color="0.75", label="trials")
    ax.step(front[cost] / scale, front["accuracy"], where="post", color="C0", marker="o", label="Pareto front")
    ordered = uniform.sort_values(cost)
    ax.plot(ordered[cost] / scale, ordered["accuracy"], color="C1", marker="s", linestyle="--", label="uniform ranks")
    full = ordered.iloc[-1]
    ax.scatter([full[cost] / scale], [full["accuracy"]], color="C3", marker="*", s=120, zorder=5, label="full rank")
    ax.set_xlabel(AXIS_LABELS[cost])
    ax.set_ylabel("search-split accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return fig


def hypervolume_figure(trials: pd.DataFrame, ref: tuple[float, float], cost: str = "macs"):
    """Hypervolume of the trials so far, by trial number, as a share of the box from zero cost and accuracy to
    ``ref`` (cost) and 100%."""
    done = trials[trials["state"] == "COMPLETE"].sort_values("trial")
    values = [hypervolume(done.iloc[: i + 1], ref, cost) / (ref[0] * 100.0) for i in range(len(done))]
    fig, ax = pyplot().subplots(figsize=(6.4, 3.6))
    ax.plot(done["trial"], values, color="C0")
    ax.set_xlabel("trial")
    ax.set_ylabel("hypervolume (share of the box)")
    ax.grid(alpha=0.3)
    return fig


def save_png(fig, path) -> None:
    """Write a figure as PNG to a local path, atomically, and close it."""
    from flora_ray.storage.files import atomic_path

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    pyplot().close(fig)

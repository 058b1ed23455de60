"""The interactive front: one self-contained HTML page (plotly, its JavaScript embedded: no network at view time).

Every completed trial, the Pareto front, the uniform baseline and the dense model, accuracy against the searched
cost axis; hovering a point shows its trial (or rank ratio), per-block ranks, MACs, parameters, predicted latency
and accuracy. ``report.md`` links it.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pandas as pd

from flora_ray.results import COST_UNITS
from flora_ray.search.plots import AXIS_LABELS

HOVER = "%{customdata}<extra></extra>"


def _ranks_text(row: Any) -> str:
    """Per-block ranks: ``b0 32/16/8, b1 ...`` from the row's ``triples`` (the block's ranks in space order)."""
    try:
        blocks = json.loads(row["triples"])
    except (KeyError, TypeError, ValueError):
        return "ranks: -"
    parts = [f"b{i} {'/'.join(str(r) for r in block)}" for i, block in enumerate(blocks)]
    lines = [", ".join(parts[i : i + 6]) for i in range(0, len(parts), 6)]
    return "ranks per block: " + "<br>  ".join(lines)


def _costs_text(row: Any) -> str:
    macs = f"{row['macs'] / 1e6:.3f} MMACs" if row.get("macs") == row.get("macs") else "MACs -"
    params = f"{row['params'] / 1e6:.4f} M params" if row.get("params") == row.get("params") else "params -"
    latency = row.get("latency_ms")
    lat = f"{latency:.3f} ms predicted" if isinstance(latency, float) and math.isfinite(latency) else "latency -"
    return f"{macs}, {params}, {lat}"


def hover_texts(frame: pd.DataFrame, label: str) -> list[str]:
    """One hover text per row: ``label`` (trial N, or the uniform ratio), the ranks, the costs, the accuracy."""
    texts = []
    for _, row in frame.iterrows():
        name = f"uniform ratio {row['ratio']:g}" if label == "ratio" else f"trial {int(row['trial'])}"
        texts.append(f"<b>{name}</b><br>{_ranks_text(row)}<br>{_costs_text(row)}<br>accuracy {row['accuracy']:.2f}%")
    return texts


def axis_scale(cost: str, largest: float) -> tuple[float, str]:
    """Divisor and label of the cost axis: MACs in millions below a billion, else as ``COST_UNITS``."""
    if cost == "macs" and largest < 1e9:
        return 1e6, "MMACs per image"
    return COST_UNITS[cost][1], AXIS_LABELS[cost]


def front_html(
    trials: pd.DataFrame, front: pd.DataFrame, uniform: pd.DataFrame, dense: dict[str, float], cost: str = "macs"
) -> str:
    """The page: trials (grey), the front (a step line), the uniform ranks (dashed) and dense (a star)."""
    import plotly.graph_objects as go

    scale, label = axis_scale(cost, float(uniform[cost].max()))
    complete = trials[trials["state"] == "COMPLETE"]
    ordered = uniform.sort_values(cost)
    fig = go.Figure()
    layers = [
        ("trials", complete, "trial", {"mode": "markers", "marker": {"color": "#b0b0b0", "size": 6}}),
        ("Pareto front", front, "trial", {"mode": "lines+markers", "line": {"shape": "hv", "color": "#1f77b4"},
                                          "marker": {"size": 9}}),
        ("uniform ranks", ordered, "ratio", {"mode": "lines+markers", "line": {"dash": "dash", "color": "#ff7f0e"},
                                             "marker": {"symbol": "square", "size": 8}}),
    ]  # fmt: skip
    for name, frame, label, style in layers:
        fig.add_trace(go.Scatter(x=frame[cost] / scale, y=frame["accuracy"], name=name,
                                 customdata=hover_texts(frame, label), hovertemplate=HOVER, **style))  # fmt: skip
    dense_text = f"<b>dense model</b><br>{_costs_text(dense)}<br>accuracy {dense['accuracy']:.2f}%"
    fig.add_trace(go.Scatter(x=[dense[cost] / scale], y=[dense["accuracy"]], name="dense", mode="markers",
                             marker={"symbol": "star", "size": 16, "color": "#d62728"}, customdata=[dense_text],
                             hovertemplate=HOVER))  # fmt: skip
    fig.update_layout(
        title=f"Accuracy against {label}: {len(complete)} trials, front of {len(front)}",
        xaxis_title=label,
        yaxis_title="search-split accuracy (%)",
        template="plotly_white",
        hovermode="closest",
        legend={"x": 0.99, "y": 0.01, "xanchor": "right", "yanchor": "bottom"},
    )
    return fig.to_html(include_plotlyjs=True, full_html=True, div_id="front", config={"displaylogo": False})


def compare_html(frame: pd.DataFrame, cost: str = "macs") -> str:
    """Several runs on one page (``flora_ray.compare``'s frame): per run, in one colour, its front (a step line),
    its uniform ranks (dashed) and its dense model (a star); hovering names the run and the point."""
    import plotly.graph_objects as go
    from plotly.colors import qualitative

    scale, label = axis_scale(cost, float(frame[cost].max()))
    fig = go.Figure()
    for index, (run, points) in enumerate(frame.groupby("run", sort=False)):
        color = qualitative.Plotly[index % len(qualitative.Plotly)]
        front = points[points["kind"] == "front"].sort_values(cost)
        uniform = points[points["kind"] == "uniform"].sort_values(cost)
        layers = [
            (f"{run}: front", front, "trial", {"mode": "lines+markers", "line": {"shape": "hv", "color": color},
                                               "marker": {"size": 9}}),
            (f"{run}: uniform", uniform, "ratio", {"mode": "lines+markers", "line": {"dash": "dash", "color": color},
                                                   "marker": {"symbol": "square", "size": 7}, "opacity": 0.7}),
        ]  # fmt: skip
        for name, part, kind, style in layers:
            texts = [f"<b>{run}</b><br>{text}" for text in hover_texts(part, kind)]
            fig.add_trace(go.Scatter(x=part[cost] / scale, y=part["accuracy"], name=name, legendgroup=str(run),
                                     customdata=texts, hovertemplate=HOVER, **style))  # fmt: skip
        for _, dense in points[points["kind"] == "dense"].iterrows():
            text = f"<b>{run}</b><br><b>dense model</b><br>{_costs_text(dense)}<br>accuracy {dense['accuracy']:.2f}%"
            fig.add_trace(go.Scatter(x=[dense[cost] / scale], y=[dense["accuracy"]], name=f"{run}: dense",
                                     legendgroup=str(run), mode="markers", customdata=[text], hovertemplate=HOVER,
                                     marker={"symbol": "star", "size": 15, "color": color}))  # fmt: skip
    runs = frame["run"].nunique()
    fig.update_layout(title=f"Accuracy against {label}: {runs} runs", xaxis_title=label,
                      yaxis_title="search-split accuracy (%)", template="plotly_white", hovermode="closest",
                      legend={"x": 0.99, "y": 0.01, "xanchor": "right", "yanchor": "bottom"})  # fmt: skip
    return fig.to_html(include_plotlyjs=True, full_html=True, div_id="compare", config={"displaylogo": False})

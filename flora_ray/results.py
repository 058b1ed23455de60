"""Pareto fronts of cost versus accuracy for pandas users.

Objectives throughout: a cost column (``cost``: ``macs`` by default, or ``params`` / ``latency_ms``) is minimised,
``accuracy`` is maximised. Frames have at least those two columns (the search writes ``trials.parquet``,
``pareto.parquet`` and ``uniform.parquet`` with all three cost columns).
"""

from __future__ import annotations

import base64
import math
import os

import numpy as np
import pandas as pd

from flora_ray.errors import MissingInput
from flora_ray.storage.run_store import ARTEFACTS, RunStore

LATENCY_DEVICE_KEY = "flora_ray.latency_device"  # the latency table's metadata: where it was measured
GAIN_DROPS = (0.5, 1.0, 2.0, 3.0)  # accuracy points below dense at which the front's extra reduction is reported
GAIN_BUDGETS = (0.25, 1 / 3, 0.5)  # shares of the dense cost at which the front's accuracy advantage is reported
COST_UNITS = {"macs": ("GMACs", 1e9), "params": ("M params", 1e6), "latency_ms": ("ms", 1.0)}


def format_cost(axis: str, value: float) -> str:
    """A cost with its unit: ``2.41 MMACs``, ``8.04 GMACs``, ``5.30 M params``, ``1.23 ms``."""
    if axis == "macs":
        return f"{value / 1e9:.2f} GMACs" if value >= 1e9 else f"{value / 1e6:.2f} MMACs"
    if axis == "params":
        return f"{value / 1e6:.3f} M params"
    return f"{value:.3f} ms"


NOISE_SE = 2.0  # a difference is "within noise" when it is smaller than this many standard errors


def binomial_se(accuracy: float, n: int) -> float:
    """Standard error (accuracy points) of an accuracy (%) measured on ``n`` images: ``100 sqrt(p (1 - p) / n)``."""
    if n < 1:
        raise ValueError(f"n={n} must be at least 1 (images evaluated)")
    p = min(max(float(accuracy) / 100.0, 0.0), 1.0)
    return 100.0 * math.sqrt(p * (1.0 - p) / n)


def pack_correct(correct: np.ndarray) -> str:
    """Per-image correctness (booleans in image order) as a compact string: bits packed 8 per byte, base64."""
    bits = np.packbits(np.asarray(correct, dtype=bool))
    return base64.b64encode(bits.tobytes()).decode("ascii")


def unpack_correct(packed: str, n: int) -> np.ndarray:
    """The ``n`` booleans ``pack_correct`` packed."""
    bits = np.unpackbits(np.frombuffer(base64.b64decode(packed), dtype=np.uint8))
    if len(bits) < n:
        raise ValueError(f"packed correctness holds {len(bits)} images, not {n}")
    return bits[:n].astype(bool)


def paired_difference(correct_a: np.ndarray, correct_b: np.ndarray) -> tuple[float, float]:
    """Accuracy of ``a`` minus accuracy of ``b`` on the same images, and its standard error (both in points).

    Paired (McNemar): with ``b_`` images only ``a`` gets right and ``c_`` only ``b`` gets right out of ``n``,
    the difference is ``(b_ - c_) / n`` and its standard error ``sqrt(b_ + c_ - (b_ - c_)^2 / n) / n``: images
    both get right or both get wrong add no noise, so two similar subnets are told apart with far fewer images
    than two independent measurements (``sqrt(2)`` binomial standard errors) would need.
    """
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"per-image correctness of shapes {a.shape} and {b.shape}: need the same images, at least one")
    n = len(a)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    variance = max(only_a + only_b - (only_a - only_b) ** 2 / n, 0.0)
    return 100.0 * (only_a - only_b) / n, 100.0 * math.sqrt(variance) / n


def within_noise(difference: float, se: float, k: float = NOISE_SE) -> bool:
    """``|difference| < k * se`` (an exact zero is within noise even when ``se`` is 0)."""
    return difference == 0 or abs(difference) < k * se


def row_se(row: pd.Series) -> float | None:
    """A result row's accuracy standard error: its ``accuracy_se``, else the binomial one from ``eval_images``;
    ``None`` for rows of runs that recorded neither."""
    se = row.get("accuracy_se")
    if se is not None and not pd.isna(se):
        return float(se)
    images = row.get("eval_images")
    return None if images is None or pd.isna(images) else binomial_se(float(row["accuracy"]), int(images))


def compare_paired(a: pd.Series, b: pd.Series) -> dict[str, float | bool] | None:
    """Accuracy of row ``a`` minus row ``b`` on the same search images (``paired_difference`` of their
    ``correct`` columns): ``difference``, ``se`` and ``within_noise``; ``None`` when either row lacks per-image
    results (runs before they were recorded) or they were scored on different numbers of images."""
    packed_a, packed_b = a.get("correct"), b.get("correct")
    n_a, n_b = a.get("eval_images"), b.get("eval_images")
    if not (isinstance(packed_a, str) and isinstance(packed_b, str)) or pd.isna(n_a) or pd.isna(n_b) or n_a != n_b:
        return None
    difference, se = paired_difference(unpack_correct(packed_a, int(n_a)), unpack_correct(packed_b, int(n_b)))
    return {"difference": difference, "se": se, "within_noise": within_noise(difference, se)}


def _check_columns(df: pd.DataFrame, cost: str = "macs") -> None:
    missing = {cost, "accuracy"} - set(df.columns)
    if missing:
        raise ValueError(f"frame has no column {sorted(missing)[0]!r}; a front needs {cost!r} and 'accuracy'")


def cost_axis(df: pd.DataFrame) -> str:
    """The cost axis a run searched, from a results frame read by ``load_*`` (``macs`` when it does not say)."""
    return str(df.attrs.get("cost_axis", "macs"))


def pareto_mask(df: pd.DataFrame, cost: str = "macs") -> np.ndarray:
    """Boolean mask of the non-dominated rows (no other row has cost <= and accuracy >=, one of them strictly).

    Duplicated points are all non-dominated. Rows with a missing value are never on the front.
    """
    _check_columns(df, cost)
    macs = df[cost].to_numpy(dtype=float)
    acc = df["accuracy"].to_numpy(dtype=float)
    valid = ~(np.isnan(macs) | np.isnan(acc))
    mask = np.zeros(len(df), dtype=bool)
    order = np.lexsort((-acc, macs))  # by macs ascending, then accuracy descending
    best = -np.inf
    last_point: tuple[float, float] | None = None
    for i in order:
        if not valid[i]:
            continue
        point = (macs[i], acc[i])
        if acc[i] > best or point == last_point:
            mask[i] = True
            best = max(best, acc[i])
            last_point = point
    return mask


def hypervolume(df: pd.DataFrame, ref: tuple[float, float], cost: str = "macs") -> float:
    """Area dominated by the frame's points inside the box bounded by ``ref = (cost_ref, accuracy_ref)``.

    Points with ``cost >= cost_ref`` or ``accuracy <= accuracy_ref`` add nothing. Units: cost times accuracy points.
    """
    _check_columns(df, cost)
    macs_ref, acc_ref = ref
    front = df[pareto_mask(df, cost)]
    front = front[(front[cost] < macs_ref) & (front["accuracy"] > acc_ref)]
    points = sorted(zip(front["accuracy"].astype(float), front[cost].astype(float), strict=True))
    area, previous = 0.0, acc_ref
    for accuracy, macs in points:  # ascending accuracy, so descending macs along the front
        area += (macs_ref - macs) * (accuracy - previous)
        previous = accuracy
    return area


def ranked_under(df: pd.DataFrame, *, max_cost: float, cost: str = "macs") -> pd.DataFrame:
    """The rows with ``cost <= max_cost``, most accurate first (the cheaper first on ties; then in frame order)."""
    _check_columns(df, cost)
    return df[df[cost] <= max_cost].sort_values(["accuracy", cost], ascending=[False, True], kind="stable")


def best_under(df: pd.DataFrame, max_macs: float, cost: str = "macs") -> pd.Series | None:
    """The most accurate row with ``cost <= max_macs`` (the cheaper one on ties); ``None`` if there is none."""
    within = ranked_under(df, max_cost=max_macs, cost=cost)
    return None if within.empty else within.iloc[0]


def cheapest_within(df: pd.DataFrame, min_accuracy: float, cost: str = "macs") -> pd.Series | None:
    """The cheapest row (by ``cost``) with ``accuracy >= min_accuracy``; ``None`` if there is none."""
    _check_columns(df, cost)
    within = df[df["accuracy"] >= min_accuracy]
    if within.empty:
        return None
    return within.sort_values([cost, "accuracy"], ascending=[True, False]).iloc[0]


def knee_point(front: pd.DataFrame, cost: str = "macs") -> pd.Series:
    """The front's knee: the point farthest from the straight line joining its cheapest and its most accurate point.

    Both objectives are scaled to [0, 1] over the front first, so the choice does not depend on units. With one
    or two points (no bend to find), the most accurate point is returned.
    """
    _check_columns(front, cost)
    points = front[pareto_mask(front, cost)].sort_values([cost, "accuracy"], ascending=[True, False])
    if points.empty:
        raise ValueError("the front is empty: no knee point")
    macs = points[cost].to_numpy(dtype=float)
    acc = points["accuracy"].to_numpy(dtype=float)
    if len(points) < 3 or macs[-1] == macs[0] or acc[-1] == acc[0]:
        return points.iloc[int(np.argmax(acc))]
    x = (macs - macs[0]) / (macs[-1] - macs[0])
    y = (acc - acc[0]) / (acc[-1] - acc[0])
    # The chord runs from (0, 0) to (1, 1); front points lie above it (accuracy rises faster than cost).
    distance = (y - x) / np.sqrt(2.0)
    return points.iloc[int(np.argmax(distance))]


def gain_over_uniform(
    front: pd.DataFrame,
    uniform: pd.DataFrame,
    max_accuracy_drop: float,
    reference_accuracy: float | None = None,
    cost: str = "macs",
) -> float | None:
    """Extra cost reduction (MACs by default) of the front over the best uniform configuration at the same accuracy.

    Both sides must reach ``reference_accuracy - max_accuracy_drop`` (reference: the most accurate uniform
    configuration, i.e. full rank, unless given). Returns ``1 - macs_front / macs_uniform`` of the cheapest
    qualifying point of each (0.33 means 33% fewer MACs than uniform ranks, the paper's "33% extra"), or ``None``
    when neither the front nor the uniform set reaches the target.
    """
    if max_accuracy_drop < 0:
        raise ValueError(f"max_accuracy_drop={max_accuracy_drop} must be >= 0 (accuracy points)")
    _check_columns(uniform, cost)
    if uniform.empty:
        raise ValueError("uniform frame is empty")
    reference = float(uniform["accuracy"].max()) if reference_accuracy is None else float(reference_accuracy)
    target = reference - max_accuracy_drop
    ours, theirs = cheapest_within(front, target, cost), cheapest_within(uniform, target, cost)
    if ours is None or theirs is None:
        return None
    return 1.0 - float(ours[cost]) / float(theirs[cost])


def accuracy_advantage(front: pd.DataFrame, uniform: pd.DataFrame, max_cost: float, cost: str = "macs") -> float | None:
    """Accuracy points by which the front's best subnet within ``max_cost`` beats the best uniform configuration
    within it (negative: uniform is better); ``None`` when either has nothing that cheap."""
    ours, theirs = best_under(front, max_cost, cost), best_under(uniform, max_cost, cost)
    if ours is None or theirs is None:
        return None
    return float(ours["accuracy"]) - float(theirs["accuracy"])


def gain_table(
    front: pd.DataFrame,
    uniform: pd.DataFrame,
    reference_accuracy: float,
    dense_cost: float,
    cost: str = "macs",
    drops: tuple[float, ...] = GAIN_DROPS,
    budgets: tuple[float, ...] = GAIN_BUDGETS,
) -> pd.DataFrame:
    """The front against the best uniform configuration, one row per accuracy drop and per cost budget.

    ``kind == "drop"``: the cheapest point of each within ``value`` points of ``reference_accuracy`` (the dense
    model's) and ``gain``, the front's extra cost reduction ``1 - front / uniform`` (``gain_over_uniform``).
    ``kind == "budget"``: the most accurate point of each within ``value`` x ``dense_cost`` and ``gain``, the front's
    accuracy advantage in points (``accuracy_advantage``). ``gain`` is NaN where either side has no point.
    """
    rows = []
    for drop in drops:
        target = reference_accuracy - drop
        ours, theirs = cheapest_within(front, target, cost), cheapest_within(uniform, target, cost)
        gain = gain_over_uniform(front, uniform, drop, reference_accuracy, cost)
        rows.append(_gain_row("drop", drop, target, ours, theirs, gain, cost))
    for budget in budgets:
        limit = budget * dense_cost
        ours, theirs = best_under(front, limit, cost), best_under(uniform, limit, cost)
        rows.append(
            _gain_row("budget", budget, limit, ours, theirs, accuracy_advantage(front, uniform, limit, cost), cost)
        )
    return pd.DataFrame(rows)


def _gain_row(kind: str, value: float, target: float, ours, theirs, gain: float | None, cost: str) -> dict:
    def pick(row, column):
        return np.nan if row is None else float(row[column])

    return {
        "kind": kind,
        "value": float(value),
        "target": float(target),
        f"front_{cost}": pick(ours, cost),
        "front_accuracy": pick(ours, "accuracy"),
        "front_trial": pick(ours, "trial") if ours is not None and "trial" in ours else np.nan,
        f"uniform_{cost}": pick(theirs, cost),
        "uniform_accuracy": pick(theirs, "accuracy"),
        "uniform_ratio": pick(theirs, "ratio") if theirs is not None and "ratio" in theirs else np.nan,
        "gain": np.nan if gain is None else float(gain),
    }


def kendall_tau(x, y) -> float:
    """Kendall's tau-b between two equally long sequences (ties counted as in tau-b); NaN when either is constant.

    Pairs are compared exhaustively (``O(n^2)``): meant for the tens to hundreds of subnets a fidelity check uses.
    """
    a, b = _paired_arrays(x, y)
    i, j = np.triu_indices(len(a), k=1)
    da, db = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
    untied_a, untied_b = np.count_nonzero(da), np.count_nonzero(db)
    if untied_a == 0 or untied_b == 0:
        return float("nan")
    return float(np.sum(da * db) / np.sqrt(float(untied_a) * float(untied_b)))


def spearman_rho(x, y) -> float:
    """Spearman's rho: the Pearson correlation of the average ranks; NaN when either is constant."""
    a, b = _paired_arrays(x, y)
    ra, rb = pd.Series(a).rank().to_numpy(), pd.Series(b).rank().to_numpy()
    if np.ptp(ra) == 0 or np.ptp(rb) == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def bootstrap_interval(x, y, statistic, resamples: int = 2000, level: float = 0.95, seed: int = 0):
    """Percentile bootstrap interval of ``statistic(x, y)`` over pairs resampled with replacement.

    Returns ``(low, high)``; resamples on which the statistic is undefined (NaN: all values tied) are left out.
    """
    a, b = _paired_arrays(x, y)
    if not 0 < level < 1:
        raise ValueError(f"level={level} must be between 0 and 1")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(a), size=(resamples, len(a)))
    values = np.array([statistic(a[p], b[p]) for p in picks])
    values = values[~np.isnan(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    tail = 100 * (1 - level) / 2
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))


def _paired_arrays(x, y) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"need two 1-D sequences of equal length >= 2, got shapes {a.shape} and {b.shape}")
    return a, b


def _read(run: str | os.PathLike | RunStore, name: str) -> pd.DataFrame:
    import pyarrow.parquet as pq

    store = run if isinstance(run, RunStore) else RunStore(run)
    if not store.is_file(name):
        raise MissingInput(f"{store.location(name)!r} does not exist; run `flora-ray search` for this run first")
    frame = store.read_parquet(name)
    metadata = pq.read_schema(store.location(name), filesystem=store.filesystem).metadata or {}
    frame.attrs["cost_axis"] = metadata.get(b"flora_ray.cost_axis", b"macs").decode()
    return frame


def load_trials(run: str | os.PathLike | RunStore) -> pd.DataFrame:
    """Every search trial of a run (``trials.parquet``); ``run`` is the run directory or its ``RunStore``."""
    return _read(run, ARTEFACTS.trials)


def load_front(run: str | os.PathLike | RunStore) -> pd.DataFrame:
    """The Pareto front of a run (``pareto.parquet``), sorted by MACs."""
    return _read(run, ARTEFACTS.pareto)


def load_uniform(run: str | os.PathLike | RunStore) -> pd.DataFrame:
    """The uniform-rank baseline of a run (``uniform.parquet``)."""
    return _read(run, ARTEFACTS.uniform)


def load_latency_table(run: str | os.PathLike | RunStore) -> tuple[pd.DataFrame, dict]:
    """A run's latency table (``latency_table.parquet``, written by ``flora-ray profile``) and the device it was
    measured on; ``LatencyModel.from_table(table, space, cost, batch, device)`` predicts from it."""
    import json

    import pyarrow.parquet as pq

    store = run if isinstance(run, RunStore) else RunStore(run)
    name = ARTEFACTS.latency_table
    if not store.is_file(name):
        raise MissingInput(f"{store.location(name)!r} does not exist; run `flora-ray profile` for this run first")
    metadata = pq.read_schema(store.location(name), filesystem=store.filesystem).metadata or {}
    return store.read_parquet(name), json.loads(metadata.get(LATENCY_DEVICE_KEY.encode(), b"{}"))

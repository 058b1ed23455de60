"""One way to time a forward pass and to pin torch's thread count while doing it.

``torch_threads`` sets torch's intra-op thread count for a block and restores it after; ``time_ms`` is the blocked
median the latency table (``stages.profile``) and the latency benchmarks use; ``forward_ms`` is the plain median of
single calls the export's report uses. ``plan`` and the benchmarks time with these too.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch import nn

BLOCKS = 20  # timed blocks per measurement (each about min_run_time / BLOCKS seconds)
MIN_BLOCKS = 5  # single calls, at least, of something slower than min_run_time / BLOCKS


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Run the block with torch's intra-op thread count at ``threads`` (``None``: unchanged), then restore it.
    Yields the count in force."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


class Timing(NamedTuple):
    """A blocked measurement: the median block's time per call, the interquartile range and the block count."""

    median_ms: float
    iqr_ms: float
    blocks: int


def time_ms(run: Callable[[], Any], threads: int, min_run_time: float) -> Timing:
    """``run`` timed by ``torch.utils.benchmark`` in up to ``BLOCKS`` blocks of equal length that together take about
    ``min_run_time`` seconds (at least ``MIN_BLOCKS`` single calls for slow items), after a warm-up: the median over
    many short blocks shrugs off what other processes of a shared machine do to a few of them."""
    from torch.utils import benchmark

    timer = benchmark.Timer(stmt="run()", globals={"run": run}, num_threads=threads)
    per_call = timer.timeit(1).median  # first call: lazy allocations, kernel selection
    blocks = max(MIN_BLOCKS, min(BLOCKS, round(min_run_time / per_call)))
    number = max(1, round(min_run_time / blocks / per_call))
    timer.timeit(max(1, number * blocks // 4))  # warm-up: caches, allocator, CPU frequency
    times = [timer.timeit(number).median for _ in range(blocks)]
    quartiles = statistics.quantiles(times, n=4)
    return Timing(1e3 * statistics.median(times), 1e3 * (quartiles[2] - quartiles[0]), blocks)


def forward_ms(model: nn.Module, x: torch.Tensor, runs: int = 30, warmup: int = 5) -> float:
    """Median wall time (ms) of one forward pass of ``x`` on CPU, in the threads in force (``torch_threads``)."""
    model = model.eval().cpu()
    times = []
    with torch.no_grad():
        for i in range(warmup + runs):
            start = time.perf_counter()
            model(x)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)

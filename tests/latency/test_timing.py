"""``core.timing``: the thread pin is undone whatever happens in the block; the two timers measure what they time."""

import time

import pytest
import torch
from torch import nn

from flora_ray.core.timing import BLOCKS, MIN_BLOCKS, forward_ms, time_ms, torch_threads


def test_torch_threads_sets_the_count_and_restores_it_even_after_an_error():
    before = torch.get_num_threads()
    with torch_threads(1) as inside:
        assert inside == torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError, match="boom"), torch_threads(1):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before
    with torch_threads(None) as inside:  # None: leave it as it is
        assert inside == before


def test_time_ms_measures_a_known_duration_in_bounded_blocks():
    timing = time_ms(lambda: time.sleep(0.002), threads=1, min_run_time=0.05)
    assert 1.9 <= timing.median_ms <= 10.0  # a 2 ms sleep (a loaded machine may stretch it, never shorten it)
    assert MIN_BLOCKS <= timing.blocks <= BLOCKS and timing.iqr_ms >= 0.0


def test_forward_ms_times_a_forward_pass_without_recording_gradients():
    class Slow(nn.Module):
        def forward(self, x):
            assert not torch.is_grad_enabled()
            time.sleep(0.002)
            return x

    assert 1.9 <= forward_ms(Slow(), torch.zeros(1), runs=5, warmup=1) <= 10.0

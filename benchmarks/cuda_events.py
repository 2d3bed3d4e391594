"""Median CUDA-event time of a callable (sampler_gpu.py, sampler_sweep.py, overlap_nano.py)."""
from __future__ import annotations

import torch


def median_ms(fn, iters: int = 20, warmup: int = 3) -> float:
    """ms between two events around fn() (the host's time inside the call included), the median
    of `iters` calls after `warmup`; the device is idle at each start."""
    times = []
    for it in range(warmup + iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        if it >= warmup:
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]

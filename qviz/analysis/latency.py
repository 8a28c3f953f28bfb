"""Wall-clock latency of a model on this CPU: the median of repeated runs of one batch.

Opt-in (``Session(..., latency=True)``) because it costs time. The median of many short runs,
after a few warm-up runs, is what stays stable on a shared, noisy machine; quantized kernels
pack weights lazily, so warm-up matters there.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from qviz.flows.base import call_model
from qviz.flows.tracing import TRACE_LOCK


def median_latency_ms(model: nn.Module, batch, *, repeats: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of the model on ``batch`` (a tensor, tuple or mapping of inputs) over
    ``repeats`` runs after ``warmup`` runs."""
    times = []
    with torch.no_grad(), TRACE_LOCK.running():
        for i in range(warmup + repeats):
            start = time.perf_counter()
            call_model(model, batch)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)

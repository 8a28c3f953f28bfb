"""What the ResNet-18 benchmarks share: quiet warnings, the same random data, a timer.

Run the benchmarks as scripts (``python bench/capture.py``): Python puts bench/ on the path,
so they import this module as ``common``.
"""

from __future__ import annotations

import gc
import time
import warnings

import torch


def quiet_warnings() -> None:
    """Drop deprecation / user / future warnings, whoever they are attributed to (torch warns
    with ``stacklevel`` > 1, and qviz may reset filters inside its own context managers)."""
    for category in (DeprecationWarning, UserWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)


def make_data(quick: bool) -> tuple[list[torch.Tensor], torch.Tensor, str]:
    """32 calibration images in 4 batches and a comparison batch of 8 at 224x224 (random
    normal, seeded); ``quick``: 2 batches of 4 and a batch of 2 at 112x112."""
    gen = torch.Generator().manual_seed(1)
    if quick:
        n_batches, batch, size, eval_batch = 2, 4, 112, 2
    else:
        n_batches, batch, size, eval_batch = 4, 8, 224, 8
    calib = [torch.randn(batch, 3, size, size, generator=gen) for _ in range(n_batches)]
    comparison = torch.randn(eval_batch, 3, size, size, generator=gen)
    what = (
        f"{n_batches} calib batches of {batch} ({n_batches * batch} images), comparison batch "
        f"of {eval_batch}, {size}x{size}"
    )
    return calib, comparison, what


def timed(fn):
    """(result, wall s, CPU s) of ``fn()``, after a gc pass outside the timing."""
    gc.collect()
    c0, t0 = time.process_time(), time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0, time.process_time() - c0

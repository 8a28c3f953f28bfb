"""Give the memory freed by large steps back to the operating system.

glibc keeps freed blocks of the heap for reuse instead of returning them, and reuses them badly
when sizes vary: on a 100M-parameter model the dequantized weights of one layer after another
(the weight comparison, a sweep) pile up to more than the model's size in freed blocks that stay
resident (bench/llm.py: torchao's peak 3.8x the float bytes without, 2.7x with). ``malloc_trim(0)``
returns them, for a few milliseconds per call and the page faults of taking memory back later
(15% of a ResNet-18 sweep), so qviz trims per layer only for models whose weights take more than
``LARGE_MODEL_BYTES``. Elsewhere (macOS, Windows, musl) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

LARGE_MODEL_BYTES = 128 * 2**20


def is_large(model) -> bool:
    """Whether ``model``'s parameters take more than :data:`LARGE_MODEL_BYTES` (trim per layer)."""
    return sum(p.numel() * p.element_size() for p in model.parameters()) > LARGE_MODEL_BYTES


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, else None."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # no C library found, or not glibc
        return None


def release_freed_memory() -> None:
    """Return the heap's freed pages to the OS (glibc); a no-op where there is no malloc_trim."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)

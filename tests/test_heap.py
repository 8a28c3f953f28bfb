"""qviz.heap hands freed heap memory back to the OS (glibc), which the LLM-scale peaks rely on."""

from __future__ import annotations

import pytest

from qviz.heap import _malloc_trim, release_freed_memory


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(_malloc_trim() is None, reason="needs glibc's malloc_trim (Linux)")
def test_freed_blocks_between_live_ones_go_back_to_the_os():
    blocks = [bytearray(64 * 1024) for _ in range(3000)]  # ~190 MiB on the heap, below mmap's threshold
    kept = blocks[::50]  # a live block every 3 MiB: glibc cannot shrink the heap's top
    del blocks
    before = _rss_mib()
    release_freed_memory()
    after = _rss_mib()
    assert before - after > 100, (before, after)
    assert len(kept) == 60


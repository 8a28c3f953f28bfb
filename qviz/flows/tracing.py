"""Tracing and model runs kept apart across threads.

torch.fx's tracer patches ``nn.Module.__call__`` for the whole process while it traces (and
torch.export shares dynamo's global state): a second trace, or any model run on another thread
at that moment, goes through the patch and fails ("module is not installed as a submodule",
"CURRENT_PATCHER is None"). ``qviz serve`` prepares a session per visitor on worker threads
and sweeps run in the background, so qviz traces under :meth:`TraceLock.tracing` (one at a
time, no model runs beside it) and runs models under :meth:`TraceLock.running` (many at once).
Model runs of your own on other threads are outside this lock: do not trace beside them.

A KeyboardInterrupt (Ctrl-C) at any point of waiting for, taking or holding
the lock leaves it as it was before the call, so later runs in the process do not block.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time

_POLL_S = (0.0005, 0.01)  # a waiter looks again after this long, doubling up to the second


class TraceLock:
    """A readers-writer lock: model runs share it, a trace holds it alone. A tracing thread may
    run models and trace again inside its trace (pt2e calibrates inside a re-conversion); a
    running thread may run again, or trace once no other thread runs. Waiting traces hold back
    new runs, so a sweep cannot starve them.

    Interrupt-safe by construction: the whole state is one dict, thread id -> "waiting" (to
    trace), "tracing" or "running", changed only under a plain C lock (whose ``with`` releases
    whatever is raised inside it) and handed back with one atomic ``pop`` in ``finally``. A
    waiter sleeps and looks again rather than waiting on a ``threading.Condition``, whose
    Python-level wait can be interrupted between releasing and re-taking its lock.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._holds: dict[int, str] = {}

    def _others(self, me: int) -> set[str]:
        return {state for thread, state in self._holds.copy().items() if thread != me}

    @contextlib.contextmanager
    def _held(self, state: str, free):
        """Wait until ``free(states of the other threads)``, hold ``state`` inside the block."""
        me = threading.get_ident()
        before = self._holds.get(me)
        try:
            delay = _POLL_S[0]
            while True:
                with self._lock:
                    if state == "tracing":
                        self._holds[me] = "waiting"  # from here on, new runs of others wait
                    if free(self._others(me)):
                        self._holds[me] = state
                        break
                time.sleep(delay)
                delay = min(2 * delay, _POLL_S[1])
            yield
        finally:
            if before is None:  # one atomic step: the lock is free of this thread again
                self._holds.pop(me, None)
            else:
                self._holds[me] = before

    @contextlib.contextmanager
    def tracing(self):
        if self._holds.get(threading.get_ident()) == "tracing":  # a trace inside our own trace
            yield
            return
        with self._held("tracing", lambda others: not others & {"tracing", "running"}):
            yield

    @contextlib.contextmanager
    def running(self):
        if self._holds.get(threading.get_ident()) in ("tracing", "running"):  # already inside
            yield
            return
        with self._held("running", lambda others: not others & {"tracing", "waiting"}):
            yield


TRACE_LOCK = TraceLock()


def one_trace_at_a_time(fn):
    """Run ``fn`` (a step that traces) holding :data:`TRACE_LOCK` alone."""

    @functools.wraps(fn)
    def locked(*args, **kwargs):
        with TRACE_LOCK.tracing():
            return fn(*args, **kwargs)

    return locked

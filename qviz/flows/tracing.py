"""Tracing and model runs kept apart across threads.

torch.fx's tracer patches ``nn.Module.__call__`` for the whole process while it traces (and
torch.export shares dynamo's global state): a second trace, or any model run on another thread
at that moment, goes through the patch and fails ("module is not installed as a submodule",
"CURRENT_PATCHER is None"). ``qviz serve`` prepares a session per visitor on worker threads
and sweeps run in the background, so qviz traces under :meth:`TraceLock.tracing` (one at a
time, no model runs beside it) and runs models under :meth:`TraceLock.running` (many at once).
Model runs of your own on other threads are outside this lock: do not trace beside them.
"""

from __future__ import annotations

import contextlib
import functools
import threading


class TraceLock:
    """A readers-writer lock: model runs share it, a trace holds it alone. A tracing thread may
    run models and trace again inside its trace (pt2e calibrates inside a re-conversion); a
    running thread may run again. Waiting traces hold back new runs, so a sweep cannot starve
    them."""

    def __init__(self):
        self._cond = threading.Condition()
        self._runs = 0
        self._tracer: int | None = None
        self._depth = 0
        self._waiting = 0
        self._mine = threading.local()

    @contextlib.contextmanager
    def tracing(self):
        me = threading.get_ident()
        with self._cond:
            if self._tracer != me:
                self._waiting += 1
                self._cond.wait_for(lambda: self._tracer is None and self._runs == 0)
                self._waiting -= 1
                self._tracer = me
            self._depth += 1
        try:
            yield
        finally:
            with self._cond:
                self._depth -= 1
                if self._depth == 0:
                    self._tracer = None
                    self._cond.notify_all()

    @contextlib.contextmanager
    def running(self):
        held = getattr(self._mine, "runs", 0)
        if held or self._tracer == threading.get_ident():  # already inside a run or a trace of ours
            self._mine.runs = held + 1
            try:
                yield
            finally:
                self._mine.runs = held
            return
        with self._cond:
            self._cond.wait_for(lambda: self._tracer is None and self._waiting == 0)
            self._runs += 1
        self._mine.runs = 1
        try:
            yield
        finally:
            self._mine.runs = 0
            with self._cond:
                self._runs -= 1
                if self._runs == 0:
                    self._cond.notify_all()


TRACE_LOCK = TraceLock()


def one_trace_at_a_time(fn):
    """Run ``fn`` (a step that traces) holding :data:`TRACE_LOCK` alone."""

    @functools.wraps(fn)
    def locked(*args, **kwargs):
        with TRACE_LOCK.tracing():
            return fn(*args, **kwargs)

    return locked

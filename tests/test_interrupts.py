"""A KeyboardInterrupt (Ctrl-C) anywhere inside a step leaves nothing half-done: the trace lock
is free again, apply()/undo() leave the session exactly as it was, a sweep leaves no hooks."""

from __future__ import annotations

import contextlib
import ctypes
import sys
import threading
import time
import types

import pytest

from qviz.flows import tracing
from qviz.flows.tracing import TraceLock

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning"
)


# -- the trace lock ---------------------------------------------------------------------------
def _in_thread(fn):
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    return thread


def _interrupt(thread: threading.Thread) -> None:
    """Raise KeyboardInterrupt in ``thread`` as Ctrl-C would in the main thread."""
    hit = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(KeyboardInterrupt))
    assert hit == 1


def assert_free(lock: TraceLock) -> None:
    """Nothing held or waited for, and a trace and a run on other threads go through at once."""
    assert lock._holds == {}
    for step in (lock.tracing, lock.running):
        def probe(step=step):
            with step():
                pass
        thread = _in_thread(probe)
        thread.join(5)
        assert not thread.is_alive(), f"{step.__name__} blocked after the interrupt"
    assert lock._holds == {}


class Outcome:
    """What a thread did: 'done' (its block ran) or the exception type that stopped it."""

    def __init__(self):
        self.value = None

    def __call__(self, fn):
        def run():
            try:
                fn()
                self.value = "done"
            except BaseException as exc:  # noqa: BLE001 - we record what stopped it
                self.value = type(exc).__name__
        return run


@pytest.mark.parametrize("waiter, holder", [("tracing", "running"), ("running", "tracing"),
                                            ("tracing", "tracing")])
def test_an_interrupt_while_waiting_for_the_lock_leaves_it_free(waiter, holder):
    """The reported deadlock: Ctrl-C while apply() waits for a sweep's runs left _waiting=1."""
    lock, held, release = TraceLock(), threading.Event(), threading.Event()

    def hold():
        with getattr(lock, holder)():
            held.set()
            release.wait(10)

    holding = _in_thread(hold)
    held.wait(5)
    outcome = Outcome()
    waiting = _in_thread(outcome(lambda: getattr(lock, waiter)().__enter__()))
    time.sleep(0.3)
    assert waiting.is_alive()  # it waits for the holder
    _interrupt(waiting)
    waiting.join(5)
    assert outcome.value == "KeyboardInterrupt"
    release.set()
    holding.join(5)
    assert_free(lock)


def test_an_interrupt_in_the_wait_between_looks_leaves_the_lock_free(monkeypatch):
    lock, held, release = TraceLock(), threading.Event(), threading.Event()

    def hold():
        with lock.running():
            held.set()
            release.wait(10)

    holding = _in_thread(hold)
    held.wait(5)
    naps = []

    def interrupted_sleep(seconds):
        naps.append(seconds)
        raise KeyboardInterrupt

    monkeypatch.setattr(tracing, "time", types.SimpleNamespace(sleep=interrupted_sleep))
    with pytest.raises(KeyboardInterrupt):
        with lock.tracing():
            pytest.fail("the trace must not start while a run is in flight")
    assert naps
    monkeypatch.undo()
    release.set()
    holding.join(5)
    assert_free(lock)


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("kind", ["tracing", "running"])
def test_an_interrupt_at_every_call_while_taking_the_lock_leaves_it_free(kind, nested):
    """KeyboardInterrupt raised on entry to the k-th Python function run while the lock is
    taken (k = 1, 2, ... until the block is reached: its own helpers, contextlib's, the
    predicates; where CPython checks for a pending Ctrl-C), and once more inside the block."""
    lock = TraceLock()
    k, reached = 0, False
    while not reached:
        k += 1
        seen, inside = [0], [False]

        def tracer(frame, event, arg, seen=seen, inside=inside, k=k):
            if event == "call" and not inside[0]:
                seen[0] += 1
                if seen[0] == k:
                    raise KeyboardInterrupt
            return None

        def step(lock=lock, inside=inside):
            outer = lock.tracing() if nested else contextlib.nullcontext()
            with outer, getattr(lock, kind)():
                inside[0] = True
                raise KeyboardInterrupt  # an interrupt inside the block, while held

        def go(tracer=tracer, step=step):
            sys.settrace(tracer)
            try:
                step()
            finally:
                sys.settrace(None)

        outcome = Outcome()
        thread = _in_thread(outcome(go))
        thread.join(5)
        assert outcome.value == "KeyboardInterrupt", (k, outcome.value)
        reached = inside[0]
        assert_free(lock)
    assert k > 3  # the injection did walk through the lock's lines


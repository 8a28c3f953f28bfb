"""qviz.flows.tracing: a trace never overlaps another trace or a model run on another thread."""

from __future__ import annotations

import threading
import time

from qviz.flows.tracing import TraceLock


def _in_thread(fn):
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    return thread


def test_a_trace_waits_for_runs_in_flight_and_runs_wait_for_a_trace():
    lock, events = TraceLock(), []
    run_started, release_run = threading.Event(), threading.Event()

    def run():
        with lock.running():
            events.append("run start")
            run_started.set()
            release_run.wait(5)
            events.append("run end")

    def trace():
        with lock.tracing():
            events.append("trace")
            time.sleep(0.2)
            events.append("trace end")

    def late_run():
        with lock.running():
            events.append("late run")

    first = _in_thread(run)
    run_started.wait(5)
    tracer = _in_thread(trace)
    time.sleep(0.2)
    assert events == ["run start"]  # the trace waits for the run in flight
    late = _in_thread(late_run)
    time.sleep(0.1)
    assert events == ["run start"]  # a run that comes after a waiting trace waits too
    release_run.set()
    for t in (first, tracer, late):
        t.join(5)
    assert events == ["run start", "run end", "trace", "trace end", "late run"]


def test_one_trace_at_a_time():
    lock, inside, most = TraceLock(), [0], [0]

    def trace():
        with lock.tracing():
            inside[0] += 1
            most[0] = max(most[0], inside[0])
            time.sleep(0.05)
            inside[0] -= 1

    threads = [_in_thread(trace) for _ in range(4)]
    for t in threads:
        t.join(5)
    assert most[0] == 1


def test_runs_share_the_lock():
    lock, barrier = TraceLock(), threading.Barrier(3, timeout=5)

    def run():
        with lock.running():
            barrier.wait()  # all three inside at once, or a BrokenBarrierError

    threads = [_in_thread(run) for _ in range(3)]
    for t in threads:
        t.join(5)
    assert not barrier.broken


def test_a_tracing_thread_may_run_and_trace_again_and_a_run_may_run_again():
    lock, done = TraceLock(), []

    def nested():
        with lock.tracing():
            with lock.running(), lock.tracing():  # pt2e calibrates inside a re-conversion
                done.append("trace")
        with lock.running(), lock.running():
            done.append("run")

    thread = _in_thread(nested)
    thread.join(5)
    assert done == ["trace", "run"]
    with lock.tracing():  # and the lock is free again afterwards
        pass

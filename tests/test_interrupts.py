"""A KeyboardInterrupt (Ctrl-C) anywhere inside a step leaves nothing half-done: the trace lock
is free again, apply()/undo() leave the session exactly as it was, a sweep leaves no hooks."""

from __future__ import annotations

import contextlib
import ctypes
import sys
import threading
import time
import types
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn
from torch.ao.quantization import DeQuantStub, QuantStub

import qviz
from qviz.flows import tracing
from qviz.flows.tracing import TRACE_LOCK, TraceLock

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning",
    "ignore::pytest.PytestUnraisableExceptionWarning",  # interrupts injected into generators' cleanup
)
QVIZ_DIR = str(Path(qviz.__file__).parent)


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



# -- apply() and undo() are all-or-nothing -------------------------------------------------------
class Tiny(nn.Module):
    """Three linear layers between Quant/DeQuant stubs: every flow takes it (torchao: the linears)."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.fc1, self.relu1 = nn.Linear(32, 32), nn.ReLU()  # torchao: group_size 32
        self.fc2, self.relu2 = nn.Linear(32, 32), nn.ReLU()
        self.fc3 = nn.Linear(32, 4)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.4)

    def forward(self, x):
        x = self.relu2(self.fc2(self.relu1(self.fc1(self.quant(x)))))
        return self.dequant(self.fc3(x))


DATA = [torch.randn(32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
# a module swap (activation observer) and a float layer: FX converts again, eager wraps in stubs
CHANGES = {
    "fx": {"fc1": {"activation": "minmax"}, "fc2": {"dtype": "float"}},
    "eager": {"fc1": {"activation": "minmax"}, "fc2": {"dtype": "float"}},
    "torchao": {"fc1": {"dtype": "int4"}, "fc2": {"dtype": "float"}},
}


def _session(flow: str) -> qviz.Session:
    return qviz.Session(Tiny(), DATA, eval_data=DATA[:1], flow=flow, progress=False).run()


def state(s: qviz.Session) -> dict:
    """What a user sees of a session: plan, undo history, frames, summary, both models' outputs
    and hooks."""
    with torch.no_grad():
        out = torch.cat([s.quantized_model()(DATA[1]), s.float_model()(DATA[1])])
    return {"plan": s.plan, "history": list(s._history), "table": s.to_dataframe(),
            "points": s.points(), "summary": {k: repr(v) for k, v in s.summary().items()}, "outputs": out,
            "hooks": hooks(s)}


def hooks(s: qviz.Session) -> int:
    """Forward hooks and pre-hooks on the session's two models."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks)
               for model in (s.quantized_model(), s.float_model()) for m in model.modules())


def assert_state(s: qviz.Session, expected: dict, where) -> None:
    now = state(s)
    assert now["plan"] == expected["plan"], where
    assert now["history"] == expected["history"], where
    pd.testing.assert_frame_equal(now["table"], expected["table"], obj=f"table {where}")
    pd.testing.assert_frame_equal(now["points"], expected["points"], obj=f"points {where}")
    assert now["summary"] == expected["summary"], where
    assert torch.equal(now["outputs"], expected["outputs"]), where  # no module left swapped
    assert now["hooks"] == expected["hooks"], where


SESSION_FILE = str(Path(qviz.__file__).with_name("session.py"))
SWEEP_FILE = str(Path(qviz.__file__).parent / "analysis" / "sensitivity.py")
STEP_FILES = {SESSION_FILE, SWEEP_FILE}


def _steps_of_qviz(frame) -> bool:
    """A step of the session: a function it calls (a qviz helper, the flow, torch, the lock), or
    a model run (a module called from outside another module): where an interrupt is injected."""
    caller = frame.f_back
    if caller is None:
        return False
    if frame.f_code.co_name == "_call_impl":
        return caller.f_code.co_name not in ("_call_impl", "_wrapped_call_impl", "forward") and \
            caller.f_back is not None and caller.f_back.f_code.co_name != "_call_impl"
    return caller.f_code.co_filename in STEP_FILES


def interrupted_at(step, k: int) -> bool:
    """Run ``step()`` raising KeyboardInterrupt on entry to its k-th qviz function or module call;
    True when the interrupt reached the caller (False: ``step`` completed). torch's grad mode and
    quantized engine are put back afterwards: an interrupt on entry to ``no_grad().__exit__``
    skips its restore, which no code can prevent (the restoring call can be interrupted too)."""
    seen = [0]
    grad, engine = torch.is_grad_enabled(), torch.backends.quantized.engine

    def tracer(frame, event, arg):
        if event == "call" and _steps_of_qviz(frame):
            seen[0] += 1
            if seen[0] == k:
                raise KeyboardInterrupt
        return None

    sys.settrace(tracer)
    try:
        step()
    except KeyboardInterrupt:
        return True
    finally:
        sys.settrace(None)
        torch.set_grad_enabled(grad)
        torch.backends.quantized.engine = engine
    return False


def count_steps(step) -> int:
    seen = [0]

    def tracer(frame, event, arg):
        if event == "call" and _steps_of_qviz(frame):
            seen[0] += 1

    sys.settrace(tracer)
    try:
        step()
    finally:
        sys.settrace(None)
    return seen[0]


def _interrupt_everywhere(make, step, expect_after) -> int:
    """Interrupt ``step(session)`` at each of its steps in turn: the session must be as it was,
    or fully stepped (an interrupt after the commit, or one swallowed in a generator's cleanup)."""
    s = make()
    total = count_steps(lambda: step(s))
    s = make()
    before = state(s)
    for k in range(1, total + 1):
        if interrupted_at(lambda s=s: step(s), k):
            try:  # all or nothing: as before, or (the interrupt came after the commit) as after
                assert_state(s, before, f"interrupted at step {k} of {total}")
            except AssertionError:
                assert_state(s, expect_after, f"interrupted at step {k} of {total}: half done")
                s = make()
        else:
            assert_state(s, expect_after, f"completed despite an interrupt at step {k}")
            s = make()
    step(s)  # and the session still works: the same step, uninterrupted, gives the same result
    assert_state(s, expect_after, "after the interrupts")
    return total


@pytest.mark.slow
@pytest.mark.parametrize("flow", ["fx", "eager", "torchao"])
def test_an_interrupted_apply_leaves_the_session_as_it_was(flow):
    if flow == "torchao":
        pytest.importorskip("torchao")
    done = _session(flow).apply(CHANGES[flow])
    total = _interrupt_everywhere(lambda: _session(flow), lambda s: s.apply(CHANGES[flow]), state(done))
    assert total > 20  # the injection walked through the conversion, comparison and results


@pytest.mark.slow
def test_an_interrupted_undo_keeps_the_history():
    def applied():
        return _session("fx").apply(CHANGES["fx"]).apply({"fc3": {"weight": "per_tensor"}})

    undone = applied().undo()
    assert undone.plan == applied().plan.with_changes({"fc3": {"weight": "per_channel"}})
    assert len(undone._history) == 1
    _interrupt_everywhere(applied, lambda s: s.undo(), state(undone))


def test_ctrl_c_while_apply_waits_for_a_sweep_leaves_later_runs_free():
    """The reported deadlock, end to end: a run holds the lock (a dashboard sweep), apply() needs
    a trace (FX converts again for a float layer), Ctrl-C arrives while it waits."""
    s = _session("fx")
    before, held, release = state(s), threading.Event(), threading.Event()

    def sweep():
        with TRACE_LOCK.running():
            held.set()
            release.wait(10)

    sweeping = _in_thread(sweep)
    held.wait(5)
    outcome = Outcome()
    applying = _in_thread(outcome(lambda: s.apply({"fc2": {"dtype": "float"}})))
    time.sleep(0.5)
    assert applying.is_alive()
    _interrupt(applying)
    applying.join(10)
    assert outcome.value == "KeyboardInterrupt"
    release.set()
    sweeping.join(5)
    assert TRACE_LOCK._holds == {}
    assert_state(s, before, "after Ctrl-C")
    fresh = Outcome()
    thread = _in_thread(fresh(lambda: _session("fx").apply({"fc2": {"dtype": "float"}})))
    thread.join(60)
    assert fresh.value == "done"


@pytest.mark.slow
def test_an_interrupted_sweep_leaves_no_hook_and_no_swapped_module():
    """The issue's 3 forward hooks left on the quantized model, and modules left swapped."""
    s = _session("fx")
    before = state(s)
    models = (before["outputs"], before["hooks"])

    def sweep():  # one variant swapping into each model: the float one and the quantized one
        return s.sensitivity(variants=("quantize_only", "skip_only")).to_dataframe()

    result = sweep()
    total = count_steps(sweep)
    assert total > 20
    for k in range(1, total + 1):
        if interrupted_at(sweep, k):  # the models as they were (a light check per step)
            if k == total // 2:
                assert_state(s, before, f"sweep interrupted at step {k} of {total}")
            with torch.no_grad():
                outputs = torch.cat([s.quantized_model()(DATA[1]), s.float_model()(DATA[1])])
            assert torch.equal(outputs, models[0]) and hooks(s) == models[1], k
    pd.testing.assert_frame_equal(sweep(), result)  # and it still works

"""DashboardState: what every view of one dashboard shares (the session, the selected layer,
the message line, a version counter), as a ``param.Parameterized`` with no Panel import, so the
same state drives a notebook, a served app, or a test without a browser.

Views watch ``selected_layer`` and ``version`` (it goes up whenever the results change, after
``apply`` or ``undo``, so every view redraws from the new numbers) and reach the session only
through this interface, never the session itself (it is ``_session``, private to this module):

- results, plain data: ``table``, ``summary``, ``points``, ``layers``, ``row()``, ``record()``,
  ``activation_point()``, ``weight_point()``, ``meta()``, ``session_label()``, ``timeline()``;
- editing: ``can_apply``, ``can_undo``, ``plan``, ``editable``, ``layer_config()``,
  ``choices()``, ``plan_code()``, ``apply()``, ``apply_plan()``, ``undo()``;
- analyses: ``can_sweep``, ``sensitivity_frame()``, ``sweep()``, ``search()``, ``diagnosis()``,
  ``outliers()``, ``channel_matrix()``, ``algorithms()``, ``group_layers()``,
  ``weight_groups()``, ``graph()``;
- messages and tasks: ``notify()``, ``clear_message()``, ``run_task()``.

A session-like object that is not the dashboard's (the Compare tab's second session) is named
and described by :func:`session_name` and :func:`session_meta`.
"""

from __future__ import annotations

import copy
import logging
import math
import threading
from collections import Counter
from pathlib import Path

import pandas as pd
import param

from qviz.analysis.graph import ModelGraph, session_graph
from qviz.analysis.groups import linear_rows
from qviz.analysis.outliers import channel_matrix
from qviz.errors import QvizError
from qviz.options import OPTIONS, TORCH_DTYPES
from qviz.results import output_record

log = logging.getLogger(__name__)

#: The editor's fields: the per-layer options (qviz.options) that have an editor widget.
EDITOR_OPTIONS = tuple(o for o in OPTIONS if o.widget)
CONFIG_FIELDS = tuple(o.name for o in EDITOR_OPTIONS)
_CONFIG_DEFAULTS = {o.name: o.default for o in EDITOR_OPTIONS}


def offered(o) -> tuple:
    """What the editor offers for option ``o`` where the flow does not say (``editable``): its
    choices (dtypes: torch.ao's; the number formats are offered by the flows that list them), or
    an open number's suggestions (None first where None means "the flow's")."""
    if o.name == "dtype":
        return TORCH_DTYPES
    return o.choices or (None,) * o.optional + o.suggested


_CHOICES = {o.name: offered(o) for o in EDITOR_OPTIONS}

#: Numbers shown before/after an edit: the layer's row, then the model's summary.
COMPARED_COLUMNS = ("weight_sqnr", "local_sqnr", "output_sqnr", "scale", "zero_point", "clip_frac")
COMPARED_SUMMARY = ("output_sqnr", "top1_agreement", "weight_bytes")


class DashboardState(param.Parameterized):
    """One dashboard's shared state over one session (one per browser session)."""

    selected_layer = param.Selector(default=None, objects=[], allow_None=True, check_on_set=True, doc="""
        The layer every view shows; set it from anywhere (table, chart, code) to select it everywhere.""")
    message = param.String(default="", doc="The last thing worth telling the user ('' when nothing).")
    message_kind = param.Selector(default="info", objects=["info", "success", "warning", "danger"])
    message_source = param.String(default="", doc="""
        Where the message belongs: "apply" (an edit's outcome, shown under the editor's Apply)
        or '' (the page's floating line: everything else, sweeps and searches included, whose
        message inside their own column re-laid out the chart as it appeared).""")
    version = param.Integer(default=0, doc="Bumped whenever the results change.")
    busy = param.Boolean(default=False, doc="True while the session re-converts.")
    last_change = param.Dict(default=None, allow_None=True, doc="""
        The last apply/undo: {'layer', 'before', 'after', 'summary_before', 'summary_after'}.""")
    task = param.String(default="", doc="""
        The long task running in the background ('' when none): one at a time; apply and undo wait.""")

    def __init__(self, session, **params):
        super().__init__(**params)
        self._session = session
        self._history: list = []  # plans before each apply, for undo
        self._task_lock = threading.Lock()
        self._table = self._summary = self._points = None
        self._graphs: dict = {}  # (layers, depth) -> laid-out graph, or the QvizError of the trace
        self._channels = None  # per-channel outlier figures, read once (see channel_matrix)
        self.refresh()

    # -- results ---------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Re-read the session's results, keep the selection if the layer still exists, bump version."""
        self._table = self._session.to_dataframe()
        self._summary = self._session.summary()
        self._points = self._session.points()
        layers = list(self._table.index)
        current = self.selected_layer if self.selected_layer in layers else (layers[0] if layers else None)
        with param.parameterized.batch_call_watchers(self):
            self.param.selected_layer.objects = layers
            self.selected_layer = current
            self.version += 1

    @property
    def table(self) -> pd.DataFrame:
        """The per-layer frame (``session.to_dataframe()`` at the current version)."""
        return self._table

    @property
    def summary(self) -> dict:
        return self._summary

    @property
    def points(self) -> pd.DataFrame:
        return self._points

    @property
    def layers(self) -> list[str]:
        return list(self._table.index)

    def row(self, layer: str) -> pd.Series:
        return self._table.loc[layer]

    def activation_point(self, layer: str) -> str | None:
        """Name of the layer's output activation point (see :func:`qviz.results.output_record`); None if none."""
        record = output_record(self._session.results.records, layer)
        return record.name if record is not None else None

    def weight_point(self, layer: str) -> str | None:
        """Name of the layer's weight point, None if it has none."""
        p = self._points
        hits = p.index[(p["layer"] == layer) & (p["role"] == "weight")]
        return hits[0] if len(hits) else None

    def record(self, point: str):
        return self._session.record(point)

    def meta(self) -> dict:
        """What the results record of their making: flow, backend, torch, qviz ({} when nothing)."""
        return session_meta(self._session)

    def session_label(self) -> str:
        """What the session is called (see :func:`session_name`)."""
        return session_name(self._session)

    def timeline(self):
        """The session's QAT timeline (``results.timeline``), None when it has none."""
        return getattr(getattr(self._session, "results", None), "timeline", None)

    # -- messages --------------------------------------------------------------------------------
    def notify(self, text: str, kind: str = "info", source: str = "") -> None:
        """Tell the user ``text``, shown by the message view of ``source`` (see ``message_source``)."""
        with param.parameterized.batch_call_watchers(self):
            self.message_kind = kind
            self.message_source = source
            self.message = text

    def clear_message(self) -> None:
        self.message = ""

    # -- editing (needs Session.apply / Session.plan) --------------------------------------------
    @property
    def can_apply(self) -> bool:
        """True when the session can re-convert with new choices (a live session with apply)."""
        return hasattr(self._session, "apply") and bool(getattr(self._session, "can_apply", False))

    @property
    def can_undo(self) -> bool:
        return bool(self._history)

    @property
    def plan(self):
        return getattr(self._session, "plan", None)

    def layer_config(self, layer: str) -> dict:
        """The layer's current choices as the editor's fields (defaults where the plan says nothing)."""
        plan = self.plan
        config = None
        if plan is not None:
            try:
                config = plan[layer]
            except (KeyError, TypeError):
                config = None
        values = {f: getattr(config, f, None) for f in CONFIG_FIELDS}
        return {f: _CONFIG_DEFAULTS[f] if v is None else v for f, v in values.items()}

    def choices(self, layer: str, field: str) -> list:
        """The editor's choices for ``layer``'s ``field``: what the flow offers (``editable``)
        narrowed to what its backend can run on this layer (e.g. no fp16 for static x86)."""
        offered = (self.editable or {}).get(field) or _CHOICES[field]
        if layer is None or not self.can_apply or not getattr(self._session, "is_live", False):
            return list(offered)
        return list(self._session.choices(layer, field, offered))

    def plan_code(self) -> str:
        """The plan as runnable code for the session's flow ('' without a plan)."""
        plan = self.plan
        if plan is None:
            return ""
        return plan.code_for(self.meta())

    def apply(self, changes: dict, source: str = "apply") -> bool:
        """``session.apply(changes)`` ({layer: {field: value}}); a QvizError becomes the message."""
        if not self._editable(source):
            return False
        previous = copy.deepcopy(self.plan)
        return self._run(lambda: self._session.apply(changes), next(iter(changes), None),
                         previous, f"applied {_describe(changes)}", source)

    def apply_plan(self, plan, what: str, source: str = "") -> bool:
        """Put a whole ``plan`` in force (``session.apply(plan)``, e.g. a search candidate),
        undoable like an edit; ``what`` is the success message."""
        if not self._editable(source):
            return False
        previous = copy.deepcopy(self.plan)
        return self._run(lambda: self._session.apply(plan), self.selected_layer, previous, what, source)

    def _editable(self, source: str) -> bool:
        """True when a new plan may be applied now; otherwise the message says why not."""
        if not self.can_apply:
            self.notify("this session cannot re-convert (it was loaded from a file, or has no model)", "warning",
                        source)
            return False
        if self.task:
            self.notify(f"wait for the {self.task} to finish", "warning", source)
            return False
        return True

    def undo(self, source: str = "apply") -> bool:
        """Re-apply the plan in force before the last apply."""
        if self.task:
            self.notify(f"wait for the {self.task} to finish", "warning", source)
            return False
        if not self._history:
            self.notify("nothing to undo", "info", source)
            return False
        previous = self._history.pop()
        layer = self.last_change["layer"] if self.last_change else self.selected_layer
        if self._run(lambda: self._session.apply(previous), layer, None, "undone: back to the previous plan", source):
            return True
        self._history.append(previous)
        return False

    def _run(self, action, layer, previous_plan, success: str, source: str) -> bool:
        before = self._snapshot(layer)
        self.busy = True
        try:
            action()
        except QvizError as exc:
            self.notify(str(exc), "danger", source)
            return False
        finally:
            self.busy = False
        if previous_plan is not None:
            self._history.append(previous_plan)
        self.refresh()
        after = self._snapshot(layer)
        with param.parameterized.batch_call_watchers(self):
            self.last_change = {"layer": layer, "before": before[0], "after": after[0],
                                "summary_before": before[1], "summary_after": after[1]}
            self.notify(success, "success", source)
        return True

    def _snapshot(self, layer) -> tuple[dict, dict]:
        """The layer's choices and numbers, and the model's numbers, as they are now."""
        row = self._table.loc[layer] if layer in self._table.index else {}
        config = self.layer_config(layer) if layer in self._table.index else {}
        return ({**{c: _plain(row.get(c, math.nan)) for c in COMPARED_COLUMNS}, **config},
                {k: _plain(self._summary.get(k, math.nan)) for k in COMPARED_SUMMARY})

    # -- analysis (sensitivity, diagnosis) ------------------------------------------------------
    @property
    def editable(self) -> dict | None:
        """The config fields the session's flow honours and their choices (None: all of them)."""
        return getattr(self._session, "editable", None)

    @property
    def can_sweep(self) -> bool:
        """True when the session holds its models (a live run), so ``sensitivity()`` can measure;
        a session loaded from a file has only the sweep saved with it."""
        return getattr(self._session, "is_live", False)

    def sensitivity_frame(self) -> pd.DataFrame | None:
        """The stored sweep (``results.sensitivity``, metric in ``.attrs``); None before one."""
        return getattr(getattr(self._session, "results", None), "sensitivity", None)

    def sweep(self, callback=None):
        """``session.sensitivity()`` (no progress bar; ``callback(done, total)`` per layer): the
        sweep, stored with the results, so ``sensitivity_frame()`` then returns it."""
        return self._session.sensitivity(progress=False, callback=callback)

    def search(self, target_sqnr: float, callback=None):
        """``session.search(target_sqnr=...)`` (``callback(tried, most)`` per candidate): a
        :class:`qviz.analysis.search.SearchResult`. Every candidate is a real apply: call
        ``refresh()`` after it."""
        return self._session.search(target_sqnr=target_sqnr, callback=callback)

    def diagnosis(self) -> pd.DataFrame:
        """``session.diagnose()``: findings with evidence and fix, sensitive layers first."""
        return self._session.diagnose()

    def outliers(self, top: int) -> pd.DataFrame:
        """``session.outliers(top)``: each linear layer's ``top`` input channels by abs-max, most
        extreme first. Raises QvizError (saying why) when the session cannot measure them."""
        if not callable(getattr(self._session, "outliers", None)):
            raise QvizError("this session keeps no activation-outlier statistics")
        return self._session.outliers(top=top)

    def algorithms(self, layer: str, **options) -> pd.DataFrame:
        """``session.algorithms(layer, **options)``: RTN vs SmoothQuant, AWQ, GPTQ and HQQ on one
        layer (see :mod:`qviz.analysis.algorithms`). Raises QvizError saying why it cannot run."""
        if not callable(getattr(self._session, "algorithms", None)):
            raise QvizError("this session cannot compare quantization algorithms")
        return self._session.algorithms(layers=layer, **options)

    def channel_matrix(self, value: str = "ratio_to_median") -> pd.DataFrame:
        """Every channel's ``value`` ("absmax" or "ratio_to_median") of every linear layer's
        input: one row per layer (the table's order first), one column per channel index, NaN
        past a layer's width (see :func:`qviz.analysis.outliers.channel_matrix`). Measured once
        per session: they are the float model's, so no apply changes them."""
        if self._channels is None:
            self._channels = self.outliers(top=2**62)  # a top wider than any layer: every channel
        return channel_matrix(self._channels, value, self.layers)

    def group_layers(self) -> list[str]:
        """The layers whose weight groups can be shown: the table's Linear rows, in its order."""
        return linear_rows(self._table)

    def weight_groups(self, layer: str, group_size: int | None = None) -> pd.DataFrame:
        """``session.weight_groups(layer, group_size)``: the layer's int4 weight groups (see
        :mod:`qviz.analysis.groups`). Raises QvizError (saying why) when the session cannot."""
        if not callable(getattr(self._session, "weight_groups", None)):
            raise QvizError("this session keeps no weights to group")
        return self._session.weight_groups(layer, group_size)

    def graph(self, depth: int | None = None) -> ModelGraph:
        """The model's graph grouped to ``depth`` (None: every layer; see qviz.analysis.graph),
        laid out, with the current figures (and the sweep's sensitivity when there is one).
        Traced and laid out once per set of layers; raises QvizError saying why when there is
        no graph to draw (a session loaded from a file, a model torch.fx cannot trace)."""
        layers = tuple(self.layers)
        if (layers, "trace") not in self._graphs:
            try:
                self._graphs[(layers, "trace")] = session_graph(self._session)
            except QvizError as exc:
                self._graphs[(layers, "trace")] = exc
        traced = self._graphs[(layers, "trace")]
        if isinstance(traced, QvizError):
            raise traced
        if (layers, depth) not in self._graphs:
            self._graphs[(layers, depth)] = traced.collapse(depth).layout()
        return self._graphs[(layers, depth)].with_figures(self._table, self.sensitivity_frame())

    # -- background tasks ------------------------------------------------------------------------
    def run_task(self, what: str, work, done=None, ui=None) -> threading.Thread | None:
        """Run ``work()`` on a worker thread so the app stays responsive, then ``done(result)``
        through ``ui``: ``ui(fn, *args)`` runs ``fn`` where the views live (a served page's event
        loop; by default at once, on the worker). One task at a time (``task`` names it); an
        exception becomes the message and the app keeps working. Returns the thread, or None
        when another task is running."""
        with self._task_lock:
            if self.task:
                self.notify(f"wait for the {self.task} to finish", "warning")
                return None
            self.task = what
        thread = threading.Thread(target=self._task, args=(what, work, done, ui or _now),
                                  name=f"qviz: {what}", daemon=True)
        thread.start()
        return thread

    def _task(self, what: str, work, done, ui) -> None:
        try:
            result = work()
        except Exception as exc:  # noqa: BLE001 - a failed task is a message, not a dead app
            ui(self._fail, what, exc)
        else:
            ui(self._finish, what, done, result)

    def _finish(self, what: str, done, result) -> None:
        try:
            if done is not None:
                done(result)
        except Exception as exc:  # noqa: BLE001 - as in _task
            self._fail(what, exc)
        finally:
            self.task = ""

    def _fail(self, what: str, exc: Exception) -> None:
        if isinstance(exc, QvizError):
            self.notify(str(exc), "danger")
        else:
            log.error("qviz: the %s failed", what, exc_info=exc)
            self.notify(f"the {what} failed: {type(exc).__name__}: {exc}", "danger")
        self.task = ""


def session_meta(session) -> dict:
    """The ``meta`` of a session's results ({} when it has none)."""
    return getattr(getattr(session, "results", None), "meta", None) or {}


def session_name(session) -> str:
    """What the dashboard calls a session: its file's name when loaded from one, else (in
    memory) its flow and backend and the dtypes of its plan."""
    source = getattr(session, "source", None)
    if source is not None:
        return Path(source).name
    meta = session_meta(session)
    name = ", ".join(["in memory", *(f"{meta[k]} {k}" for k in ("flow", "backend") if meta.get(k))])
    plan = getattr(session, "plan", None)
    if plan:
        counts = Counter(config.dtype for config in plan.values()).most_common()
        name += ", plan " + " + ".join(f"{n} {dtype}" for dtype, n in counts)
    return name


def _now(fn, *args):
    return fn(*args)


def _plain(v):
    return v.item() if hasattr(v, "item") else v


def _describe(changes: dict) -> str:
    return "; ".join(f"{layer}: " + ", ".join(f"{k}={v}" for k, v in c.items()) for layer, c in changes.items())

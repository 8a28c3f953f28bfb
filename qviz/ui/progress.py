"""Background tasks in the views: ``TaskProgress`` (a progress bar and a status line) and
``ui_caller()``, the way back from a worker thread to the browser session's event loop.

Widgets are changed only there, as Panel's own callbacks change them: changed from a worker
thread, Panel builds some models' stylesheet links without the server's context (links to its
CDN, which fail offline) and updates race the session's own callbacks.
"""

from __future__ import annotations

import functools
import time

import panel as pn
from panel.io.state import set_curdoc
from panel.viewable import Viewer


def ui_caller():
    """``call(fn, *args)``: runs ``fn(*args)`` on the current browser session's event loop with its
    document current (call this in a widget callback, use the result from any thread); outside a
    served session (notebook, tests) ``fn`` runs at once."""
    doc = pn.state.curdoc
    if doc is None or doc.session_context is None:
        return _now

    def call(fn, *args):
        with set_curdoc(doc):
            pn.state.execute(functools.partial(fn, *args), schedule=True)

    return call


def _now(fn, *args):
    return fn(*args)


class TaskProgress(Viewer):
    """A bar (hidden while idle) and a one-line status, e.g. "layer 3 of 6"."""

    def __init__(self, unit: str, **params):
        super().__init__(**params)
        self.unit = unit
        self.bar = pn.indicators.Progress(
            value=-1, max=1, active=False, visible=False, sizing_mode="stretch_width", height=20
        )
        self.status = pn.pane.Markdown("", margin=(0, 10), styles={"color": "#555"})
        self._started = 0.0

    @property
    def running(self) -> bool:
        return self.bar.visible

    def start(self, text: str) -> None:
        """Show an indeterminate bar until the first ``update``."""
        self._started = time.perf_counter()
        self.bar.param.update(value=-1, max=1, active=True, visible=True)
        self.status.object = text

    def update(self, done: int, total: int) -> None:
        """``done`` of ``total`` steps finished (called from the worker thread)."""
        self.bar.param.update(max=max(int(total), 1), value=min(int(done), max(int(total), 1)))
        self.status.object = f"{self.unit} {done} of {total}"

    @property
    def elapsed(self) -> float:
        """Seconds since ``start``."""
        return time.perf_counter() - self._started

    def finish(self, text: str) -> None:
        """Hide the bar and say how it ended."""
        self.bar.param.update(active=False, visible=False)
        self.status.object = text

    def __panel__(self):
        return pn.Column(self.bar, self.status, sizing_mode="stretch_width", margin=0)

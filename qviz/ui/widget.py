"""The dashboard in a notebook: ``show(session)`` renders it inline, ``widget(session)`` gives an
ipywidgets widget (through jupyter_bokeh) for ipywidgets layouts and voila."""

from __future__ import annotations

import panel as pn

from qviz.ui.app import build_dashboard

EXTENSIONS = ("plotly", "tabulator", "codeeditor")


def in_notebook() -> bool:
    """True inside a Jupyter kernel (as tensorboard.notebook detects it: an IPython kernel app)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def show(session, compare_with=None) -> None:
    """Render the dashboard inline in a notebook (a Compare tab with ``compare_with``); outside
    one, serve it and open a browser (blocking until Ctrl-C, like ``plt.show()``)."""
    if not in_notebook():
        from qviz.ui.serve import serve

        serve(lambda: session, compare=None if compare_with is None else lambda: compare_with, show=True)
        return
    from IPython.display import display

    pn.extension(*EXTENSIONS)
    display(build_dashboard(session, compare_with=compare_with))


def widget(session, compare_with=None):
    """The dashboard as an ipywidgets widget (``pn.ipywidget``)."""
    pn.extension(*EXTENSIONS)
    return pn.ipywidget(build_dashboard(session, compare_with=compare_with))

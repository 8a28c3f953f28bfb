"""qviz's interactive views: state (param only), views (Panel), the app, notebook and server transports.

Names load lazily, so ``qviz.ui.state`` (and the command line) import without Panel.
"""

from __future__ import annotations

import importlib

#: Browser sessions a served app holds at once by default (each live demo session holds models).
MAX_SESSIONS = 8
#: Seconds a served browser session lives with no page connected (a closed tab, a bare request)
#: before it is destroyed and its dashboard and Session freed: Bokeh's own default.
IDLE_S = 15.0

_EXPORTS = {
    "DashboardState": "qviz.ui.state",
    "build_app": "qviz.ui.app",
    "build_dashboard": "qviz.ui.app",
    "serve": "qviz.ui.serve",
    "show": "qviz.ui.widget",
    "widget": "qviz.ui.widget",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'qviz.ui' has no attribute {name!r}")

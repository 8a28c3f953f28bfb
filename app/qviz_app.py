"""The qviz app for ``panel serve``: ``panel serve app/qviz_app.py`` serves the embedded demo,
``panel serve app/qviz_app.py --args run.qviz`` a saved session, and ``--args a.qviz b.qviz``
the first with the second in a Compare tab. Panel runs this script once per browser session:
every visitor gets a fresh demo session of their own, while a session file is loaded once per
server process and shared read-only (cached by path); at most ``qviz.ui.MAX_SESSIONS`` visitors
are served at once, as with ``qviz serve``."""

import functools
import sys
from pathlib import Path

import panel as pn

from qviz.demo import session_factory
from qviz.ui import MAX_SESSIONS
from qviz.ui.serve import Visitors, app_for, loading_app_for, visitor_page


def _file(path):
    """The server's one loader of ``path``: every browser session's run of this script shares it."""
    return pn.state.as_cached(f"qviz-session:{Path(path).resolve()}", session_factory, path=path, check=False)


_paths = sys.argv[1:3]
_first = _paths[0] if _paths else None
_compare = _file(_paths[1]) if len(_paths) > 1 else None
_factory = _file(_first) if _first else session_factory(demo=True)
_make_page = app_for if _first else loading_app_for  # the demo calibrates: show progress meanwhile
_visitors = pn.state.as_cached("qviz-visitors", Visitors, limit=MAX_SESSIONS)
app = visitor_page(functools.partial(_make_page, _factory, compare=_compare), _visitors)
app.servable(title="qviz")

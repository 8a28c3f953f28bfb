"""The qviz app for ``panel serve``: ``panel serve app/qviz_app.py`` serves the embedded demo,
``panel serve app/qviz_app.py --args run.qviz`` a saved session, and ``--args a.qviz b.qviz``
the first with the second in a Compare tab. Panel runs this script once per browser session, so
every visitor gets fresh sessions of their own."""

import sys

from qviz.ui.serve import app_for, loading_app_for, session_factory

_paths = sys.argv[1:3]
_first = _paths[0] if _paths else None
_compare = session_factory(_paths[1], check=False) if len(_paths) > 1 else None
_make_page = app_for if _first else loading_app_for  # the demo calibrates: show progress meanwhile
app = _make_page(session_factory(_first, demo=_first is None, check=False), compare=_compare)
app.servable(title="qviz")

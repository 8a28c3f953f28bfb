"""The qviz app for ``panel serve``: ``panel serve app/qviz_app.py`` serves the embedded demo,
``panel serve app/qviz_app.py --args run.qviz`` a saved session. Panel runs this script once per
browser session, so every visitor gets a fresh session of their own."""

import sys

from qviz.ui.serve import app_for, session_factory

_path = sys.argv[1] if len(sys.argv) > 1 else None
app_for(session_factory(_path, demo=_path is None, check=False)).servable(title="qviz")

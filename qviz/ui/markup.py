"""Text from the data in the dashboard's Markdown panes, shown as written and never run.

Layer names, types, observers, the flow, a file's metadata and error messages come from the
user's model or from a stranger's session file. Panel renders Markdown (raw HTML allowed) into
the page and runs the scripts it holds, so a module named ``<img src=x onerror=...>`` would run
script in every visitor's browser. Every such value goes through :func:`md` (the HTML report
does the same with ``html.escape``)."""

from __future__ import annotations

import html
import re
import string

# Every ASCII punctuation mark Markdown could read as syntax, except the "&" and ";" of the
# entities html.escape writes (CommonMark lets a backslash escape any of them).
_SYNTAX = re.compile("([" + re.escape("".join(c for c in string.punctuation if c not in "&;<>")) + "])")


def md(value) -> str:
    """``str(value)`` as literal text inside Markdown: HTML escaped, Markdown syntax escaped."""
    return _SYNTAX.sub(r"\\\1", html.escape(str(value), quote=False))

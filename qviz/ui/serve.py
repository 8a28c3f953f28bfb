"""Serve the app: one dashboard per browser session over the Session ``factory`` gives it (a
fresh live one per visitor for the demo, so what one visitor applies never changes what another
sees; one read-only copy of a session file for all). Binds 127.0.0.1 unless told, admits at most
``max_sessions`` visitors at once, and frees a visitor's dashboard and session once their page
has been closed for ``idle_s`` seconds (a bare request, which never opens the page, likewise)."""

from __future__ import annotations

import functools
import ipaddress
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import panel as pn

from qviz.errors import ConfigError, QvizError
from qviz.ui import IDLE_S, MAX_SESSIONS
from qviz.ui.app import TITLE, build_app
from qviz.ui.markup import md
from qviz.ui.progress import TaskProgress, ui_caller

log = logging.getLogger(__name__)


def app_for(factory: Callable, compare: Callable | None = None):
    """The app of one browser session over ``factory()``'s session (and, with ``compare``,
    ``compare()``'s in a Compare tab); a failure to make them becomes an Alert page instead of a
    server error."""
    try:
        return build_app(factory(), compare_with=None if compare is None else compare())
    except QvizError as exc:
        return pn.pane.Alert(md(f"qviz could not open the session: {exc}"), alert_type="danger")
    except Exception as exc:  # noqa: BLE001 - a page that says what broke, not a bare server error
        log.exception("qviz: could not build the app")
        return pn.pane.Alert(md(f"qviz could not build the app: {type(exc).__name__}: {exc}"), alert_type="danger")


def loading_app_for(factory: Callable, compare: Callable | None = None):
    """The page of one browser session whose session takes seconds to make (the demo calibrates):
    a progress line at once, then, once the page has loaded in a browser, ``factory()`` on a
    worker thread and :func:`app_for`'s page in its place (swapped in on the page's own event
    loop, so the server keeps serving others). A bare request (a link preview, a health check)
    never loads the page, so it costs no session; and the swap never races the session's set-up."""
    pn.extension("tabulator", "plotly")  # the page loads their JavaScript before the app arrives
    progress = TaskProgress("step")
    progress.start("qviz: preparing the session: calibrating and comparing, a few seconds…")
    page = pn.Column(progress, sizing_mode="stretch_width", name=TITLE)
    call = ui_caller()

    def work():
        app = app_for(factory, compare)
        call(page.__setitem__, slice(None), [app])

    def start():
        threading.Thread(target=work, name="qviz: preparing the session", daemon=True).start()

    pn.state.onload(start)
    return page


class Visitors:
    """How many browser sessions hold a page now, at most ``limit``: :meth:`admit` takes a place
    for the current browser session and gives it back when Bokeh destroys that session."""

    def __init__(self, limit: int = MAX_SESSIONS):
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ConfigError(f"max_sessions must be a whole number of visitors >= 1, not {limit!r}")
        self.limit, self.count = limit, 0
        self._lock = threading.Lock()

    def admit(self) -> bool:
        """Take a place for the current browser session; False when all are taken. Outside a
        served session (a notebook, a test) there is nothing to count: always True."""
        doc = pn.state.curdoc
        if doc is None or doc.session_context is None:
            return True
        with self._lock:
            if self.count >= self.limit:
                return False
            self.count += 1
        doc.on_session_destroyed(self._leave)
        return True

    def _leave(self, _context) -> None:
        with self._lock:
            self.count -= 1


def full_page(limit: int, idle_s: float = IDLE_S) -> pn.pane.Alert:
    """What a visitor past the limit sees instead of the app."""
    return pn.pane.Alert(
        f"qviz is already serving {limit} visitor(s), the most it serves at once "
        f"(`qviz serve --max-sessions`). Close a qviz tab you no longer use, or reload this page in "
        f"a minute: a closed tab gives its place back within about {idle_s + 1:.0f} s.",
        alert_type="warning", name=TITLE)


def visitor_page(make_page: Callable, visitors: Visitors, idle_s: float = IDLE_S):
    """``make_page()`` for an admitted browser session, :func:`full_page` past the limit."""
    return make_page() if visitors.admit() else full_page(visitors.limit, idle_s)


def exposure_warning(address: str, port: int) -> str | None:
    """The warning for an address other machines can reach (None for loopback)."""
    if _is_loopback(address):
        return None
    where = "every network interface" if address in ("0.0.0.0", "::", "") else address
    return (f"qviz: WARNING: serving on {where}, port {port}, with no login: anyone who can reach "
            "this port can open the app and read the session, and where sessions are live "
            "(--demo, or a Session served from Python) run models on this machine (Apply, "
            "sensitivity sweeps, searches). Bind 127.0.0.1 (the default), or put it behind a login "
            "(see the README, \"Serving beyond this machine\").")


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def free_port(address: str = "127.0.0.1") -> int:
    """A port free on ``address`` right now."""
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as sock:
        sock.bind((address, 0))
        return sock.getsockname()[1]


def websocket_origins(address: str, port: int) -> list[str]:
    """Origins allowed to open the app's websocket: the address served (and localhost for
    loopback); any host on the port when bound to every interface."""
    if address in ("0.0.0.0", "::", ""):
        return [f"*:{port}"]
    origins = [f"{address}:{port}"]
    if _is_loopback(address):
        origins += [f"localhost:{port}", f"127.0.0.1:{port}"]
    return sorted(set(origins))


@dataclass
class RunningServer:
    """A server started with ``threaded=True``: its URL, its :class:`Visitors`, and ``stop()``."""

    url: str
    port: int
    address: str
    thread: object
    visitors: Visitors

    def stop(self, timeout: float = 10.0) -> None:
        self.thread.stop()
        self.thread.join(timeout)


def serve(factory: Callable, *, compare: Callable | None = None, port: int = 0, address: str = "127.0.0.1",
          show: bool = True, threaded: bool = False, verbose: bool = True, slow: bool = False,
          max_sessions: int = MAX_SESSIONS, idle_s: float = IDLE_S):
    """Serve the app, ``factory()`` giving the Session of each browser session (and
    ``compare()``, when given, the second session of its Compare tab); ``slow``: the factory
    takes seconds (the demo calibrates), so each page shows progress while it runs.

    At most ``max_sessions`` browser sessions hold a page at once (the next visitors get a page
    saying so); a session whose page is closed, or never opened (a bare request), is destroyed
    after ``idle_s`` seconds and its dashboard and Session freed. Addresses other machines can
    reach are warned about on stderr.

    ``threaded=True`` returns a :class:`RunningServer` once it accepts connections; otherwise
    this blocks until the server stops (Ctrl-C).
    """
    if not callable(factory):
        raise ConfigError("factory must be a callable that returns a Session, e.g. qviz.demo.session_factory(path)")
    if compare is not None and not callable(compare):
        raise ConfigError("compare must be a callable that returns a Session, e.g. qviz.demo.session_factory(path)")
    if not idle_s > 0:
        raise ConfigError(f"idle_s must be a number of seconds > 0, not {idle_s!r}")
    visitors = Visitors(max_sessions)
    port = int(port) or free_port(address)
    warning = exposure_warning(address, port)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    idle_ms = max(int(idle_s * 1000), 1)
    options = dict(port=port, address=address, websocket_origin=websocket_origins(address, port),
                   show=show, title=TITLE, verbose=verbose, start=True,
                   unused_session_lifetime_milliseconds=idle_ms,
                   check_unused_sessions_milliseconds=min(idle_ms, 1000))
    make_page = loading_app_for if slow else app_for

    def app():  # once per browser session (a plain function: Panel serves a partial as a pane)
        return visitor_page(functools.partial(make_page, factory, compare), visitors, idle_s)

    if not threaded:
        return pn.serve(app, threaded=False, **options)
    thread = pn.serve(app, threaded=True, **options)
    host = "127.0.0.1" if address in ("0.0.0.0", "") else "::1" if address == "::" else address
    _wait_for_port(host, port, thread)
    return RunningServer(url=f"http://{_url_host(host)}:{port}/", port=port, address=address, thread=thread,
                         visitors=visitors)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _wait_for_port(host: str, port: int, thread, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not thread.is_alive():
            raise QvizError(f"the qviz server on {host}:{port} stopped while starting (is the port taken?)")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    thread.stop()
    raise QvizError(f"the qviz server did not accept connections on {host}:{port} within {timeout:.0f} s")

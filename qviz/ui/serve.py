"""Serve the app: one fresh Session (from ``factory``) and one dashboard per browser session,
so what one visitor applies never changes what another sees. Binds 127.0.0.1 unless told."""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import panel as pn

from qviz.errors import ConfigError, QvizError
from qviz.ui.app import TITLE, build_app
from qviz.ui.markup import md
from qviz.ui.progress import TaskProgress, ui_caller

log = logging.getLogger(__name__)


def session_factory(path=None, *, demo: bool = False, check: bool = True) -> Callable:
    """A factory of fresh sessions: ``qviz.load(path)`` each call (never a pickle), or the demo.
    ``check`` opens the file once now, so a bad path fails here rather than in every tab."""
    if (path is None) == (not demo):
        raise ConfigError("give a session file path or demo=True (one of them)")
    if demo:
        from qviz.cli import demo_session

        return lambda: demo_session(progress=False)
    from qviz.session import load

    path = Path(path)
    if check:
        load(path)
    return lambda: load(path)


def app_for(factory: Callable, compare: Callable | None = None):
    """The app of one browser session: a fresh session from ``factory`` (and, with ``compare``, a
    fresh second session for the Compare tab); a failure to make them becomes an Alert page
    instead of a server error."""
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
    try:
        loopback = ipaddress.ip_address(address).is_loopback
    except ValueError:
        loopback = address == "localhost"
    if loopback:
        origins += [f"localhost:{port}", f"127.0.0.1:{port}"]
    return sorted(set(origins))


@dataclass
class RunningServer:
    """A server started with ``threaded=True``: its URL, and ``stop()``."""

    url: str
    port: int
    address: str
    thread: object

    def stop(self, timeout: float = 10.0) -> None:
        self.thread.stop()
        self.thread.join(timeout)


def serve(factory: Callable, *, compare: Callable | None = None, port: int = 0, address: str = "127.0.0.1",
          show: bool = True, threaded: bool = False, verbose: bool = True, slow: bool = False):
    """Serve the app, ``factory()`` giving a fresh Session for each browser session (and
    ``compare()``, when given, the second session of its Compare tab); ``slow``: the factory
    takes seconds (the demo calibrates), so each page shows progress while it runs.

    ``threaded=True`` returns a :class:`RunningServer` once it accepts connections; otherwise
    this blocks until the server stops (Ctrl-C).
    """
    if not callable(factory):
        raise ConfigError("factory must be a callable that returns a new Session, e.g. lambda: qviz.load(path)")
    if compare is not None and not callable(compare):
        raise ConfigError("compare must be a callable that returns a new Session, e.g. session_factory(path)")
    port = int(port) or free_port(address)
    options = dict(port=port, address=address, websocket_origin=websocket_origins(address, port),
                   show=show, title=TITLE, verbose=verbose, start=True)
    make_page = loading_app_for if slow else app_for
    app = lambda: make_page(factory, compare)  # noqa: E731 - called once per browser session
    if not threaded:
        return pn.serve(app, threaded=False, **options)
    thread = pn.serve(app, threaded=True, **options)
    host = "127.0.0.1" if address in ("0.0.0.0", "") else "::1" if address == "::" else address
    _wait_for_port(host, port, thread)
    return RunningServer(url=f"http://{_url_host(host)}:{port}/", port=port, address=address, thread=thread)


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

"""Server memory under visitors: RSS and live Sessions over 20 page visits, in headless chromium.

Two servers, each in this process on 127.0.0.1 (``qviz.ui.serve.serve``, as ``qviz serve``
runs it), visited 20 times each by a fresh browser context that loads the page until the
layer table shows its rows, then closes:

- ``file``: ``qviz serve demo.qviz`` — the file is loaded once and shared read-only.
- ``demo``: ``qviz serve --demo`` — every visitor gets a session of their own (a live demo
  session, re-quantizable), the worst case for memory.

After each visit it records the process RSS (/proc/self/status VmRSS) and the live ``Session``
and ``Dashboard`` objects (``gc``); after the last visit it waits for the idle timeout (how long
a closed page's session is kept for a reconnect) and records them again. Compared side by side
with a floor: the same 20 visits to a plain Panel page (one Tabulator, nothing of qviz), so
what Bokeh's server keeps per visitor is not blamed on qviz. Target: the sessions and
dashboards of closed pages are all freed, and RSS after the idle timeout is within 50 MiB of
its value after the first visit.

    python bench/server.py            # 20 visits per server
    python bench/server.py --visits 5
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
import warnings
from pathlib import Path

for _category in (DeprecationWarning, UserWarning, FutureWarning):
    warnings.filterwarnings("ignore", category=_category)

from ui import CHROMIUM, CHROMIUM_ARGS  # noqa: E402

IDLE_S = 3.0  # a closed page's session is dropped after this (qviz serve: 15 s)
GROWTH_TARGET_MIB = 50.0


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def live(cls) -> int:
    gc.collect()
    return sum(isinstance(o, cls) for o in gc.get_objects())


def floor_server():
    """A plain Panel page, one Tabulator of six rows and nothing of qviz, served with the same
    idle timeout; stopped like qviz's (``.stop()``), its ``url`` set."""
    import pandas as pd
    import panel as pn

    from qviz.ui.serve import _wait_for_port, free_port

    def page():
        return pn.widgets.Tabulator(pd.DataFrame({"layer": list("abcdef"), "sqnr": range(6)}))

    port, idle_ms = free_port("127.0.0.1"), int(IDLE_S * 1000)
    thread = pn.serve(page, port=port, address="127.0.0.1", show=False, verbose=False,
                      threaded=True, websocket_origin=f"127.0.0.1:{port}",
                      unused_session_lifetime_milliseconds=idle_ms,
                      check_unused_sessions_milliseconds=min(idle_ms, 1000))
    _wait_for_port("127.0.0.1", port, thread)  # as qviz's own serve() waits
    thread.url = f"http://127.0.0.1:{port}/"
    return thread


def visit(browser, url: str) -> None:
    context = browser.new_context()
    context.set_default_timeout(120_000)
    page = context.new_page()
    page.goto(url)
    page.locator(".tabulator-row").first.wait_for()
    context.close()


def measure(browser, name: str, start_server, visits: int) -> dict:
    from qviz.session import Session
    from qviz.ui.app import Dashboard

    server = start_server()
    rows = []
    try:
        for i in range(visits):
            visit(browser, server.url)
            rows.append((rss_mib(), live(Session), live(Dashboard)))
            print(f"  {name} visit {i + 1:>2}: RSS {rows[-1][0]:7.1f} MiB, live Sessions "
                  f"{rows[-1][1]}, Dashboards {rows[-1][2]}", flush=True)
        time.sleep(IDLE_S + 2.0)
        deadline = time.monotonic() + 60
        while live(Dashboard) and time.monotonic() < deadline:
            time.sleep(0.5)
        idle = (rss_mib(), live(Session), live(Dashboard))
    finally:
        server.stop()
    print(f"  {name} after idle: RSS {idle[0]:7.1f} MiB, live Sessions {idle[1]}, Dashboards {idle[2]}")
    return {"first": rows[0], "last": rows[-1], "idle": idle, "peak": max(r[0] for r in rows)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--visits", type=int, default=20)
    args = parser.parse_args(argv)

    from playwright.sync_api import sync_playwright

    from qviz.cli import demo_session
    from qviz.demo import session_factory
    from qviz.ui.serve import serve

    def start(factory, **options):
        return serve(factory, threaded=True, show=False, verbose=False, idle_s=IDLE_S, **options)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "demo.qviz"
        demo_session(progress=False).save(path)
        servers = {
            "floor": floor_server,
            "file": lambda: start(session_factory(path), max_sessions=args.visits + 1),
            "demo": lambda: start(session_factory(demo=True), max_sessions=args.visits + 1, slow=True),
        }
        print(f"server memory benchmark: {args.visits} visits per server, idle timeout {IDLE_S:.0f} s")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                results = {name: measure(browser, name, s, args.visits) for name, s in servers.items()}
            finally:
                browser.close()

    print(f"\n{'server':<6}  {'RSS 1st visit':>13}  {'peak':>7}  {'after idle':>10}  {'growth':>7}  "
          f"{'Sessions last/idle':>18}  {'Dashboards last/idle':>20}")
    met = True
    for name, r in results.items():
        growth = r["idle"][0] - r["first"][0]
        print(f"{name:<6}  {r['first'][0]:10.1f} MiB  {r['peak']:7.1f}  {r['idle'][0]:10.1f}  "
              f"{growth:+7.1f}  {r['last'][1]:>8} / {r['idle'][1]:<8}  {r['last'][2]:>9} / {r['idle'][2]:<9}")
        if name != "floor":
            met &= r["idle"][2] == 0 and growth <= GROWTH_TARGET_MIB
    floor_growth = results["floor"]["idle"][0] - results["floor"]["first"][0]
    for name in ("file", "demo"):
        growth = results[name]["idle"][0] - results[name]["first"][0]
        print(f"{name}: growth over the floor's {floor_growth:+.1f} MiB: {growth - floor_growth:+.1f} MiB")
    print(f"\ntarget: closed pages' dashboards all freed and growth <= {GROWTH_TARGET_MIB:.0f} MiB "
          f"-> {'met' if met else 'NOT met'}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())

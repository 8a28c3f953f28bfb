"""Time to first render of the served app for a 200-layer session, in headless chromium.

Model: ``nn.Sequential`` of 200 ``nn.Linear(16, 16)`` (orthogonal weights, so values neither
vanish nor explode along depth) quantized with ``qviz.Session(..., flow="fx")`` on two batches
of 8x16 random-normal inputs: 200 rows in the table, 200 points per line in the depth chart.

The session is computed once, before timing: the factory hands the same finished session to
every browser session, so what is timed is the UI only (server-side dashboard build, transfer,
browser layout and drawing). Each run opens a new browser context (empty cache) and times
``page.goto`` until the table shows its first row, the depth chart has drawn all 2 x 200 points
and the histogram and weight charts have their titles. Median of 3 runs (after one untimed
warm-up that pays the server's first-import costs) against the 2 s target. For scale it also
times a "floor", run for run alternating with the app: a Panel page with one plotly chart and
nothing of qviz (Bokeh's server loads all its bundles plus plotly.js, about 10 MB of
JavaScript, whatever the page holds), prints the median of the per-run ratios app / floor,
and reports the page's main-thread CPU time (Chrome's TaskDuration), steadier than wall time on
a busy machine.

Then Apply: in one page, select a layer, switch its weights to per-tensor in the config editor
and time the click on Apply until that layer's cell in the table shows the new scheme (the
server re-converts and re-measures the layer and those after it, the browser redraws the
table and the editor; the charts follow on the next tick of the page's event loop, after the
table); Undo, untimed, between runs. Median against the 1 s target.

    python bench/ui.py             # 3 runs
    python bench/ui.py --runs 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

for _category in (DeprecationWarning, UserWarning, FutureWarning):
    warnings.filterwarnings("ignore", category=_category)

TARGET_S = 2.0
APPLY_TARGET_S = 1.0
LAYERS = 200
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def synthetic_session(layers: int = LAYERS):
    """A finished FX session over ``layers`` Linear(16, 16) layers (a few seconds)."""
    import torch
    from torch import nn

    import qviz

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(layers)]).eval()
    with torch.no_grad():
        for layer in model:
            nn.init.orthogonal_(layer.weight)
            layer.bias.zero_()
    calib = [torch.randn(8, 16) for _ in range(2)]
    return qviz.Session(model, calib, flow="fx", backend="x86", eval_data=calib[:1], progress=False).run()


def first_render(browser, url: str, layers: int | None) -> tuple[float, float]:
    """(seconds from ``page.goto`` until the table, the full depth chart and both layer charts
    show, the page's main-thread CPU seconds by then). ``layers=None``: until any plotly chart."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(120_000)
    page = context.new_page()
    cdp = context.new_cdp_session(page)
    cdp.send("Performance.enable")
    try:
        start = time.perf_counter()
        page.goto(url)
        if layers is None:
            page.locator(".js-plotly-plot").first.wait_for()
        else:
            page.locator(".tabulator-row").first.wait_for()
            points = page.locator(".js-plotly-plot").filter(has_text="Error along depth").locator("path.point")
            page.locator(".gtitle", has_text="weight scale").wait_for()
            page.locator(".gtitle", has_text="output activation").wait_for()
            while points.count() < 2 * layers:  # plotly draws them in one go: this rarely loops
                page.wait_for_timeout(10)
        elapsed = time.perf_counter() - start
        metrics = {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}
        return elapsed, metrics["TaskDuration"]
    finally:
        context.close()


def apply_to_table(browser, url: str, layer: str, runs: int) -> list[float]:
    """Seconds from the click on Apply (per-channel -> per-tensor weights of ``layer``) until the
    layer's ``weight_qscheme`` cell in the table says per_tensor; one untimed warm-up, Undo between."""
    import re

    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(120_000)
    page = context.new_page()
    try:
        page.goto(url)
        name = page.locator('.tabulator-cell[tabulator-field="layer"]', has_text=re.compile(rf"^{layer}$"))
        row = page.locator(".tabulator-row").filter(has=name)
        scheme = row.locator('.tabulator-cell[tabulator-field="weight_qscheme"]')
        row.click()
        page.get_by_text(f"Configure {layer}").wait_for()
        times = []
        for i in range(runs + 1):
            page.locator(".bk-btn", has_text="per_tensor").click()
            start = time.perf_counter()
            page.locator(".bk-btn", has_text=re.compile(r"^Apply$")).click()
            while not scheme.inner_text().startswith("per_tensor"):
                page.wait_for_timeout(5)
            if i:  # the first is a warm-up
                times.append(time.perf_counter() - start)
            page.locator(".bk-btn", has_text="Undo").click()
            while not scheme.inner_text().startswith("per_channel"):
                page.wait_for_timeout(5)
        return times
    finally:
        context.close()


def floor_app():
    """The least a Panel page with one plotly chart costs here: the same JS bundles, no qviz."""
    import panel as pn
    import plotly.graph_objects as go

    return pn.Column(pn.pane.Markdown("floor"), pn.pane.Plotly(go.Figure(go.Scatter(x=[0, 1], y=[0, 1])), height=300))


def _serve_floor():
    """Serve :func:`floor_app` as :func:`qviz.ui.serve.serve` serves the app (same options)."""
    import panel as pn

    from qviz.ui.serve import RunningServer, Visitors, _wait_for_port, free_port, websocket_origins

    port = free_port()
    thread = pn.serve(floor_app, port=port, address="127.0.0.1", threaded=True, show=False, verbose=False,
                      websocket_origin=websocket_origins("127.0.0.1", port))
    _wait_for_port("127.0.0.1", port, thread)
    return RunningServer(url=f"http://127.0.0.1:{port}/", port=port, address="127.0.0.1", thread=thread,
                         visitors=Visitors())


def _side_by_side(browser, app_url: str, floor_url: str, layers: int, runs: int):
    """First renders of the app and of the floor, alternating so that both see the same machine
    load (one untimed warm-up each): ``(app runs, floor runs)``, each run ``(seconds, CPU seconds)``."""
    first_render(browser, app_url, layers)
    first_render(browser, floor_url, None)
    pairs = [(first_render(browser, app_url, layers), first_render(browser, floor_url, None)) for _ in range(runs)]
    return [app for app, _ in pairs], [floor for _, floor in pairs]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--layers", type=int, default=LAYERS)
    args = parser.parse_args(argv)

    from playwright.sync_api import sync_playwright

    from qviz.ui.app import build_app
    from qviz.ui.serve import serve

    t0 = time.perf_counter()
    session = synthetic_session(args.layers)
    rows = len(session.to_dataframe())
    print(f"session: {rows} layers in {time.perf_counter() - t0:.1f} s (not timed below)")
    build_app(session)  # warm the imports, then time one server-side build on its own
    t0 = time.perf_counter()
    build_app(session)
    print(f"server-side build_app: {time.perf_counter() - t0:.2f} s")

    server = serve(lambda: session, threaded=True, show=False, verbose=False)
    floor = _serve_floor()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                times, floors = _side_by_side(browser, server.url, floor.url, rows, args.runs)
                applies = apply_to_table(browser, server.url, str(session.to_dataframe().index[3]), args.runs)
            finally:
                browser.close()
    finally:
        server.stop()
        floor.stop()
    median = statistics.median(t for t, _ in times)
    cpu = statistics.median(c for _, c in times)
    floor_median = statistics.median(t for t, _ in floors)
    floor_cpu = statistics.median(c for _, c in floors)
    print("first render: " + ", ".join(f"{t:.2f}" for t, _ in times) + " s")
    print(f"floor (a Panel page with one plotly chart, no qviz): median {floor_median:.2f} s, "
          f"page CPU {floor_cpu:.2f} s")
    ratio = statistics.median(t / f for (t, _), (f, _) in zip(times, floors, strict=True))
    print(f"qviz / floor, run by run: median {ratio:.2f}x")
    verdict = "OK" if median <= TARGET_S else "SLOWER than"
    print(f"median time to first render ({rows} layers): {median:.2f} s (page CPU {cpu:.2f} s), "
          f"{verdict} the {TARGET_S:.0f} s target")
    apply_median = statistics.median(applies)
    verdict = "OK" if apply_median <= APPLY_TARGET_S else "SLOWER than"
    print("Apply to updated table: " + ", ".join(f"{t:.2f}" for t in applies) + " s")
    print(f"median time from Apply to updated table ({rows} layers): {apply_median:.2f} s, "
          f"{verdict} the {APPLY_TARGET_S:.0f} s target")
    return 0


if __name__ == "__main__":
    sys.exit(main())

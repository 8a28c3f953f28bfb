"""Shared fixtures: the demo's sessions, one run per flow for the whole test run
(``demo_sessions``), and a headless Debian chromium driven by Playwright for tests marked
``browser`` (the report's test opens its page in it too).

Without /usr/bin/chromium (or the playwright package) browser tests are skipped with the reason,
unless QVIZ_REQUIRE_BROWSER=1 (CI sets it), in which case they fail: CI must not go green by
skipping them.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def _run_demo(flow: str, short: bool):
    """The embedded demo model run on ``flow``: ``demo_session``'s default batches, or the short
    set (two calibration batches of 16, one evaluation batch of 32)."""
    from qviz.demo import calibration_batches, demo_session, eval_batches, load_demo_model
    from qviz.session import Session

    if not short:
        return demo_session(flow, progress=False)
    return Session(load_demo_model(), calibration_batches(2, 16), eval_data=eval_batches(1, 32), flow=flow,
                   progress=False).run()


@pytest.fixture(scope="session")
def demo_sessions():
    """``demo_sessions(flow="fx", short=False)``: a session of the demo model on ``flow``, a
    private copy for each call. Each (flow, short) runs once for the whole test run (the FX demo
    takes seconds, a deep copy a fraction of one), and what a test does to its copy (apply, a
    sweep, a save) reaches no other test. torchao's quantized tensors do not deep-copy: its demo
    runs afresh each call (a fraction of a second too)."""
    runs = {}

    def make(flow: str = "fx", *, short: bool = False):
        if flow == "torchao":
            return _run_demo(flow, short)
        if (flow, short) not in runs:
            runs[flow, short] = _run_demo(flow, short)
        return copy.deepcopy(runs[flow, short])

    return make


def _missing_browser() -> str | None:
    """Why browser tests cannot run here, or None when they can."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install playwright)"
    path = os.environ.get("QVIZ_CHROMIUM", CHROMIUM)
    if not (os.path.exists(path) or shutil.which(path)):
        return f"no chromium at {path} (apt-get install chromium, or set QVIZ_CHROMIUM)"
    return None


@pytest.fixture(scope="session")
def chromium_path() -> str:
    """The chromium executable; skips (or fails under QVIZ_REQUIRE_BROWSER=1) when there is none."""
    reason = _missing_browser()
    if reason is not None:
        if os.environ.get("QVIZ_REQUIRE_BROWSER") == "1":
            pytest.fail(f"QVIZ_REQUIRE_BROWSER=1 but browser tests cannot run: {reason}")
        pytest.skip(f"browser tests skipped: {reason}")
    return os.environ.get("QVIZ_CHROMIUM", CHROMIUM)


@pytest.fixture(scope="session")
def chromium(chromium_path):
    """One headless chromium for the whole run."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


class ConsoleLog:
    """Console errors and uncaught page errors seen by one page."""

    def __init__(self, page):
        self.errors: list[str] = []
        page.on("console", lambda msg: self.errors.append(f"console: {msg.text}") if msg.type == "error" else None)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))


@pytest.fixture
def new_page(chromium):
    """A factory of (page, ConsoleLog) pairs, each page in its own browser context (a browser
    session of its own); all closed at teardown."""
    contexts = []

    def make(width: int = 1400, height: int = 1000):
        context = chromium.new_context(viewport={"width": width, "height": height})
        context.set_default_timeout(60_000)
        contexts.append(context)
        page = context.new_page()
        return page, ConsoleLog(page)

    yield make
    for context in contexts:
        context.close()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """test-artifacts/ at the repository root (gitignored): screenshots for humans."""
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(autouse=True)
def torch_global_state_is_left_as_found():
    """Each test leaves torch's grad mode and quantized engine as it found them: a leak (an
    interrupt between ``torch.no_grad().__enter__`` and its ``__exit__``, say) would fail later,
    unrelated tests with "does not require grad"."""
    import torch

    grad, engine = torch.is_grad_enabled(), torch.backends.quantized.engine
    yield
    leaked = (torch.is_grad_enabled(), torch.backends.quantized.engine) != (grad, engine)
    torch.set_grad_enabled(grad)
    torch.backends.quantized.engine = engine
    assert not leaked, "the test changed torch's grad mode or quantized engine and left it so"

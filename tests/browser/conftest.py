"""Fixtures only the browser tests use; the chromium fixtures themselves are in tests/conftest.py
(the report's test opens its page in chromium too)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def minilm_server(chromium_path):
    """One live MiniLM session (short: two calibration batches) served to every browser session
    of the MiniLM browser tests (the Outliers and Groups tabs): built once for the run."""
    from qviz.demo.minilm import minilm_session
    from tests.browser.helpers import serve_recording

    session = minilm_session(progress=False, n_calib=2, n_eval=1)
    running = serve_recording(lambda: session)
    yield running
    running.stop()

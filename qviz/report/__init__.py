"""The sensitivity report: one self-contained HTML file (``session.report(path)``,
``qviz report session.qviz -o report.html``). See :mod:`qviz.report.html`."""

from __future__ import annotations

from qviz.report.html import build_report, write_report

__all__ = ["build_report", "write_report"]

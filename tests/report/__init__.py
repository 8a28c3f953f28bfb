"""Tests of qviz.report: the self-contained HTML report."""

"""The one home of qviz's results types: plain data (numpy arrays, pandas frames, no torch
modules) that analysis, the views, the report and the session file all read.

- :mod:`~qviz.results.records`: :class:`PointRecord`, and :func:`output_record`, the one rule
  for which record is a layer's output activation;
- :mod:`~qviz.results.results`: :class:`Results`, what a session found;
- :mod:`~qviz.results.timeline`: :class:`Timeline`, a QAT run.

This package imports nothing of qviz but :mod:`qviz.errors` (tests/test_architecture.py holds it
to that): capture and analysis fill these types, :mod:`qviz.io` writes and reads them.
"""

from qviz.results.records import (
    OUTPUT_ROLES,
    PER_TENSOR,
    PointRecord,
    clip_fraction,
    output_record,
    scalar,
)
from qviz.results.results import LEADING_COLUMNS, Results
from qviz.results.timeline import Timeline

__all__ = ["LEADING_COLUMNS", "OUTPUT_ROLES", "PER_TENSOR", "PointRecord", "Results", "Timeline", "clip_fraction",
           "output_record", "scalar"]

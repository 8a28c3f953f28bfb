"""Every plotly figure qviz draws, shared by the dashboard (:mod:`qviz.ui`) and the HTML report
(:mod:`qviz.report`): pure functions, plain data in (frames, point records, a timeline, a laid-out
graph), ``go.Figure`` out; no Panel, no session, so each figure is testable on its own.

One module per subject: :mod:`~qviz.charts.layout` (the house look, shared by all),
:mod:`~qviz.charts.layers` (error along depth, histograms, weight scales),
:mod:`~qviz.charts.sensitivity`, :mod:`~qviz.charts.outliers`, :mod:`~qviz.charts.groups`,
:mod:`~qviz.charts.algorithms`, :mod:`~qviz.charts.pareto`, :mod:`~qviz.charts.qat`,
:mod:`~qviz.charts.graph`, :mod:`~qviz.charts.compare`. A new chart goes in the module of its
subject (a new one for a new subject) and imports only ``layout`` of qviz.charts.
"""

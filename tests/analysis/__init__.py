"""Tests of qviz.analysis: sensitivity, search, diagnosis, groups, outliers, algorithms and the rest."""

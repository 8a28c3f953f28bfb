"""Tests of qviz.capture: recorded statistics, histograms and the QAT recorder."""

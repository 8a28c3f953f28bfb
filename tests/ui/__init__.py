"""Browserless tests of qviz.ui: views checked through their widgets and the models Panel sends."""

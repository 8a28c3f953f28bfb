"""Tests of qviz.flows: each flow on the demo and on real model code, against plain torch and torchao."""

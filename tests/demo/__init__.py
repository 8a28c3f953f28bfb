"""Tests of qviz.demo: the embedded digits, MiniLM and TinyLM demos."""

"""Tests of qviz.io: the session file and the Model Explorer export."""

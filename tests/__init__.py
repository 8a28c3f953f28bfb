"""The test suite; its folders mirror the qviz package, shared helpers and fixtures sit here."""

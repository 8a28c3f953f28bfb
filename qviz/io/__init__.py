"""Files: the session file container (:mod:`~qviz.io.session_file`), the encoding of results and
QAT timelines in it (:mod:`~qviz.io.results_file`), atomic writes, the Model Explorer export."""

"""The sensitivity sweep on a real dask.distributed cluster with worker processes: the figures
equal the serial sweep's exactly (the README's ``executor=Client(...).get_executor()``)."""

from __future__ import annotations

import os

import pandas as pd
import pytest

distributed = pytest.importorskip("distributed", reason="dask is in the test extra: pip install -e '.[test]'")

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")]


def test_a_local_cluster_of_worker_processes_gives_the_serial_figures(demo_sessions):
    s = demo_sessions(short=True)
    serial = s.sensitivity().to_dataframe()
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        pids = set(client.run(os.getpid).values())
        assert len(pids) == 2 and os.getpid() not in pids  # two processes of their own
        with distributed.get_task_stream(client) as tasks:
            spread = s.sensitivity(executor=client.get_executor()).to_dataframe()
        units = [t for t in tasks.data if "_measure_chunk" in t["key"]]  # the work ran on both workers
        assert len(units) == 2 and {t["worker"] for t in units} == set(client.scheduler_info()["workers"])
    pd.testing.assert_frame_equal(spread, serial, check_exact=True)

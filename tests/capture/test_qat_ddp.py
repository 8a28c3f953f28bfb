"""qviz.watch in a 2-process torch.distributed job (gloo on CPU, DistributedDataParallel): each rank
sees half of every batch, and the timeline rank 0 writes equals one process's seeing all of it."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.ao import quantization as tq
from torch.ao.nn.intrinsic.qat import freeze_bn_stats

import qviz
from qviz.capture.qat import timeline_histogram
from qviz.demo import load_demo_model, load_digits_split
from qviz.io.results_file import load_timeline, save_timeline

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning"
)

STEPS, BATCH, WORLD = 6, 32, 2


def qat_model() -> nn.Module:
    """The demo model under eager QAT, calibrated, then fake-quant off and BN frozen: each sample's
    activations no longer depend on the rest of its batch, so halves combine exactly (observers
    still run)."""
    torch.manual_seed(0)
    model = load_demo_model().train()
    model.qconfig = tq.get_default_qat_qconfig("x86")
    tq.fuse_modules_qat(model, model.fusion_groups(), inplace=True)
    tq.prepare_qat(model, inplace=True)
    x, _ = load_digits_split()["train"]
    with torch.no_grad():
        model(x[:BATCH])
    model.apply(tq.disable_fake_quant)
    model.apply(freeze_bn_stats)
    return model


def run(model: nn.Module, rank: int = 0, world: int = 1):
    """Forward and backward on this rank's share of each batch (no optimizer step, so weights stay
    equal to the single process's)."""
    x, y = load_digits_split()["train"]
    with qviz.watch(model, every=1, histograms_every=2) as rec:
        for step in range(STEPS):
            xs, ys = x[step * BATCH : (step + 1) * BATCH], y[step * BATCH : (step + 1) * BATCH]
            share = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
            loss = nn.functional.cross_entropy(model(xs[share]), ys[share])
            loss.backward()
            rec.log(loss=loss.item())
    return rec


def worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        ddp = nn.parallel.DistributedDataParallel(qat_model())
        rec = run(ddp, rank, WORLD)
        written = save_timeline(rec.timeline(), os.path.join(out, "timeline.qviz"))
        with open(os.path.join(out, f"rank{rank}"), "w") as fh:
            fh.write(str(written))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_grid(h, width: float) -> dict[int, int]:
    """Counts of a dyadic histogram re-binned to the coarser dyadic ``width``."""
    a = h.to_arrays()
    n, shift = round(float(a["lo"] / a["width"])), round(np.log2(width / float(a["width"])))
    out: dict[int, int] = {}
    for k in np.flatnonzero(a["counts"]):
        out[(n + int(k)) >> shift] = out.get((n + int(k)) >> shift, 0) + int(a["counts"][k])
    return out


def test_two_ranks_combine_to_one_process_seeing_all_the_data(tmp_path):
    torch.set_num_threads(1)
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    assert [(tmp_path / f"rank{r}").read_text() for r in range(WORLD)] == ["True", "False"]
    both = load_timeline(tmp_path / "timeline.qviz")
    one = run(qat_model()).timeline()
    assert both.meta["world_size"] == 2 and both.meta["steps"] == one.meta["steps"] == STEPS
    assert both.arrays["steps"].tolist() == list(range(STEPS)) and both.events == one.events == []
    assert [p["name"] for p in both.points] == [p["name"] for p in one.points]
    for p in one.points:
        name = p["name"]
        for quantity in ("min", "max"):  # min of minima / max of maxima after the first step
            np.testing.assert_array_equal(both.series(name, quantity)[1][0], one.series(name, quantity)[1][0])
        if p["role"] == "weight":  # the same weights on every rank
            np.testing.assert_array_equal(both.series(name, "scale")[1], one.series(name, "scale")[1])
            np.testing.assert_array_equal(both.series(name, "weight_int")[1], one.series(name, "weight_int")[1])
        for step in one.arrays["hist_steps"]:  # merged (activations) or rank 0's (weights): what one process saw
            a, b = timeline_histogram(both, name, int(step)), timeline_histogram(one, name, int(step))
            assert (a.total, a.min, a.max) == (b.total, b.min, b.max), name
            width = max(a.width, b.width)
            assert on_grid(a, width) == on_grid(b, width), name
    np.testing.assert_allclose(both.scalars().loss, one.scalars().loss, rtol=1e-5)

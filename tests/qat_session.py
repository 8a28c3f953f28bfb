"""A short real QAT run of the demo model for the UI tests: FX prepare_qat_fx, 20 SGD steps
recorded by ``qviz.watch`` (a snapshot every 2 steps, a histogram every 5), observers disabled
at step 12 and BN statistics frozen at step 16, loss and kd_loss logged; about 3 s on one core."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.ao import quantization as tq
from torch.ao.nn.intrinsic.qat import freeze_bn_stats
from torch.ao.quantization.quantize_fx import prepare_qat_fx

import qviz
from qviz.demo import calibration_batches, load_demo_model, load_digits_split

STEPS, EVERY, HISTOGRAMS_EVERY = 20, 2, 5
OBSERVERS_OFF, BN_FROZEN = 12, 16
BATCH = 32


def qat_session(steps: int = STEPS):
    """``Session.from_qat`` of the run (its timeline in ``results.timeline``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # more threads on a busy 2-core machine make each step slower
    try:
        torch.manual_seed(0)
        x, y = load_digits_split()["train"]
        model = copy.deepcopy(load_demo_model()).train()
        qat = prepare_qat_fx(model, tq.get_default_qat_qconfig_mapping("x86"), (x[:BATCH],))
        opt = torch.optim.SGD(qat.parameters(), lr=0.05)
        with qviz.watch(qat, every=EVERY, histograms_every=HISTOGRAMS_EVERY) as rec:
            for step in range(steps):
                if step == OBSERVERS_OFF:
                    qat.apply(tq.disable_observer)
                if step == BN_FROZEN:
                    qat.apply(freeze_bn_stats)
                i = (step * BATCH) % (len(x) - BATCH)
                loss = nn.functional.cross_entropy(qat(x[i : i + BATCH]), y[i : i + BATCH])
                loss.backward()
                opt.step()
                opt.zero_grad()
                rec.log(loss=loss.item(), kd_loss=loss.item() / 2)
        return qviz.Session.from_qat(qat, rec, calibration_batches(2, BATCH), progress=False)
    finally:
        torch.set_num_threads(threads)

"""What lets a 100M+ parameter model run a session (issue 16, bench/llm.py). Memory: the dynamic
and torchao flows' quantized model shares the reference's unquantized tensors, weight records
hold views, sizes are counted without a copy, histograms bin in chunks. Time: the sweep of a
model that is not an FX graph replays the modules that ran before the swapped layer. Each is
checked against plain torch, or the same figures computed without the saving.
"""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.ao.quantization as tq
from torch import nn

import qviz
from qviz.analysis.compare import serialized_size
from qviz.capture import histogram
from qviz.capture.histogram import StreamingHistogram
from tests.helpers import assert_unchanged, model_snapshot
from tests.real_models import llama

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning"
)


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _sqnr(x: torch.Tensor, y: torch.Tensor) -> float:
    return 20 * math.log10(float(x.norm()) / float((x - y).norm()))


@pytest.mark.parametrize("flow", ["dynamic", "torchao"])
def test_quantized_model_shares_the_unquantized_tensors(flow):
    model, calib, evals = llama()
    before = model_snapshot(model)
    s = qviz.Session(model, calib, flow=flow, eval_data=evals, progress=False).run()
    reference, quantized = s.float_model(), s.quantized_model()
    ref_params = dict(reference.named_parameters())
    shared = {n for n, p in quantized.named_parameters() if n in ref_params and p is ref_params[n]}
    assert "model.embed_tokens.weight" in shared and "model.norm.weight" in shared
    quantized_layers = list(s.to_dataframe().index[s.to_dataframe()["quantized"].astype(bool)])
    assert quantized_layers and not any(n.startswith(tuple(quantized_layers)) for n in shared)
    # the quantize step did not write into the shared float tensors: they are still the user's
    for name, p in ref_params.items():
        assert torch.equal(p, model.get_parameter(name)), name
    assert_unchanged(model, before)
    # the figures are plain torch's: the same quantization on a full copy of the model
    if flow == "dynamic":
        plain = tq.quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear}, dtype=torch.qint8)
    else:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, PerRow, quantize_

        plain = copy.deepcopy(model).eval()
        quantize_(plain, Int8DynamicActivationInt8WeightConfig(granularity=[PerRow(), PerRow()]))
    with torch.no_grad():
        expected = _sqnr(model(**evals[0]).logits, plain(**evals[0]).logits)
    assert s.summary()["output_sqnr"] == pytest.approx(expected, abs=1e-3)


def test_weight_record_keeps_a_view_of_the_reference_weight():
    model, calib, evals = llama()
    s = qviz.Session(model, calib, flow="dynamic", eval_data=evals, progress=False).run()
    layer = "model.layers.0.mlp.down_proj"
    kept = s._weights[layer]["float_weight"]
    weight = s.float_model().get_submodule(layer).weight
    assert _storage(kept) == _storage(weight) and torch.equal(kept, weight.reshape(-1))
    # its histogram is the weight's: np.histogram over the record's own edges
    record = s.record(f"{layer}.weight")
    hist = record.stats.histogram
    assert np.array_equal(hist.counts, np.histogram(weight.detach().double().numpy().ravel(), bins=hist.edges)[0])


def test_serialized_size_is_torch_save_bytes():
    model, _, _ = llama()
    quantized = tq.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
    for m in (model, quantized):
        buffer = io.BytesIO()
        torch.save(m.state_dict(), buffer)
        assert serialized_size(m) == buffer.tell() > 0


def test_histogram_bins_in_chunks_exactly(monkeypatch):
    rng = np.random.default_rng(3)
    data = [rng.standard_t(2, size=n).astype(np.float32) for n in (1000, 37, 5001)]
    whole = StreamingHistogram(512)
    for x in data:
        whole.update(torch.from_numpy(x))
    monkeypatch.setattr(histogram, "CHUNK", 64)  # many chunks per update, a ragged last one
    chunked = StreamingHistogram(512)
    for x in data:
        chunked.update(torch.from_numpy(x))
    everything = np.concatenate(data).astype(np.float64)
    assert np.array_equal(chunked.counts, np.histogram(everything, bins=chunked.edges)[0])
    assert np.array_equal(chunked.counts, whole.counts) and chunked.total == everything.size


def _sweep_counting(session, monkeypatch) -> tuple[pd.DataFrame, int]:
    """The sweep's frame and how many times an embedding lookup really ran (a replayed module's
    instance forward shadows the class's, which counts)."""
    calls, lookup = [], nn.Embedding.forward

    def counted(self, *args, **kwargs):
        calls.append(1)
        return lookup(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(nn.Embedding, "forward", counted)
        frame = session.sensitivity(progress=False).to_dataframe()
    return frame, len(calls)


def test_sweep_replays_what_ran_before_the_swapped_layer(monkeypatch):
    model, calib, evals = llama()
    s = qviz.Session(model, calib, flow="torchao", eval_data=evals + evals, progress=False).run()
    replayed, ran = _sweep_counting(s, monkeypatch)
    s.cache_bytes = 0  # no room for the module outputs: every mixed model runs in full
    full, ran_full = _sweep_counting(s, monkeypatch)
    pd.testing.assert_frame_equal(replayed, full, check_exact=True)
    swept = int(s.to_dataframe()["quantized"].astype(bool).sum())
    assert ran_full >= 2 * swept  # each quantize_only figure runs the reference on both batches
    assert ran <= 3 * 2  # per batch: the plain run and two checks that replaying is faithful


class _Flag(nn.Module):
    """Sets a flag the model's forward reads after its last layer: a side effect that a
    replayed module would skip."""

    fired = False

    def forward(self, x):
        self.fired = True
        return x


class _SideEffect(nn.Module):
    def __init__(self):
        super().__init__()
        self.flag, self.fc1, self.fc2 = _Flag(), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        y = self.fc2(self.fc1(self.flag(x)))
        out = y if self.flag.fired else -y
        self.flag.fired = False
        return out


def test_sweep_runs_in_full_where_replaying_is_not_faithful():
    torch.manual_seed(0)
    model = _SideEffect().eval()
    data = [torch.randn(4, 8) for _ in range(2)]
    s = qviz.Session(model, data, flow="dynamic", progress=False).run()
    frame = s.sensitivity(progress=False).to_dataframe()
    quantized = s.quantized_model()
    for layer in ("fc1", "fc2"):  # plain torch: the float model with that one layer quantized
        mixed = copy.deepcopy(model)
        setattr(mixed, layer, getattr(quantized, layer))
        with torch.no_grad():
            expected = _sqnr(model(data[0]), mixed(data[0]))
        assert frame.loc[layer, "quantize_only"] == pytest.approx(expected, abs=1e-4)

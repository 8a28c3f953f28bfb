"""Every flow on a corpus of real architectures (tests/real_models.py), as a new user runs it.

For each (model, flow) that the flow can take: run, one row per quantized op with finite
figures, output_sqnr equal to an independent computation with plain forward hooks that clone,
two one-layer apply() changes, undo, save/load, report, and the float model unchanged. Where
torch itself cannot quantize a case, the QvizError and its advice are asserted instead.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

import qviz
from qviz.errors import ModelError
from tests.helpers import assert_unchanged, model_snapshot
from tests.real_models import BUILDERS

pytest.importorskip("transformers", reason="transformers is in the test extra: pip install -e '.[test]'")
pytest.importorskip("torchao", reason="torchao is in the test extra: pip install -e '.[test]'")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning"),
]

OK = None
# (model, flow) -> None when the flow takes the model, else (error class, advice the message gives)
CASES = {
    ("bert", "dynamic"): OK, ("bert", "torchao"): OK, ("bert", "pt2e"): OK,
    ("bert", "fx"): (ModelError, r"flow=.pt2e."),
    ("bert", "eager"): (ModelError, r"QuantStub"),
    ("gpt2", "torchao"): OK, ("gpt2", "dynamic"): OK, ("gpt2", "pt2e"): OK,
    ("llama", "dynamic"): OK, ("llama", "torchao"): OK, ("llama", "pt2e"): OK,
    ("vit", "dynamic"): OK, ("vit", "torchao"): OK, ("vit", "pt2e"): OK,
    ("lstm_lm", "dynamic"): OK, ("lstm_lm", "torchao"): OK, ("lstm_lm", "fx"): OK,
    ("gru_lm", "dynamic"): OK,
    ("inplace_cnn", "fx"): OK, ("inplace_cnn", "pt2e"): OK, ("inplace_cnn_wrapped", "eager"): OK,
    ("functional_head", "fx"): OK, ("functional_head", "pt2e"): OK,
    ("functional_head_wrapped", "eager"): (ModelError, r"F\.linear|functional|flow=.fx."),
    ("chunk", "fx"): OK, ("chunk", "pt2e"): OK,
    ("chunk_wrapped", "eager"): (ModelError, r"not implemented for quantized tensors.*FloatFunctional"),
    ("reused_relu", "fx"): OK,
    ("reused_relu", "pt2e"): (ModelError, r"separate|once|relu"),
    ("layer_scale", "fx"): OK, ("layer_scale", "pt2e"): OK,
    ("user_fused", "eager"): OK, ("user_fused", "fx"): OK,
}


def _call(model, batch):
    if isinstance(batch, dict):
        return model(**batch)
    return model(*batch) if isinstance(batch, (tuple, list)) else model(batch)


def _recorded(model, names, batches):
    """Each named module's output tensor per batch, cloned the moment it is produced."""
    seen = {n: [] for n in names}

    def hook(name):
        def record(module, args, output):
            while isinstance(output, (tuple, list)):
                output = output[0]
            seen[name].append(output.dequantize() if output.is_quantized else output.detach().clone())
        return record

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            for b in batches:
                _call(model, b)
    finally:
        for h in handles:
            h.remove()
    return seen


def _independent_output_sqnr(session, layers, batches) -> dict[str, float]:
    """SQNR of each layer's quantized output vs its float output, from our own clone hooks."""
    ref, q = session.float_model(), session.quantized_model()
    names = [n for n in layers if _has(ref, n) and _has(q, n)]
    x, y = _recorded(ref, names, batches), _recorded(q, names, batches)
    out = {}
    for n in names:
        if len(x[n]) != len(batches) or len(y[n]) != len(batches):
            continue  # a module called several times per forward: rows are per call there
        signal = sum(float((a.double() ** 2).sum()) for a in x[n])
        noise = sum(float(((a.double() - b.double()) ** 2).sum()) for a, b in zip(x[n], y[n], strict=True))
        out[n] = math.inf if noise == 0 else 10 * math.log10(signal / noise)
    return out


def _has(model, name) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def _figures(df):
    return df[["weight_sqnr", "local_sqnr", "output_sqnr"]].astype(float)


@pytest.mark.parametrize(("name", "flow"), sorted(CASES), ids=[f"{m}-{f}" for m, f in sorted(CASES)])
def test_flow_on_real_model(name, flow, tmp_path):
    model, calib, evals = BUILDERS[name]()
    before = model_snapshot(model)
    expected = CASES[(name, flow)]
    if expected is not OK:
        error, advice = expected
        with pytest.raises(error) as caught:
            qviz.Session(model, calib, flow=flow, eval_data=evals, progress=False).run()
        assert re.search(advice, str(caught.value)), str(caught.value)
        assert_unchanged(model, before)
        return

    s = qviz.Session(model, calib, flow=flow, eval_data=evals, progress=False).run()
    df = s.to_dataframe()
    quantized = list(df.index[df["quantized"].astype(bool)])
    assert quantized, f"{name}/{flow}: no layer was quantized"
    assert df.index.is_unique
    figures = _figures(df.loc[quantized])
    assert np.isfinite(figures.to_numpy()).all(), figures[~np.isfinite(figures).all(axis=1)]
    assert math.isfinite(s.summary()["output_sqnr"])
    for batch in calib:  # integer inputs stayed integer: the batches are the user's own objects
        values = batch.values() if isinstance(batch, dict) else [batch]
        assert all(v.dtype in (torch.long, torch.float32) for v in values)

    mine = _independent_output_sqnr(s, quantized, evals)
    for layer, value in mine.items():
        assert df.loc[layer, "output_sqnr"] == pytest.approx(value, abs=0.05), layer

    # two one-layer changes, then undo back to the first
    last, first = quantized[-1], quantized[0]
    s.apply({last: {"dtype": "float"}})
    after_one = s.to_dataframe()
    assert after_one.loc[last, "dtype"] == "float"
    assert not bool(after_one.loc[last, "quantized"])
    if first != last:
        s.apply({first: {"dtype": "float"}})
        assert s.to_dataframe().loc[first, "dtype"] == "float"
    else:
        s.apply({last: {"dtype": "int8"}})
    s.undo()
    np.testing.assert_allclose(_figures(s.to_dataframe()).to_numpy(), _figures(after_one).to_numpy(), rtol=1e-6)

    path = tmp_path / "s.qviz"
    s.save(path)
    loaded = qviz.load(path).to_dataframe()
    np.testing.assert_allclose(_figures(loaded).to_numpy(), _figures(s.to_dataframe()).to_numpy(), rtol=1e-6)
    report = s.report(tmp_path / "r.html")
    assert report.stat().st_size > 10_000
    assert_unchanged(model, before)

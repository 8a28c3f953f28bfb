"""Sensitivity sweeps under a faulty eval_fn or executor (the failing layer named, the others kept,
NaN ranked last with a warning, a non-number refused) and inputs that would give wrong numbers."""

from __future__ import annotations

import math
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import qviz
from qviz.errors import ConfigError, QvizError, SweepError

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::FutureWarning", "ignore:.*quantized tensor.*"
)

X = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)).eval()


with torch.no_grad():
    TARGET = _model()(X)


def _alone(model: nn.Module) -> str | None:
    """The layer quantized alone in a sweep's mixed float model (None: no layer swapped)."""
    return next((n for n, m in model.named_modules() if type(m).__name__ == "QuantizedOnly"), None)


# eval_fns at module level: executors pickle them
def closeness(model):
    with torch.no_grad():
        return -float(((model(X) - TARGET) ** 2).mean())


def fails_on_layer_2(model):
    if _alone(model) == "2":
        raise RuntimeError("out of GPU memory on this one")
    return closeness(model)


def nan_on_layer_2(model):
    return math.nan if _alone(model) == "2" else closeness(model)


def always_fails(model):
    raise ValueError("no labels given")


@pytest.fixture(scope="module")
def session():
    return qviz.Session(_model(), [X[:32], X[32:]], eval_data=[X], progress=False).run()


@pytest.fixture(scope="module")
def clean(session):
    return session.sensitivity(eval_fn=closeness).to_dataframe()


@pytest.mark.parametrize("executor", [None, ThreadPoolExecutor])
def test_eval_fn_failing_on_one_layer_names_it_and_keeps_the_others(session, clean, executor):
    if executor is None:
        with pytest.raises(SweepError, match=r"eval_fn failed on 1 of 3 layers \(2\)") as info:
            session.sensitivity(eval_fn=fails_on_layer_2)
    else:
        with executor(max_workers=2) as pool, pytest.raises(SweepError, match=r"failed on 1 of 3") as info:
            session.sensitivity(eval_fn=fails_on_layer_2, executor=pool)
    error = info.value
    assert error.layers == ["2"] and isinstance(error.__cause__, RuntimeError)
    assert "out of GPU memory" in str(error)
    partial = error.partial.to_dataframe()
    assert error.partial.failed == {"2": "RuntimeError: out of GPU memory on this one"}
    assert partial.index[-1] == "2" and partial.loc["2", ["quantize_only", "sensitivity"]].isna().all()
    pd.testing.assert_frame_equal(partial.drop(index="2").drop(columns="rank"),
                                  clean.drop(index="2").drop(columns="rank"))
    assert session.results.sensitivity is not None  # the earlier complete sweep is kept


def test_eval_fn_failing_on_the_float_model_stops_at_once(session):
    with pytest.raises(QvizError, match="failed on the float model, before any layer") as info:
        session.sensitivity(eval_fn=always_fails)
    assert isinstance(info.value.__cause__, ValueError)


def test_nan_ranks_last_with_a_warning_naming_the_layer(session, clean):
    with pytest.warns(UserWarning, match=r"sensitivity of 1 layer\(s\) is NaN, ranked last: 2 "):
        found = session.sensitivity(eval_fn=nan_on_layer_2)
    frame = found.to_dataframe()
    assert found.nonfinite == ("2",) and frame.attrs["nonfinite"] == ["2"]
    assert list(frame.index) == [n for n in clean.index if n != "2"] + ["2"]
    assert list(frame["rank"]) == [1, 2, 3]


@pytest.mark.parametrize("value", [lambda m: torch.tensor(closeness(m)), lambda m: np.float32(closeness(m)),
                                   lambda m: torch.tensor([closeness(m)])])
def test_a_one_element_tensor_or_numpy_number_is_a_number(session, clean, value):
    frame = session.sensitivity(eval_fn=value).to_dataframe()
    np.testing.assert_allclose(frame.loc[clean.index, "quantize_only"], clean["quantize_only"], rtol=1e-6)


@pytest.mark.parametrize("value, what", [(lambda m: "0.93", "str"), (lambda m: m(X), r"Tensor of shape \(64, 8\)"),
                                         (lambda m: None, "NoneType"), (lambda m: True, "bool")])
def test_an_eval_fn_returning_no_number_is_refused(session, value, what):
    with pytest.raises(ConfigError, match=f"eval_fn\\(model\\) must return a number.*got {what}"):
        session.sensitivity(eval_fn=value)


def test_an_executor_already_shut_down_is_refused_clearly(session):
    pool = ThreadPoolExecutor(max_workers=2)
    pool.shutdown()
    with pytest.raises(QvizError, match="executor= did not take the sweep's work.*shut down") as info:
        session.sensitivity(executor=pool)
    assert isinstance(info.value.__cause__, RuntimeError)


def test_no_warning_when_every_figure_is_finite(session):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", ".*quantized tensor.*")
        session.sensitivity(eval_fn=closeness)


# -- inputs that would give wrong numbers silently ------------------------------------------------
def test_nan_weights_are_named_and_top1_is_nan_not_zero():
    model = _model()
    with torch.no_grad():
        model[4].weight[0, 0] = math.nan  # every sample's first class score is NaN
    with pytest.warns(UserWarning, match=r"NaN/Inf values in the float weights of 4:") as seen:
        s = qviz.Session(model, [X[:32], X[32:]], eval_data=[X], progress=False).run()
    assert sum("NaN/Inf values" in str(w.message) for w in seen) == 1
    assert math.isnan(s.summary()["top1_agreement"]) and math.isnan(s.summary()["output_sqnr"])
    assert np.isfinite(s.to_dataframe().loc["0", "output_sqnr"])  # upstream of the NaN: measured


def test_nan_eval_inputs_are_named_and_top1_counts_the_finite_samples():
    bad = X.clone()
    bad[5, 3] = math.nan
    with pytest.warns(UserWarning, match=r"NaN/Inf values in eval_data batch\(es\) 1:"):
        s = qviz.Session(_model(), [X[:32]], eval_data=[X[:32], bad], progress=False).run()
    with torch.no_grad():  # top-1 of the quantized vs float model, by hand, on the 63 finite samples
        keep = torch.ones(96, dtype=torch.bool)
        keep[32 + 5] = False
        inputs = torch.cat([X[:32], bad])[keep]
        expected = (s.float_model()(inputs).argmax(1) == s.quantized_model()(inputs).argmax(1)).float().mean()
    assert s.summary()["top1_agreement"] == pytest.approx(float(expected))


@pytest.mark.parametrize("flow, error, what", [
    ("fx", ConfigError, "no layer of this model was quantized by flow='fx'.*nn.Linear, nn.Conv1d/2d/3d"),
    # the dynamic flow knows before preparing: it names what it quantizes and what the model has
    ("dynamic", qviz.ModelError, "the dynamic flow quantized nothing in Sequential.*Linear/LSTM/GRU.*no layers with weights"),
])
def test_a_model_with_no_quantizable_layer_says_what_qviz_quantizes(flow, error, what):
    with pytest.raises(error, match=what):
        qviz.Session(nn.Sequential(nn.ReLU()), [X], flow=flow, progress=False).run()

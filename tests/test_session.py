"""The Session facade over every flow: results, the float model left alone, bad input, files."""

from __future__ import annotations

import copy
import math
import pickle
import zipfile

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.ao.quantization import (
    QConfigMapping,
    default_qconfig,
    fuse_modules_qat,
    get_default_qat_qconfig,
    get_default_qat_qconfig_mapping,
    prepare_qat,
)
from torch.ao.quantization.quantize_fx import prepare_qat_fx

import qviz
from qviz.demo import calibration_batches, eval_batches, load_demo_model
from qviz.models import tiny_lstm_classifier, tiny_mlp
from tests.helpers import assert_unchanged, model_snapshot

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning"
)

CALIB = calibration_batches(2, 16)
EVAL = eval_batches(1, 32)
CONVS = ["stem_conv", "block_conv1", "block_conv2", "down_conv", "fc1", "fc2"]


def _qat_fx(model):
    qat = prepare_qat_fx(copy.deepcopy(model).train(), get_default_qat_qconfig_mapping("x86"), (CALIB[0],))
    for x in CALIB:
        qat(x)
    return qat


def _qat_eager(model):
    qat = copy.deepcopy(model).train()
    qat.qconfig = get_default_qat_qconfig("x86")
    fuse_modules_qat(qat, qat.fusion_groups(), inplace=True)
    prepare_qat(qat, inplace=True)
    for x in CALIB:
        qat(x)
    return qat


@pytest.fixture(scope="module")
def fx_session(demo_sessions):
    return demo_sessions(short=True)


# -- results ---------------------------------------------------------------------------------
def test_frame_has_one_row_per_quantized_layer(fx_session):
    df = fx_session.to_dataframe()
    assert list(df.index) == CONVS  # execution order, fused groups named by their first module
    for col in ["weight_sqnr", "local_sqnr", "output_sqnr", "mse", "cosine", "max_abs_err",
                "dtype", "qscheme", "observer", "scale", "zero_point", "min", "max", "clip_frac",
                "nonfinite"]:
        assert col in df.columns, col
    assert (df.dtype == "quint8").all() and (df.observer == "histogram").all()
    assert df.weight_qscheme.str.startswith("per_channel").all()  # x86 default
    assert df[["weight_sqnr", "local_sqnr", "output_sqnr"]].gt(20).all().all()
    assert df.cosine.between(0.99, 1.0).all()
    # error accumulates along the network: the last layer's output error exceeds its own
    assert df.loc["fc2", "output_sqnr"] < df.loc["fc2", "local_sqnr"]


def test_qparams_and_ranges_match_the_observers(fx_session):
    df, points = fx_session.to_dataframe(), fx_session.points()
    fc1 = points[(points.layer == "fc1") & (points.role == "output")].iloc[0]
    assert df.loc["fc1", "scale"] == fc1.scale and df.loc["fc1", "zero_point"] == fc1.zero_point
    rec = fx_session.record(fc1.name)
    assert rec.stats.min == df.loc["fc1", "min"] >= 0  # after the fused ReLU
    lo, hi = (0 - fc1.zero_point) * fc1.scale, (127 - fc1.zero_point) * fc1.scale  # reduce_range
    assert df.loc["fc1", "clip_frac"] == pytest.approx(rec.stats.histogram.fraction_outside(lo, hi))
    weights = points[points.role == "weight"]
    assert set(weights.layer) == set(CONVS) and weights.per_channel.all()


def test_summary_model_level(fx_session):
    s = fx_session.summary()
    assert 20 < s["output_sqnr"] < 60
    assert 0.9 <= s["top1_agreement"] <= 1.0
    assert s["size_bytes"] < 0.6 * s["float_size_bytes"]


def test_fake_quant_flags_recorded_for_qat():
    s = qviz.Session(_qat_fx(load_demo_model()), CALIB, progress=False).run()
    points = s.points()
    fq = points[points.index.str.endswith("weight_fake_quant")]
    assert len(fq) == 6 and fq.fake_quant_enabled.all() and fq.observer_enabled.all()


# -- every flow: works and leaves the float model alone ----------------------------------------
FLOWS = {
    "fx": lambda: (load_demo_model(), {"flow": "fx"}),
    "eager": lambda: (load_demo_model(), {"flow": "eager"}),
    "eager-train-mode": lambda: (load_demo_model().train(), {"flow": "eager"}),
    "eager-explicit-fuse": lambda: (load_demo_model(), {"flow": "eager", "fuse": load_demo_model().fusion_groups()}),
    "fx-qnnpack": lambda: (load_demo_model(), {"flow": "fx", "backend": "qnnpack"}),
    "fx-onednn": lambda: (load_demo_model(), {"flow": "fx", "backend": "onednn"}),
    "eager-fbgemm": lambda: (load_demo_model(), {"flow": "eager", "backend": "fbgemm"}),
    "fx-qat": lambda: (_qat_fx(load_demo_model()), {"flow": "fx"}),
    "eager-qat": lambda: (_qat_eager(load_demo_model()), {"flow": "eager"}),
}


@pytest.mark.parametrize("case", list(FLOWS))
def test_static_flows_leave_the_float_model_unchanged(case):
    model, options = FLOWS[case]()
    before = model_snapshot(model)
    s = qviz.Session(model, CALIB, eval_data=EVAL, progress=False, **options).run()
    assert_unchanged(model, before)
    df = s.to_dataframe()
    assert list(df.index) == CONVS
    assert df.quantized.all() and df.output_sqnr.gt(15).all(), df.output_sqnr
    assert torch.backends.quantized.engine != "" and s.summary()["top1_agreement"] > 0.9


@pytest.mark.parametrize("dtype, wdtype", [("int8", "qint8"), ("fp16", "float16")])
def test_dynamic_flow_lstm_and_linear(dtype, wdtype):
    torch.manual_seed(0)
    model = tiny_lstm_classifier().train()
    before = model_snapshot(model)
    data = [torch.randn(4, 5, 8) for _ in range(2)]
    s = qviz.Session(model, data, flow="dynamic", dynamic_dtype=dtype, progress=False).run()
    assert_unchanged(model, before)
    df = s.to_dataframe()
    assert list(df.index) == ["lstm", "fc"]
    assert (df.dtype == f"{wdtype} (dynamic)").all() and (df.observer == "dynamic").all()
    floor = 30 if dtype == "int8" else 60  # fp16 weights are far more accurate
    assert df.weight_sqnr.gt(floor).all() and df.output_sqnr.gt(20).all()
    assert s.points().loc["lstm", "count"] == sum(x.numel() for x in data)


def test_dynamic_flow_mlp_default_backend():
    model = tiny_mlp().eval()
    s = qviz.Session(model, [torch.randn(8, 16)], flow="dynamic", progress=False).run()
    assert list(s.to_dataframe().index) == ["fc1", "fc2"]


# -- bad input ----------------------------------------------------------------------------------
def test_empty_calibration_data():
    with pytest.raises(qviz.InputDataError, match="calib_data is empty"):
        qviz.Session(load_demo_model(), [])


def test_a_single_tensor_is_not_a_list_of_batches():
    with pytest.raises(qviz.InputDataError, match=r"pass \[tensor\]"):
        qviz.Session(load_demo_model(), CALIB[0])


def test_batch_of_the_wrong_shape():
    bad = [CALIB[0], torch.randn(4, 3, 8, 8)]
    with pytest.raises(qviz.InputDataError, match=r"calib_data\[1\].*\(4, 3, 8, 8\).*\(16, 1, 8, 8\)"):
        qviz.Session(load_demo_model(), bad, progress=False).run()


def test_eval_batch_of_the_wrong_shape():
    s = qviz.Session(load_demo_model(), CALIB, eval_data=[torch.randn(2, 8)], progress=False)
    with pytest.raises(qviz.InputDataError, match=r"eval_data\[0\]"):
        s.run()


class LogOfRelu(nn.Module):
    """Makes -inf in the middle of the network wherever fc1's output is <= 0."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc2(torch.log(torch.relu(self.fc1(x))))


def test_nonfinite_activations_are_counted_and_the_run_completes():
    torch.manual_seed(0)
    model = LogOfRelu().eval()
    data = [torch.randn(8, 4), torch.randn(8, 4)]
    data[0][0, 0] = float("nan")
    s = qviz.Session(model, data, eval_data=[data[1]], progress=False).run()
    points = s.points()
    assert points.loc[points.role == "input", "nonfinite"].sum() == 1  # the NaN in the input
    assert points.nonfinite.sum() > 1  # the -inf made by the log
    assert s.summary()["nonfinite"] == points.nonfinite.sum()
    assert np.isfinite(s.to_dataframe().scale).all()  # qparams not poisoned


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return x


def test_model_fx_cannot_trace():
    with pytest.raises(qviz.ModelError, match=r"(?s)if x.sum\(\) > 0.*flow='eager'.*flow='pt2e'"):
        qviz.Session(Branchy().eval(), [torch.randn(2, 4)], flow="fx", progress=False).run()


def test_eager_model_without_stubs():
    with pytest.raises(qviz.ModelError, match="QuantStub.*QuantWrapper.*flow='fx'"):
        qviz.Session(nn.Sequential(nn.Linear(4, 4)), [torch.randn(2, 4)], flow="eager").run()


class WithBilinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.bil = nn.Bilinear(8, 8, 4)

    def forward(self, x):
        y = self.fc(x)
        return self.bil(y, y)


def test_layer_the_backend_cannot_quantize_is_left_float_and_reported():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="stayed float.*bil"):
        s = qviz.Session(WithBilinear().eval(), [torch.randn(4, 8)], progress=False).run()
    df = s.to_dataframe()
    assert df.loc["bil", "dtype"] == "float" and not df.loc["bil", "quantized"]
    assert df.loc["fc", "quantized"] and math.isfinite(df.loc["bil", "output_sqnr"])
    assert s.summary()["left_float"] == ["bil"]


@pytest.mark.parametrize("kwargs, match", [
    ({"flow": "tflite"}, "unknown flow 'tflite'"),
    ({"backend": "tpu"}, "unknown backend 'tpu'.*x86"),
    ({"flow": "eager", "fuse": "yes"}, "fuse must be 'auto' or a list"),
    ({"flow": "dynamic", "dynamic_dtype": "int4"}, "dynamic dtype must be one of"),
])
def test_bad_configuration(kwargs, match):
    with pytest.raises(qviz.ConfigError, match=match):
        qviz.Session(load_demo_model(), CALIB, **kwargs)


def test_not_a_module():
    with pytest.raises(qviz.ConfigError, match="torch.nn.Module"):
        qviz.Session(lambda x: x, CALIB)


def test_results_before_run():
    with pytest.raises(qviz.QvizError, match=r"call session.run\(\) first"):
        qviz.Session(load_demo_model(), CALIB).to_dataframe()


# -- session file ------------------------------------------------------------------------------
def test_save_and_load_round_trip(fx_session, tmp_path):
    path = tmp_path / "demo.qviz"
    fx_session.save(path)
    loaded = qviz.load(path)
    pd.testing.assert_frame_equal(loaded.to_dataframe(), fx_session.to_dataframe())
    pd.testing.assert_frame_equal(loaded.points(), fx_session.points())
    assert loaded.summary() == fx_session.summary()
    for name in fx_session.points().index:
        a, b = fx_session.record(name), loaded.record(name)
        np.testing.assert_array_equal(a.stats.histogram.counts, b.stats.histogram.counts)
        np.testing.assert_array_equal(a.stats.histogram.edges, b.stats.histogram.edges)
        assert a.arrays.keys() == b.arrays.keys()
        for key in a.arrays:
            np.testing.assert_array_equal(a.arrays[key], b.arrays[key])


def test_truncated_session_file(fx_session, tmp_path):
    path = tmp_path / "s.qviz"
    fx_session.save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(qviz.SessionFileError):
        qviz.load(path)


def test_foreign_files(tmp_path):
    text = tmp_path / "notes.qviz"
    text.write_text("hello")
    with pytest.raises(qviz.SessionFileError):
        qviz.load(text)
    other = tmp_path / "other.qviz"
    with zipfile.ZipFile(other, "w") as zf:
        zf.writestr("manifest.json", '{"format": "something-else", "version": 1}')
    with pytest.raises(qviz.SessionFileError, match="something-else|not a qviz"):
        qviz.load(other)


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_payload_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.qviz"
    path.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(qviz.SessionFileError):
        qviz.load(path)
    assert not marker.exists()


# -- memory -------------------------------------------------------------------------------------
def test_capture_memory_is_bounded_per_point():
    """Documented bound: 8 * bins + 64 bytes of histogram plus 16 bytes per observer call.

    An observer FX shares between nodes (pooling, flatten) is called once per node and batch.
    """
    from qviz.capture.stats import DEFAULT_BINS

    small = qviz.Session(load_demo_model(), calibration_batches(1, 8), progress=False).run()
    big = qviz.Session(load_demo_model(), calibration_batches(8, 64), progress=False).run()
    for s, batches in ((small, 1), (big, 8)):
        for name in s.points().index:
            rec = s.record(name)
            calls = rec.stats.calls
            assert calls <= 3 * batches or rec.role == "weight"
            assert rec.stats.nbytes <= 8 * DEFAULT_BINS + 64 + 16 * calls, name
    # 64x more data, same histogram memory
    for name in small.points().index:
        assert small.record(name).stats.histogram.nbytes == big.record(name).stats.histogram.nbytes


def test_sessions_prepared_on_threads_at_once_do_not_break_each_other():
    """FX tracing patches process-wide state; qviz serve prepares one session per visitor on worker
    threads. Four at once must each succeed and match the same session run alone."""
    import threading

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(80)]).eval()  # a trace long enough to overlap
    calib = [torch.randn(4, 8)]
    mapping = QConfigMapping().set_global(default_qconfig)  # MinMax: cheap to calibrate, same tracing

    def session():
        return qviz.Session(model, calib, flow="fx", qconfig_mapping=mapping, progress=False).run()

    alone = session().to_dataframe()
    frames, errors = [], []

    def prepare():
        try:
            frames.append(session().to_dataframe())
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=prepare) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(frames) == 4
    for frame in frames:
        pd.testing.assert_frame_equal(frame, alone)


def test_convert_reuses_the_histogram_observers_qparams(monkeypatch):
    """HistogramObserver's qparam search runs once per observer (qviz's record and convert share
    it), and the converted model has the qparams plain torch's prepare/calibrate/convert gives."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.observer import HistogramObserver
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.manual_seed(0)
    model, data = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval(), torch.randn(16, 8)
    with torch.no_grad():
        plain = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), (data,))
        plain(data)
        plain = convert_fx(plain)
    searches = []
    search = HistogramObserver._non_linear_param_search
    monkeypatch.setattr(HistogramObserver, "_non_linear_param_search",
                        lambda self: (searches.append(id(self)), search(self))[1])
    s = qviz.Session(model, [data], progress=False).run()
    observers = [r for r in s._records.values() if r.info.get("observer") == "HistogramObserver"]
    assert observers and len(searches) == len(observers)  # once per observer, not again in convert
    for name in ("0", "2"):
        ours, theirs = s.quantized_model().get_submodule(name), plain.get_submodule(name)
        assert (float(ours.scale), int(ours.zero_point)) == (float(theirs.scale), int(theirs.zero_point))

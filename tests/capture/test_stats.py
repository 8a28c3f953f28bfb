"""Tests for qviz.capture.stats: qparams computed from recorded stats against real torch observers."""

from __future__ import annotations

import functools
import io
import math

import numpy as np
import pytest
import torch
from torch.ao.quantization import (
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
)

from qviz.capture.histogram import StreamingHistogram
from qviz.capture.stats import DEFAULT_BINS, OBSERVERS, ActivationStats
from qviz.errors import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

A, S = torch.per_tensor_affine, torch.per_tensor_symmetric
CONFIGS = [  # dtype, qscheme, reduce_range, quant_min, quant_max
    (torch.quint8, A, False, None, None),
    (torch.quint8, A, True, None, None),
    (torch.quint8, S, False, None, None),
    (torch.qint8, A, False, None, None),
    (torch.qint8, A, True, None, None),
    (torch.qint8, S, False, None, None),
    (torch.qint8, S, True, None, None),
    (torch.quint8, A, False, 0, 15),  # 4-bit
    (torch.quint8, S, False, 0, 15),
    (torch.qint8, A, False, -8, 7),
    (torch.qint8, S, False, -8, 7),
]
TORCH_OBSERVERS = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageMinMaxObserver,
    "histogram": HistogramObserver,
    "percentile": MinMaxObserver,
}


def _kw(cfg) -> dict:
    return dict(
        zip(("dtype", "qscheme", "reduce_range", "quant_min", "quant_max"), cfg, strict=True)
    )


def _assert_same(ours: tuple[float, int], observer) -> None:
    """Bit-exact: torch.equal on the observer's own scale / zero_point tensors."""
    scale, zp = observer.calculate_qparams()
    assert torch.equal(torch.tensor([ours[0]], dtype=scale.dtype), scale), (ours, scale)
    assert torch.equal(torch.tensor([ours[1]], dtype=zp.dtype), zp), (ours, zp)


def _drifting_batches(seed: int, n: int = 60) -> list[torch.Tensor]:
    """Small batches whose range drifts and jumps: positive-only, negative-only, tiny, float16/64."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        x = rng.normal(rng.normal(0, 2), rng.uniform(0.01, 3), size=int(rng.integers(1, 50)))
        if i % 7 == 3:
            x = np.abs(x)
        if i % 11 == 5:
            x = -np.abs(x) * 1e-6
        dtype = (torch.float32, torch.float64, torch.float16)[i % 3]
        out.append(torch.from_numpy(x).to(dtype))
    return out


def _stats(batches, **kw) -> ActivationStats:
    st = ActivationStats(**kw)
    for b in batches:
        st.update(b)
    return st


def _observed(cls, batches, **kw):
    obs = cls(**kw)
    for b in batches:
        obs(b)
    return obs


def _sqnr(x: torch.Tensor, qparams, quant_min: int, quant_max: int) -> float:
    fq = torch.fake_quantize_per_tensor_affine(x, qparams[0], qparams[1], quant_min, quant_max)
    return 20 * math.log10(float(x.norm() / (x - fq).norm()))


# -- exact replays ------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", CONFIGS)
def test_minmax_is_exactly_torch(cfg):
    for seed in range(3):
        batches = _drifting_batches(seed)
        st = _stats(batches)
        _assert_same(
            st.qparams("minmax", **_kw(cfg)), _observed(MinMaxObserver, batches, **_kw(cfg))
        )


@pytest.mark.parametrize("cfg", CONFIGS)
def test_moving_average_is_exactly_torch(cfg):
    batches = _drifting_batches(10 + CONFIGS.index(cfg))
    st = _stats(batches)
    for c in (0.01, 0.1, 1 / 3, 0.5, 0.9, 1.0):
        obs = _observed(MovingAverageMinMaxObserver, batches, averaging_constant=c, **_kw(cfg))
        _assert_same(st.qparams("moving_average", averaging_constant=c, **_kw(cfg)), obs)


def test_moving_average_exact_over_a_long_calibration():
    rng = np.random.default_rng(3)
    batches = [
        torch.from_numpy(rng.normal(0, 1 + i / 100, 8).astype(np.float32)) for i in range(2000)
    ]
    st = _stats(batches)
    for c in (0.01, 0.003):
        obs = _observed(MovingAverageMinMaxObserver, batches, averaging_constant=c)
        _assert_same(st.qparams("moving_average", averaging_constant=c), obs)
        assert obs.min_val.item() != st.min  # a real average, not the global range


def test_exact_for_a_constant_and_for_tiny_ranges():
    for batches in ([torch.full((5,), 2.5)], [torch.zeros(3)], [torch.tensor([1e-30, 2e-30])]):
        st = _stats(batches)
        for cfg in CONFIGS:
            _assert_same(
                st.qparams("minmax", **_kw(cfg)), _observed(MinMaxObserver, batches, **_kw(cfg))
            )
    for batches in ([torch.full((5,), -2.5)], [torch.zeros(3)]):  # torch.histc's special case
        st = _stats(batches)
        for cfg in (CONFIGS[0], CONFIGS[5]):
            obs = _observed(HistogramObserver, batches, **_kw(cfg))
            _assert_same(st.qparams("histogram", **_kw(cfg)), obs)


# -- histogram ----------------------------------------------------------------------------------
@functools.cache
def _distributions() -> dict[str, list[torch.Tensor]]:
    rng = np.random.default_rng(0)

    def g(n=20_000):
        return torch.from_numpy(rng.standard_normal(n).astype(np.float32))

    outliers = []
    for i in range(4):
        x = g()
        x[:3] = torch.tensor([40.0, -25.0, 60.0]) * (i + 1)
        outliers.append(x)
    return {
        "gaussian": [g() for _ in range(4)],
        "relu": [g().relu() for _ in range(4)],
        "outliers": outliers,
        "uniform": [
            torch.from_numpy(rng.uniform(-1, 3, 20_000).astype(np.float32)) for _ in range(4)
        ],
        "growing": [g(10_000) * 1.5**i + 0.3 * i for i in range(8)],
    }


@pytest.mark.parametrize("name", ["gaussian", "relu", "outliers", "uniform", "growing"])
@pytest.mark.parametrize(
    "cfg", [CONFIGS[0], CONFIGS[5], CONFIGS[1]], ids=["quint8", "qint8-sym", "reduce-range"]
)
def test_histogram_within_0_1_db_of_torch(name, cfg):
    batches = _distributions()[name]
    x = torch.cat(batches)
    obs = _observed(HistogramObserver, batches, **_kw(cfg))
    st = _stats(batches)
    scale, zp = obs.calculate_qparams()
    theirs = _sqnr(x, (float(scale), int(zp)), obs.quant_min, obs.quant_max)
    ours = _sqnr(x, st.qparams("histogram", **_kw(cfg)), obs.quant_min, obs.quant_max)
    assert abs(ours - theirs) < 0.1, (ours, theirs)


def test_histogram_handed_to_torch_is_our_histogram_rebinned():
    x = torch.from_numpy(np.random.default_rng(1).uniform(-2, 6, 50_000).astype(np.float32))
    st = _stats([x])
    counts = st._rebin(st.min, st.max, 2048)
    assert counts.dtype == np.float32 and counts.sum() == pytest.approx(x.numel())
    exact = torch.histc(x, 2048, min=st.min, max=st.max).numpy()
    # density is spread uniformly inside our (finer) bins: cumulative counts stay within a few
    assert np.abs(np.cumsum(counts) - np.cumsum(exact)).max() < 20


# -- percentile ---------------------------------------------------------------------------------
def test_percentile_100_is_minmax():
    batches = _drifting_batches(4)
    st = _stats(batches)
    for cfg in CONFIGS:
        assert st.qparams("percentile", percentile=100, **_kw(cfg)) == st.qparams(
            "minmax", **_kw(cfg)
        )


def test_percentile_clips_outliers_to_the_quantile_range():
    rng = np.random.default_rng(2)
    x = rng.normal(1.0, 1.0, 200_000).astype(np.float32)
    x[:10] = 1000.0  # 0.005 % outliers
    st = _stats([torch.from_numpy(x)])
    for p in (99.9, 99.99):
        lo, hi = np.quantile(x, [(100 - p) / 100, p / 100])
        scale, zp = st.qparams("percentile", percentile=p)
        # the clip range is numpy's quantile range to within a bin of our histogram
        assert abs(scale * 255 - (hi - lo)) < 2 * st.histogram.width
        assert abs(-zp * scale - lo) < 2 * st.histogram.width
        # outside the clip range: about the tails the percentile cut off (both sides), no more
        assert st.clip_fraction(scale, zp, 0, 255) == pytest.approx(2 * (100 - p) / 100, rel=0.2)
        assert scale < st.qparams("minmax")[0] / 50


def test_percentile_range_always_includes_zero():
    st = _stats([torch.linspace(5.0, 10.0, 10_001)])
    scale, zp = st.qparams("percentile", percentile=99.0)
    assert zp == 0  # quint8 affine: the range starts at 0, not at ~5.05
    assert scale == pytest.approx(st.histogram.quantile(0.99) / 255, rel=1e-3)


@pytest.mark.parametrize("p", [0, 50, 49.9, 100.5, -1, math.nan, "99", True, None])
def test_bad_percentile_is_a_config_error(p):
    for st in (ActivationStats(), _stats([torch.randn(100)])):
        with pytest.raises(ConfigError, match=r"percentile must be a number in \(50, 100\]"):
            st.qparams("percentile", percentile=p)


# -- errors and empty stats ---------------------------------------------------------------------
@pytest.mark.parametrize("observer", ["MinMax", "", "kl", None])
def test_unknown_observer_lists_the_choices(observer):
    with pytest.raises(ConfigError, match="minmax, moving_average, histogram, percentile"):
        _stats([torch.randn(10)]).qparams(observer)


@pytest.mark.parametrize(
    "kw",
    [
        dict(qscheme=S, reduce_range=True),  # torch refuses this for quint8
        dict(qscheme=torch.per_channel_affine),
        dict(quant_min=5, quant_max=3),
        dict(quant_min=1, quant_max=15),  # must include 0
    ],
)
def test_configurations_torch_refuses_are_config_errors(kw):
    for observer, cls in TORCH_OBSERVERS.items():
        try:
            cls(**kw)
        except Exception:  # noqa: BLE001 - whatever torch raises, we raise a ConfigError
            with pytest.raises(ConfigError, match=f"torch's {cls.__name__} refuses"):
                _stats([torch.randn(10)]).qparams(observer, **kw)
        else:  # e.g. HistogramObserver does not check symmetric + reduce_range: neither do we
            assert observer == "histogram" and kw == dict(qscheme=S, reduce_range=True)
            _stats([torch.randn(10)]).qparams(observer, **kw)


def test_no_data_gives_torch_defaults_without_crashing():
    for st in (ActivationStats(), _stats([torch.empty(0), torch.tensor([math.nan, math.inf])])):
        assert not st.saw_data and st.histogram.total == 0
        assert math.isnan(st.min) and math.isnan(st.max)
        for observer, cls in TORCH_OBSERVERS.items():
            for cfg in CONFIGS:
                ours = st.qparams(observer, **_kw(cfg))
                assert ours == (1.0, 0)
                _assert_same(ours, cls(**_kw(cfg)))
        assert st.clip_fraction(0.1, 0, 0, 255) == 0.0


# -- recording ----------------------------------------------------------------------------------
def test_nan_and_inf_are_counted_and_ignored():
    batches = _drifting_batches(5, n=20)
    dirty = []
    for i, b in enumerate(batches):
        bad = torch.tensor([math.nan, math.inf, -math.inf][: i % 4], dtype=b.dtype)
        dirty.append(torch.cat([bad, b, bad]))
    dirty.insert(3, torch.tensor([math.nan, math.nan]))  # a call with no finite value
    clean, st = _stats(batches), _stats(dirty)
    assert st.nonfinite == 2 * sum(i % 4 for i in range(20)) + 2
    assert st.count == clean.count + st.nonfinite
    assert st.calls == clean.calls + 1
    assert (st.min, st.max) == (clean.min, clean.max) and math.isfinite(st.min)
    np.testing.assert_array_equal(st.histogram.counts, clean.histogram.counts)
    for observer in OBSERVERS:
        assert st.qparams(observer, dtype=torch.qint8) == clean.qparams(observer, dtype=torch.qint8)
    obs = _observed(MovingAverageMinMaxObserver, batches, averaging_constant=0.2)
    _assert_same(st.qparams("moving_average", averaging_constant=0.2), obs)


def test_properties_and_memory():
    batches = [
        torch.arange(6.0).reshape(2, 3) - 1,
        torch.empty(0),
        torch.tensor([7.0], dtype=torch.float64),
    ]
    st = _stats(batches, bins=64)
    assert (st.calls, st.count, st.nonfinite, st.min, st.max) == (3, 7, 0, -1.0, 7.0)
    assert st.saw_data and isinstance(st.histogram, StreamingHistogram)
    assert st.histogram.bins == 64 and st.histogram.total == 7
    np.testing.assert_array_equal(st.call_min, [-1.0, 7.0])
    np.testing.assert_array_equal(st.call_max, [4.0, 7.0])
    assert st.nbytes == st.histogram.nbytes + 16 * 2
    assert ActivationStats().histogram.bins == DEFAULT_BINS
    with pytest.raises(ValueError, match="max_calls"):
        ActivationStats(max_calls=0)


def test_trajectory_is_bounded_and_moving_average_then_refuses():
    batches = _drifting_batches(6, n=30)
    st = _stats(batches, bins=256, max_calls=10)
    assert st.truncated and st.calls == 30 and len(st.call_min) == 10
    assert st.nbytes == st.histogram.nbytes + 16 * 10
    # the global range still covers every call
    _assert_same(st.qparams("minmax"), _observed(MinMaxObserver, batches))
    with pytest.raises(ConfigError, match="too long"):
        st.qparams("moving_average")
    assert not _stats(batches, bins=256, max_calls=30).truncated


def test_clip_fraction():
    st = _stats([torch.linspace(0.0, 1.0, 100_001)])
    assert st.clip_fraction(0.5 / 255, 0, 0, 255) == pytest.approx(0.5, abs=1e-3)
    assert st.clip_fraction(1.0 / 15, 0, 0, 15) == pytest.approx(0.0, abs=1e-4)
    # the range [0.25, 0.5]
    assert st.clip_fraction(0.25 / 255, -383, -128, 127) == pytest.approx(0.75, abs=1e-3)
    scale, zp = st.qparams("minmax")
    assert st.clip_fraction(scale, zp, 0, 255) < 1e-4


# -- persistence and merging --------------------------------------------------------------------
def _all_qparams(st: ActivationStats) -> list:
    return [st.qparams(o, dtype=torch.qint8, qscheme=S) for o in OBSERVERS] + [
        st.qparams("moving_average", averaging_constant=0.3)
    ]


def test_round_trip_through_npz_gives_identical_qparams():
    for st in (_stats(_drifting_batches(7), bins=512, max_calls=60), ActivationStats(bins=64)):
        arrays = st.to_arrays()
        assert {"hist.counts", "call_min", "call_max", "calls", "nonfinite"} <= arrays.keys()
        assert all(isinstance(v, np.ndarray) and v.dtype != object for v in arrays.values())
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        buf.seek(0)
        with np.load(buf, allow_pickle=False) as npz:
            back = ActivationStats.from_arrays(dict(npz))
        assert _all_qparams(back) == _all_qparams(st)
        same = ("calls", "count", "nonfinite", "truncated", "max_calls", "nbytes")
        assert [getattr(back, a) for a in same] == [getattr(st, a) for a in same]
        np.testing.assert_array_equal(back.histogram.counts, st.histogram.counts)
        np.testing.assert_array_equal(back.call_max, st.call_max)
    st = _stats(_drifting_batches(7), bins=512, max_calls=40)
    back = ActivationStats.from_arrays(st.to_arrays())
    assert back.truncated and back.max_calls == 40
    assert back.qparams("minmax") == st.qparams("minmax")
    with pytest.raises(ConfigError, match="too long"):
        back.qparams("moving_average")


def test_from_arrays_rejects_inconsistent_arrays():
    good = _stats([torch.randn(100), torch.randn(50)], bins=64).to_arrays()
    for change in (
        {"call_min": np.array([0.0])},  # one call, call_max has two
        {"call_min": good["call_max"] + 1},  # min above max
        {"calls": np.array(1)},  # fewer calls than recorded
        {"nonfinite": np.array(-1)},
        {"call_min": np.zeros(0), "call_max": np.zeros(0)},  # data without a trajectory
    ):
        with pytest.raises(ValueError):
            ActivationStats.from_arrays({**good, **change})


def test_merge_equals_seeing_both_in_sequence():
    a_batches, b_batches = _drifting_batches(8, n=25), _drifting_batches(9, n=25)
    a, b = _stats(a_batches), _stats([*b_batches, torch.tensor([math.inf])])
    both = _stats([*a_batches, *b_batches, torch.tensor([math.inf])])
    a.merge(b)
    for attr in ("calls", "count", "nonfinite", "min", "max"):
        assert getattr(a, attr) == getattr(both, attr), attr
    assert a.histogram.total == both.histogram.total
    for c in (0.01, 0.5):
        obs = _observed(MovingAverageMinMaxObserver, a_batches + b_batches, averaging_constant=c)
        _assert_same(a.qparams("moving_average", averaging_constant=c), obs)
    _assert_same(a.qparams("minmax"), _observed(MinMaxObserver, a_batches + b_batches))

    empty = ActivationStats()
    empty.merge(b)
    assert empty.qparams("moving_average") == b.qparams("moving_average")
    b.merge(ActivationStats())
    assert b.qparams("histogram") == empty.qparams("histogram")


def test_merge_keeps_the_trajectory_bounded_and_checks_bins():
    a = _stats(_drifting_batches(1, n=8), bins=64, max_calls=10)
    a.merge(_stats(_drifting_batches(2, n=8), bins=64))
    assert a.truncated and len(a.call_min) == 10 and a.calls == 16
    with pytest.raises(ValueError, match="bins"):
        a.merge(ActivationStats(bins=128))
    with pytest.raises(TypeError):
        a.merge(StreamingHistogram(64))

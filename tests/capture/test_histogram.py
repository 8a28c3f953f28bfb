"""Tests for qviz.capture.histogram: exact counts under growth, merges, quantiles, persistence."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qviz.capture.histogram import StreamingHistogram


def _np_counts(h: StreamingHistogram, data) -> np.ndarray:
    """What np.histogram says over the histogram's own final edges."""
    data = np.asarray(data, dtype=np.float64)
    return np.histogram(data[np.isfinite(data)], bins=h.edges)[0]


def _fed(chunks, bins=256) -> StreamingHistogram:
    h = StreamingHistogram(bins)
    for c in chunks:
        h.update(torch.as_tensor(c))
    return h


def _growing_chunks(seed: int, n_chunks: int = 30) -> list[np.ndarray]:
    """float32 batches whose range keeps growing on both sides, some on dyadic edges."""
    rng = np.random.default_rng(seed)
    chunks = []
    for i in range(n_chunks):
        scale, shift = 1.7**i * 1e-3, (-1) ** i * 1.5**i * 1e-3
        x = rng.normal(shift, scale, size=int(rng.integers(1, 3000))).astype(np.float32)
        if i % 3 == 0:  # values exactly on grid edges and on zero
            x = (np.round(x * 64) / 64).astype(np.float32)
        chunks.append(x)
    return chunks


@pytest.mark.parametrize("bins", [0, 1, 3, -2, 2.0, "8", True, 2**21 + 2])
def test_bins_validation(bins):
    with pytest.raises(ValueError, match="bins"):
        StreamingHistogram(bins)


def test_bins_accepts_even_and_numpy_int():
    assert StreamingHistogram(2).bins == 2
    assert StreamingHistogram(np.int64(6)).bins == 6
    assert StreamingHistogram().bins == 2048


def test_single_batch_matches_numpy():
    x = np.random.default_rng(0).normal(0.3, 2.0, size=100_000).astype(np.float32)
    h = _fed([x], bins=2048)
    assert h.counts.dtype == np.int64 and h.counts.shape == (2048,)
    assert h.edges.dtype == np.float64 and h.edges.shape == (2049,)
    np.testing.assert_array_equal(h.counts, _np_counts(h, x))
    assert h.total == x.size
    assert h.edges[0] <= x.min() and x.max() < h.edges[-1]
    # the grid is not wastefully wide: the data covers at least a quarter of it
    assert (float(x.max()) - float(x.min())) > (h.edges[-1] - h.edges[0]) / 4
    np.testing.assert_allclose(np.diff(h.edges), h.width)


def test_nan_inf_ignored_and_total_counts_finite():
    rng = np.random.default_rng(1)
    x = rng.uniform(-5, 5, size=10_000).astype(np.float32)
    x[rng.choice(x.size, 300, replace=False)] = np.nan
    x[:7], x[7:12] = np.inf, -np.inf
    h = _fed([x, np.full(5, np.nan, np.float32), np.array([np.inf], np.float32)])
    finite = x[np.isfinite(x)]
    assert h.total == finite.size == int(np.isfinite(x).sum())
    assert h.min == float(finite.min()) and h.max == float(finite.max())
    np.testing.assert_array_equal(h.counts, _np_counts(h, x))


def test_all_nonfinite_or_empty_is_noop():
    h = StreamingHistogram(8)
    h.update(torch.tensor([math.nan, math.inf, -math.inf]))
    h.update(torch.empty(0))
    h.update(torch.empty(3, 0, 4))
    assert h.total == 0 and not h.counts.any()
    assert math.isnan(h.min) and math.isnan(h.max)
    assert math.isnan(h.quantile(0.5)) and np.isnan(h.edges).all()
    assert h.fraction_outside(-1, 1) == 0.0
    h.update(torch.tensor([1.0, 2.0]))
    h.update(torch.empty(0))
    assert h.total == 2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_growing_batches_lose_no_counts(seed):
    chunks = _growing_chunks(seed)
    h = _fed(chunks, bins=256)
    data = np.concatenate(chunks)
    np.testing.assert_array_equal(h.counts, _np_counts(h, data))
    assert h.total == data.size
    assert h.min == float(data.min()) and h.max == float(data.max())
    # and the final resolution is still fine: data spans at least a quarter of the range
    assert float(data.max() - data.min()) > (h.edges[-1] - h.edges[0]) / 4


def test_growth_to_the_left_only_and_right_only():
    left = [np.array([10.0, 11.0]) - 3.0**i for i in range(12)]
    right = [np.array([-1.0, 0.5]) + 3.0**i for i in range(12)]
    for chunks in (left, right):
        h = _fed(chunks, bins=16)
        np.testing.assert_array_equal(h.counts, _np_counts(h, np.concatenate(chunks)))


def test_values_on_edges_follow_floor_rule():
    h = _fed([np.array([0.0, 1.0])], bins=4)
    h.update(torch.tensor([-1.0, 2.0, 4.0, 8.0, -8.0]))
    data = [0.0, 1.0, -1.0, 2.0, 4.0, 8.0, -8.0]
    np.testing.assert_array_equal(h.counts, _np_counts(h, data))
    expected = np.floor(np.array(data) / h.width) - h.edges[0] / h.width
    np.testing.assert_array_equal(h.counts, np.bincount(expected.astype(int), minlength=4))
    assert h.max < h.edges[-1]  # the top edge never holds a value


@pytest.mark.parametrize(
    "batches",
    [
        [[0.25, 2.0], [3.0]],  # 2.0 would sit on the top edge of the first grid
        [[0.0, 1.0], [4.0], [5.0]],  # 4.0 would sit on the top edge after a growth
        [[-1.0, -0.25], [-4.0], [-9.0], [0.0]],
    ],
)
def test_value_on_top_edge_is_not_merged_into_the_wrong_bin(batches):
    h = StreamingHistogram(4)
    for b in batches:
        h.update(torch.tensor(b, dtype=torch.float64))
        assert h.edges[0] <= h.min and h.max < h.edges[-1]
    np.testing.assert_array_equal(h.counts, _np_counts(h, np.concatenate(batches)))


def test_data_far_from_zero_and_subnormals_stay_exact():
    rng = np.random.default_rng(10)
    far = (1e6 + rng.uniform(0, 3, 5000)).astype(np.float32)  # |lo / w| far above 2**24
    h = _fed([far[:10], far], bins=512)
    np.testing.assert_array_equal(h.counts, _np_counts(h, np.concatenate([far[:10], far])))
    tiny = np.array([-1e-45, -3e-44, 1e-45, -0.0, 0.0], dtype=np.float32)  # float32 subnormals
    for wide in (rng.uniform(-5e3, 5e3, 1000), rng.uniform(-1, 1, 1000)):
        h = _fed([wide.astype(np.float32), tiny], bins=64)
        np.testing.assert_array_equal(h.counts, _np_counts(h, np.concatenate([wide, tiny])))


@pytest.mark.parametrize(
    "dtype, scale", [(np.float32, 1e-38), (np.float32, 1e-30), (np.float64, 1e-300)]
)
def test_tiny_values_stay_exact(dtype, scale):
    x = (np.random.default_rng(14).normal(0, 1, 1000) * scale).astype(dtype)
    h = _fed([x[:3], x], bins=64)
    assert h.total == 1003
    np.testing.assert_array_equal(h.counts, _np_counts(h, np.concatenate([x[:3], x])))


def test_mixed_dtypes_share_one_exact_grid():
    rng = np.random.default_rng(11)
    wide64 = 1e8 + 3 + rng.uniform(0, 300, 1000)  # float64 data sets up the grid
    near32 = (1e8 + rng.uniform(16, 280, 1000)).astype(np.float32)  # float32 uses it
    h = _fed([wide64, near32], bins=512)
    lo_in_bins = h.edges[0] / h.width
    assert h.width <= 1 and float(np.float32(lo_in_bins)) != lo_in_bins  # float32 can't do it
    data = np.concatenate([wide64, near32])
    np.testing.assert_array_equal(h.counts, _np_counts(h, data))
    x = np.random.default_rng(13).normal(0, 100, 1000)
    h = _fed([x, x.astype(np.float32), x.astype(np.float16)], bins=128)
    data = np.concatenate([x, x.astype(np.float32), x.astype(np.float16)])
    np.testing.assert_array_equal(h.counts, _np_counts(h, data))


def test_min_max_exact_whichever_batch_holds_them():
    rng = np.random.default_rng(12)
    chunks = [rng.normal(0, s, 100).astype(np.float32) for s in (5.0, 0.1, 1.0, 7.0, 0.5)]
    h = StreamingHistogram(64)
    for i, c in enumerate(chunks):
        h.update(torch.from_numpy(c))
        seen = np.concatenate(chunks[: i + 1])
        assert (h.min, h.max) == (float(seen.min()), float(seen.max()))


def test_quantile_within_one_bin_of_numpy():
    rng = np.random.default_rng(3)
    chunks = [rng.standard_t(4, size=20_000).astype(np.float32) * (1 + i) for i in range(5)]
    h = _fed(chunks, bins=2048)
    data = np.concatenate(chunks).astype(np.float64)
    qs = np.array([0.0, 0.001, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 0.999, 1.0])
    got = h.quantile(qs)
    assert isinstance(got, np.ndarray) and got.shape == qs.shape
    assert np.all(np.abs(got - np.quantile(data, qs)) <= h.width)
    assert h.quantile(0.0) == data.min() and h.quantile(1.0) == data.max()
    assert isinstance(h.quantile(0.5), float)
    assert np.all(np.diff(got) >= 0)
    # with one value per bin the rank convention matters: it must be numpy's (n - 1) * q
    small = _fed([np.arange(11.0)], bins=2048)
    q10 = np.arange(11) / 10
    assert np.all(np.abs(small.quantile(q10) - np.quantile(np.arange(11.0), q10)) <= small.width)
    with pytest.raises(ValueError, match="quantile"):
        h.quantile(1.5)
    with pytest.raises(ValueError, match="quantile"):
        h.quantile([0.5, math.nan])


def test_fraction_outside_close_to_empirical():
    rng = np.random.default_rng(4)
    data = np.concatenate([rng.normal(0, 1, 200_000), rng.laplace(2, 0.5, 50_000)])
    h = _fed([data[:1000], data[1000:]], bins=512)
    for lo, hi in [(-1.0, 1.0), (-2.5, 3.7), (0.123, 0.456), (-10, 10), (h.min, h.max), (5.0, 6.0)]:
        empirical = np.mean((data < lo) | (data > hi))
        assert abs(h.fraction_outside(lo, hi) - empirical) <= 1 / h.bins + 1e-3, (lo, hi)
    assert h.fraction_outside(h.min, h.max) == 0.0
    assert h.fraction_outside(h.max + 1, h.max + 2) == 1.0
    assert h.fraction_outside(h.min - 2, h.min - 1) == 1.0
    with pytest.raises(ValueError, match="lo <= hi"):
        h.fraction_outside(1.0, -1.0)


def test_to_arrays_from_arrays_round_trip():
    chunks = _growing_chunks(5, n_chunks=12)
    h = _fed(chunks, bins=128)
    arrays = h.to_arrays()
    assert set(arrays) == {"counts", "lo", "width", "min", "max"}
    assert all(isinstance(v, np.ndarray) for v in arrays.values())
    r = StreamingHistogram.from_arrays(arrays)
    assert r.bins == h.bins and r.total == h.total
    np.testing.assert_array_equal(r.counts, h.counts)
    np.testing.assert_array_equal(r.edges, h.edges)
    assert (r.min, r.max) == (h.min, h.max)
    # both keep evolving identically
    more = np.linspace(-1e4, 3e4, 999)
    h.update(torch.from_numpy(more))
    r.update(torch.from_numpy(more))
    np.testing.assert_array_equal(r.counts, h.counts)
    np.testing.assert_array_equal(r.edges, h.edges)
    # an empty histogram survives the round trip too
    e = StreamingHistogram.from_arrays(StreamingHistogram(64).to_arrays())
    assert e.bins == 64 and e.total == 0


def test_from_arrays_rejects_inconsistent_state():
    good = _fed([np.array([0.5, 1.5, 3.0])], bins=8).to_arrays()
    bad = [
        {"counts": good["counts"].astype(np.float64)},
        {"counts": -good["counts"]},
        {"counts": good["counts"][:-1]},
        {"width": np.array(0.3)},
        {"width": np.array(0.0)},
        {"lo": good["lo"] + good["width"] / 3},
        {"min": np.array(-100.0)},
        {"max": np.array(math.nan)},
    ]
    for change in bad:
        with pytest.raises(ValueError):
            StreamingHistogram.from_arrays({**good, **change})


@pytest.mark.parametrize("seed", [0, 1])
def test_merge_equals_one_histogram_fed_both(seed):
    rng = np.random.default_rng(seed)
    a = [rng.normal(-3, 0.01 * (i + 1), 500).astype(np.float32) for i in range(4)]
    b = [rng.normal(50, 5.0 * (i + 1), 700).astype(np.float32) for i in range(4)]
    ha, hb = _fed(a), _fed(b)
    ha.merge(hb)
    both = np.concatenate(a + b)
    one = _fed(a + b)
    assert ha.total == one.total == both.size
    assert (ha.min, ha.max) == (one.min, one.max) == (float(both.min()), float(both.max()))
    np.testing.assert_array_equal(ha.counts, _np_counts(ha, both))
    np.testing.assert_array_equal(one.counts, _np_counts(one, both))
    if np.array_equal(ha.edges, one.edges):
        np.testing.assert_array_equal(ha.counts, one.counts)
    # the other way round: a wide histogram absorbing a finer one
    hb2 = _fed(b)
    hb2.merge(_fed(a))
    np.testing.assert_array_equal(hb2.counts, _np_counts(hb2, both))


def test_merge_edge_cases():
    x = np.random.default_rng(6).uniform(-1, 1, 1000)
    h = _fed([x], bins=64)
    before = h.counts
    h.merge(StreamingHistogram(64))  # empty other: no-op
    np.testing.assert_array_equal(h.counts, before)
    empty = StreamingHistogram(64)
    empty.merge(h)  # into empty: a copy
    np.testing.assert_array_equal(empty.counts, h.counts)
    np.testing.assert_array_equal(empty.edges, h.edges)
    grown = _fed(_growing_chunks(8), bins=64)  # its grid is not the one its min/max suggest
    into_empty = StreamingHistogram(64)
    into_empty.merge(grown)
    np.testing.assert_array_equal(into_empty.edges, grown.edges)
    np.testing.assert_array_equal(into_empty.counts, grown.counts)
    h.merge(h)  # self: doubles
    np.testing.assert_array_equal(h.counts, 2 * before)
    with pytest.raises(ValueError, match="bins"):
        h.merge(StreamingHistogram(32))


def test_constant_tensors():
    h = _fed([np.full(1000, 3.25, np.float32)], bins=64)
    assert h.total == 1000 and h.min == h.max == 3.25
    assert h.counts.max() == 1000 and 0 < h.width < 3.25 * 1e-3
    assert h.quantile(0.5) == 3.25
    z = _fed([np.zeros(10)], bins=64)
    assert z.total == 10 and z.counts[0] == 10 and z.edges[0] == 0.0 and z.width > 0
    z.update(torch.from_numpy(np.random.default_rng(9).normal(size=10_000)))
    assert z.total == 10_010  # a zero first batch must not ruin the resolution for later data:
    assert z.max - z.min > (z.edges[-1] - z.edges[0]) / 4


def test_int_bool_and_half_tensors():
    torch.manual_seed(0)
    ints = torch.randint(-50, 200, (5000,))
    h = _fed([ints], bins=64)
    np.testing.assert_array_equal(h.counts, _np_counts(h, ints.numpy()))
    assert (h.min, h.max) == (float(ints.min()), float(ints.max()))
    b = _fed([torch.tensor([True, False, True])], bins=4)
    assert b.total == 3 and (b.min, b.max) == (0.0, 1.0)
    for dtype in (torch.float16, torch.bfloat16):
        x = (torch.randn(4000) * 10).to(dtype)
        hx = _fed([x[:100], x[100:]], bins=128)
        np.testing.assert_array_equal(hx.counts, _np_counts(hx, x.float().numpy()))


def test_update_leaves_input_alone_and_accepts_views():
    x = torch.randn(64, 32, dtype=torch.float64, requires_grad=True)
    keep = x.detach().clone()
    h = StreamingHistogram(32)
    h.update(x)
    h.update(x.detach().t()[:, ::3])  # non-contiguous view
    assert torch.equal(x.detach(), keep)
    data = np.concatenate([keep.numpy().ravel(), keep.t()[:, ::3].numpy().ravel()])
    np.testing.assert_array_equal(h.counts, _np_counts(h, data))


def test_nbytes_and_repr():
    h = StreamingHistogram(2048)
    assert h.nbytes == 8 * 2048 + 64
    h.update(torch.randn(100_000))
    assert h.nbytes == 8 * 2048 + 64
    assert "bins=2048" in repr(h) and "total=100000" in repr(h)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    chunks = [torch.from_numpy(c) for c in _growing_chunks(7)]
    cpu, gpu = StreamingHistogram(256), StreamingHistogram(256)
    for c in chunks:
        cpu.update(c)
        gpu.update(c.cuda())
    np.testing.assert_array_equal(cpu.counts, gpu.counts)
    np.testing.assert_array_equal(cpu.edges, gpu.edges)

"""Activation outlier statistics: planted channels found at the right indices, told apart."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qviz.analysis.outliers import ChannelStats, channel_heatmap, outlier_frame


def _planted(seed=0, tokens=512, channels=48):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, channels, generator=g)
    x[:, 5] *= 30  # systematic: large in every token (an LLM "emergent feature")
    x[17, 11] = 200.0  # a spike: one huge value in one token
    return x


def test_planted_channels_are_found_and_told_apart():
    stats = ChannelStats()
    x = _planted()
    for chunk in x.split(100):  # streamed over batches: same as one pass
        stats.update(chunk.reshape(2, -1, 48) if chunk.shape[0] % 2 == 0 else chunk)
    frame = outlier_frame({"proj": stats}, top=4)
    assert list(frame.channel[:2]) == [11, 5]
    spike, systematic = frame.iloc[0], frame.iloc[1]
    assert spike.kind == "spike" and 1 / 512 <= spike.persistence < 0.01
    assert systematic.kind == "systematic" and systematic.persistence > 0.8  # 30|z| > 4: P = 0.89
    absmax = x.abs().amax(0).double().numpy()
    assert spike.absmax == pytest.approx(200.0)
    assert spike.ratio_to_median == pytest.approx(200.0 / np.median(absmax))
    assert set(frame.kind[2:]) == {""}  # the rest are ordinary channels


def test_kurtosis_matches_a_direct_computation():
    stats = ChannelStats()
    x = _planted(1)
    stats.update(x[:200])
    stats.update(x[200:])
    v = x.double().numpy().ravel()
    direct = ((v - v.mean()) ** 4).mean() / v.var() ** 2 - 3
    assert stats.kurtosis() == pytest.approx(direct, rel=1e-9)
    gaussian = ChannelStats()
    gaussian.update(torch.randn(4000, 64, generator=torch.Generator().manual_seed(2)))
    assert abs(gaussian.kurtosis()) < 0.05


def test_layers_are_ranked_by_their_most_extreme_channel_and_mapped():
    mild, heavy = ChannelStats(), ChannelStats()
    mild.update(torch.randn(64, 16, generator=torch.Generator().manual_seed(3)))
    heavy.update(_planted(4, 64, 32))
    frame = outlier_frame({"mild": mild, "heavy": heavy, "never_ran": ChannelStats()}, top=2)
    assert frame.layer.iloc[0] == "heavy" and set(frame.layer) == {"mild", "heavy"}
    assert (frame.groupby("layer").size() == 2).all()
    layers, matrix = channel_heatmap({"mild": mild, "heavy": heavy})
    assert layers == ["mild", "heavy"] and matrix.shape == (2, 32)
    assert np.isnan(matrix[0, 16:]).all() and np.nanargmax(matrix[1]) in (5, 11)


def test_non_float_inputs_are_ignored():
    stats = ChannelStats()
    stats.update(torch.arange(10))
    assert not stats.saw_data and outlier_frame({"x": stats}, 3).empty


def test_session_outliers_find_a_channel_planted_in_a_transformer():
    pytest.importorskip("transformers")
    import qviz
    from tests.helpers import assert_unchanged, model_snapshot
    from tests.real_models import llama

    model, calib, evals = llama()
    with torch.no_grad():  # the input of every q/k/v projection of layer 0: channel 7 x 40
        model.model.layers[0].input_layernorm.weight[7] = 40.0
    before = model_snapshot(model)
    s = qviz.Session(model, calib, eval_data=evals, flow="dynamic", progress=False).run()
    frame = s.outliers(top=3)
    for proj in ("q_proj", "k_proj", "v_proj"):
        rows = frame[frame.layer == f"model.layers.0.self_attn.{proj}"]
        assert rows.iloc[0].channel == 7 and rows.iloc[0].kind == "systematic"
    assert frame.iloc[0].channel == 7 and frame.iloc[0].ratio_to_median > 10
    # our own numbers: the abs-max of that input, recorded with a plain hook over the same batches
    seen = []
    handle = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(
        lambda m, a: seen.append(a[0].detach().abs().amax((0, 1))))
    with torch.no_grad():
        for b in calib:
            model(**b)
    handle.remove()
    mine = torch.stack(seen).amax(0)
    row = frame[(frame.layer == "model.layers.0.self_attn.q_proj") & (frame.channel == 7)].iloc[0]
    assert row.absmax == pytest.approx(float(mine[7]), rel=1e-6)
    assert row.ratio_to_median == pytest.approx(float(mine[7]) / float(np.median(mine.double().numpy())), rel=1e-6)
    assert_unchanged(model, before)

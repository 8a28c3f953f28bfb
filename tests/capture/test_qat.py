"""qviz.watch on real QAT runs of the demo model (eager prepare_qat and FX prepare_qat_fx):
snapshots, events, detectors, Session.from_qat, the session file, bounded storage, Lightning."""

from __future__ import annotations

import copy
import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.ao import quantization as tq
from torch.ao.nn.intrinsic.qat import freeze_bn_stats, update_bn_stats
from torch.ao.quantization.quantize_fx import prepare_qat_fx

import qviz
from qviz.analysis.qat_detectors import Thresholds, diagnose
from qviz.capture.qat import QvizCallback, Recorder, combine, timeline_histogram
from qviz.demo import calibration_batches, load_demo_model, load_digits_split
from qviz.errors import ConfigError, QvizError
from qviz.flows.layers import is_fake_quant
from qviz.io.results_file import load_timeline, save_timeline
from tests.helpers import model_snapshot

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning"
)

X, Y = load_digits_split()["train"]
BATCH = 32
OSCILLATION = {"scale_oscillation", "zero_point_oscillation", "weight_oscillation"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Two OpenMP threads on a loaded 2-core machine make each step 30x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def qat_model(flow: str, qconfig_mapping=None) -> nn.Module:
    model = copy.deepcopy(load_demo_model()).train()
    if flow == "fx":
        mapping = qconfig_mapping or tq.get_default_qat_qconfig_mapping("x86")
        return prepare_qat_fx(model, mapping, (X[:BATCH],))
    model.qconfig = tq.get_default_qat_qconfig("x86")
    tq.fuse_modules_qat(model, model.fusion_groups(), inplace=True)
    return tq.prepare_qat(model, inplace=True)


def batch(step: int):
    i = (step * BATCH) % (len(X) - BATCH)
    return X[i : i + BATCH], Y[i : i + BATCH]


def train(model, steps, *, lr=0.01, every=1, histograms_every=10, before_step=None, scale_input=None,
          after_forward=None, **options) -> Recorder:
    """SGD on the digits; ``before_step(model, step)`` runs before each forward."""
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    with qviz.watch(model, every=every, histograms_every=histograms_every, **options) as rec:
        for step in range(steps):
            if before_step is not None:
                before_step(model, step)
            x, y = batch(step)
            if scale_input is not None:
                x = x * scale_input(step)
            loss = nn.functional.cross_entropy(model(x), y)
            if after_forward is not None:
                after_forward(model, step, x)
            loss.backward()
            opt.step()
            opt.zero_grad()
            rec.log(loss=loss.item(), lr=lr)
    return rec


def fake_quants(model):
    """Every fake-quant by every name (FX shares one between down_conv, pool and flatten)."""
    return {name: m for name, m in model.named_modules(remove_duplicate=False) if is_fake_quant(m)}


# -- snapshots -----------------------------------------------------------------------------------
@pytest.mark.parametrize("flow", ["eager", "fx"])
def test_snapshots_match_the_buffers_at_their_steps(flow):
    """Every kept snapshot equals the model's own buffers right after that step's forward, through
    two halvings of a small buffer (8 rows, a snapshot every step: 30 steps keep every 4th)."""
    model = qat_model(flow)
    seen, ints = {}, {}
    fc1_fq = model.fc1.weight_fake_quant

    def after_forward(m, step, x):
        seen[step] = {n: {"scale": fq.scale.clone(), "zero_point": fq.zero_point.clone(),
                          "min": fq.activation_post_process.min_val.clone(),
                          "max": fq.activation_post_process.max_val.clone(),
                          "flags": (int(fq.fake_quant_enabled[0]), int(fq.observer_enabled[0]))}
                      for n, fq in fake_quants(m).items()}
        scale, zp = fc1_fq.scale.clone(), fc1_fq.zero_point.clone()
        out = torch.fake_quantize_per_channel_affine(m.fc1.weight.detach(), scale, zp, 0, -128, 127)
        ints[step] = torch.round(out / scale[:, None]) + zp[:, None]

    rec = train(model, 30, every=1, histograms_every=2, max_snapshots=8, max_histograms=4,
                after_forward=after_forward)
    tl = rec.timeline()
    steps = tl.arrays["steps"]
    assert tl.meta["snapshot_stride"] == 4 and steps.tolist() == [0, 4, 8, 12, 16, 20, 24, 28]
    assert tl.arrays["hist_steps"].tolist() == [0, 8, 16, 24] and tl.meta["histogram_stride"] == 8
    points = tl.points_frame()
    assert set(points.index) == set(fake_quants(model))
    assert (points[points.role == "weight"].layer.tolist()
            == ["stem_conv", "block_conv1", "block_conv2", "down_conv", "fc1", "fc2"])
    for name in points.index:
        for quantity in ("scale", "zero_point", "min", "max"):
            _, values = tl.series(name, quantity)
            want = np.stack([seen[s][name][quantity].reshape(-1).float().numpy() for s in steps])
            np.testing.assert_array_equal(values, want, err_msg=f"{name} {quantity}")
        _, flags = tl.series(name, "flags")
        assert flags.tolist() == [list(seen[s][name]["flags"]) for s in steps]
    _, recorded = tl.series("fc1.weight_fake_quant", "weight_int")
    index = tl.arrays[f"{tl._index('fc1.weight_fake_quant')}/weight_index"]
    want = np.stack([ints[s].reshape(-1)[index].numpy() for s in steps])
    np.testing.assert_array_equal(recorded, want)
    # a histogram holds exactly what the input fake-quant saw at that step
    first = points.index[0]  # FX: activation_post_process_0, eager: quant.activation_post_process
    h = timeline_histogram(tl, first, 16)
    x, _ = batch(16)
    assert h.total == x.numel() and h.min == float(x.min()) and h.max == float(x.max())


def test_the_long_frame_and_the_scalars():
    rec = train(qat_model("fx"), 12, every=5, histograms_every=10)
    tl = rec.timeline()
    df = tl.to_dataframe()
    assert list(df.columns) == ["step", "layer", "point", "role", "quantity", "channel", "value"]
    fc1 = df[(df.point == "fc1.weight_fake_quant") & (df.quantity == "scale")]
    assert sorted(fc1.step.unique()) == [0, 5, 10] and fc1.channel.nunique() == 64
    assert set(df.quantity) == {"scale", "zero_point", "min", "max", "fake_quant_enabled",
                                "observer_enabled", "clip_frac"}
    assert df[df.quantity == "clip_frac"].step.unique().tolist() == [0, 10]
    scalars = tl.scalars()
    assert list(scalars.index) == list(range(12)) and list(scalars.columns) == ["loss", "lr"]
    assert (scalars.lr == 0.01).all() and scalars.loss.gt(0).all()


# -- events --------------------------------------------------------------------------------------
@pytest.mark.parametrize("flow", ["eager", "fx"])
def test_events_are_found_at_the_steps_they_happened(flow):
    """State changes made by the user's own code, between snapshots (every=5), dated exactly."""
    def before_step(model, step):
        if step == 13:
            model.apply(tq.disable_observer)
        if step == 21:
            model.apply(freeze_bn_stats)
        if step == 24:
            update_bn_stats(model.stem_conv)
        if step == 27:
            model.apply(tq.disable_fake_quant)

    model = qat_model(flow)
    tl = train(model, 30, every=5, before_step=before_step).timeline()
    events = tl.events_frame()
    n_fq, convs = len(fake_quants(model)), ["stem_conv", "block_conv1", "block_conv2", "down_conv"]
    by_kind = events.groupby("kind").step.agg(["min", "max", "count"])
    assert by_kind.loc["observer_disabled"].tolist() == [13, 13, n_fq]
    assert by_kind.loc["bn_frozen"].tolist() == [21, 21, 4]
    assert by_kind.loc["bn_unfrozen"].tolist() == [24, 24, 1]
    assert by_kind.loc["fake_quant_disabled"].tolist() == [27, 27, n_fq]
    assert len(by_kind) == 4
    assert sorted(events[events.kind == "bn_frozen"].layer) == sorted(convs)
    assert events[events.kind == "bn_unfrozen"].point.tolist() == ["stem_conv.bn"]
    assert "freeze_bn=True" in events[events.kind == "bn_frozen"].detail.iloc[0]


# -- detectors -----------------------------------------------------------------------------------
@pytest.mark.parametrize("flow", ["eager", "fx"])
def test_oscillation_from_a_too_high_learning_rate_is_detected_a_sane_one_is_not(flow):
    high = diagnose(train(qat_model(flow), 40, lr=0.5).timeline())
    sane = diagnose(train(qat_model(flow), 40, lr=0.01).timeline())
    assert not OSCILLATION & set(sane.detector), sane
    found = high[high.detector == "weight_oscillation"]
    assert {"stem_conv", "block_conv1", "block_conv2", "down_conv"} <= set(found.layer)
    assert found.fix.str.contains("learning rate").all() and found.evidence.str.contains("levels").all()


def test_scale_oscillation_is_detected():
    """Ranges that follow each batch (averaging_constant=0.5) while the input alternates 1x/6x."""
    act = tq.FusedMovingAvgObsFakeQuantize.with_args(
        observer=tq.MovingAverageMinMaxObserver, averaging_constant=0.5, quant_min=0, quant_max=127)
    mapping = tq.get_default_qat_qconfig_mapping("x86").set_global(
        tq.QConfig(activation=act, weight=tq.default_fused_per_channel_wt_fake_quant))
    model = qat_model("fx", mapping)
    steady = diagnose(train(copy.deepcopy(model), 30).timeline())
    assert not OSCILLATION & set(steady.detector)
    found = diagnose(train(model, 30, scale_input=lambda s: 6.0 if s % 2 else 1.0).timeline())
    scale = found[found.detector == "scale_oscillation"]
    assert scale.layer.tolist() == ["x"]  # BN in training mode renormalises what follows


def test_freezing_a_moving_range_then_saturation_and_bn():
    """Inputs growing 10% a step; observers disabled at step 30; BN never frozen."""
    tl = train(qat_model("eager"), 45, scale_input=lambda s: 1 + 0.1 * s,
               before_step=lambda m, s: s == 30 and m.apply(tq.disable_observer)).timeline()
    found = diagnose(tl)
    moving = found[(found.detector == "range_moving_at_freeze") & (found.layer == "quant")]
    assert moving.end.tolist() == [30] and "observer disabled at step 30" in moving.evidence.iloc[0]
    saturated = found[(found.detector == "saturation") & (found.layer == "quant")]
    assert saturated.end.tolist() == [40]
    bn = found[found.detector == "bn_not_frozen"]
    assert sorted(bn.layer) == ["block_conv1", "block_conv2", "down_conv", "stem_conv"]
    assert bn.evidence.str.contains("never frozen").all()
    # BN frozen early enough: no finding; thresholds are the user's to change
    tl = train(qat_model("eager"), 20, before_step=lambda m, s: s == 10 and m.apply(freeze_bn_stats)).timeline()
    assert "bn_not_frozen" not in set(diagnose(tl).detector)
    assert "bn_not_frozen" in set(diagnose(tl, Thresholds(bn_late=0.4)).detector)
    assert "saturation" not in set(diagnose(train(qat_model("eager"), 20).timeline()).detector)


def test_thresholds_are_validated_and_frozen():
    with pytest.raises(ConfigError, match="share"):
        Thresholds(weight_osc_share=1.5)
    with pytest.raises(ConfigError, match="int"):
        Thresholds(min_snapshots=0)
    with pytest.raises(AttributeError):
        Thresholds().clip_share = 0.5  # type: ignore[misc]
    with pytest.raises(ConfigError, match="Thresholds"):
        diagnose(train(qat_model("fx"), 2).timeline(), {"clip_share": 0.5})


# -- fake-quant vs int8, the session file --------------------------------------------------------
@pytest.mark.parametrize("flow", ["eager", "fx"])
def test_from_qat_compares_fake_quant_with_int8_and_keeps_the_timeline(flow, tmp_path):
    model = qat_model(flow)
    rec = train(model, 20, every=5, before_step=lambda m, s: s == 15 and m.apply(tq.disable_observer))
    before = model_snapshot(model)
    s = qviz.Session.from_qat(model, rec, calibration_batches(2, 16), progress=False)
    after = model_snapshot(model)
    assert after["hooks"] == before["hooks"] and after["training"] == before["training"]
    assert all(torch.equal(v, after["state"][k]) for k, v in before["state"].items())
    df = s.to_dataframe()
    assert list(df.index) == ["stem_conv", "block_conv1", "block_conv2", "down_conv", "fc1", "fc2"]
    assert df.fq_vs_int8_sqnr.between(20, 80).all(), df.fq_vs_int8_sqnr
    # converted as trained: the int8 activation qparams are the fake-quants' own
    fq = model.fc1.activation_post_process if flow == "eager" else model.activation_post_process_8
    assert s.quantized_model().fc1.scale == pytest.approx(float(fq.scale))
    s.save(tmp_path / "qat.qviz")
    loaded = qviz.load(tmp_path / "qat.qviz")
    tl, back = rec.timeline(), loaded.results.timeline
    assert back.to_dataframe().equals(tl.to_dataframe())
    assert back.events == tl.events and back.scalars().equals(tl.scalars())
    name = back.points[0]["name"]
    assert timeline_histogram(back, name, 10).to_arrays().keys() == timeline_histogram(tl, name, 10).to_arrays().keys()
    np.testing.assert_array_equal(timeline_histogram(back, name, 10).counts, timeline_histogram(tl, name, 10).counts)
    assert loaded.to_dataframe().fq_vs_int8_sqnr.equals(df.fq_vs_int8_sqnr)
    save_timeline(tl, tmp_path / "timeline.qviz")
    assert load_timeline(tmp_path / "timeline.qviz").to_dataframe().equals(tl.to_dataframe())
    # files without a timeline (older, or plain sessions) load with None
    plain = qviz.Session(load_demo_model(), calibration_batches(1, 16), progress=False).run()
    plain.save(tmp_path / "plain.qviz")
    assert qviz.load(tmp_path / "plain.qviz").results.timeline is None


def test_combining_ranks_by_hand():
    """combine() of one timeline with itself: same qparams, doubled histogram counts, same means."""
    tl = train(qat_model("fx"), 12, every=5, histograms_every=5).timeline()
    both = combine([tl, tl])
    assert both.meta["world_size"] == 2 and both.events == tl.events
    assert both.scalars().equals(tl.scalars())
    df, once = both.to_dataframe(), tl.to_dataframe()
    assert df.drop(columns="value").equals(once.drop(columns="value"))
    np.testing.assert_allclose(df.value, once.value)
    name = tl.points[0]["name"]
    np.testing.assert_array_equal(timeline_histogram(both, name, 5).counts, 2 * timeline_histogram(tl, name, 5).counts)


# -- the model is left alone ---------------------------------------------------------------------
def test_watch_removes_its_hooks_and_changes_nothing_else():
    model, twin = qat_model("fx"), qat_model("fx")
    before = model_snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        with qviz.watch(model, every=1, histograms_every=1) as rec:
            with torch.no_grad():
                for step in range(6):
                    model(batch(step)[0])
                    twin(batch(step)[0])
                for m in (model, twin):
                    m.eval()(batch(0)[0])  # not a step
                    m.train()
            raise RuntimeError("boom")
    assert rec.step == 6 and model_snapshot(model)["hooks"] == before["hooks"]
    a, b = model.state_dict(), twin.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()
    with pytest.raises(QvizError, match="already recording"):
        with rec:
            rec.start()
    assert model_snapshot(model)["hooks"] == before["hooks"]


def test_watch_refuses_what_it_cannot_record():
    with pytest.raises(ConfigError, match="prepare_qat"):
        qviz.watch(load_demo_model())
    for bad in ({"every": 0}, {"max_snapshots": 7}, {"histograms_every": 0}, {"bins": 3}):
        with pytest.raises((ConfigError, ValueError)):
            qviz.watch(qat_model("fx"), **bad)


# -- storage bound -------------------------------------------------------------------------------
class FiftyLayers(nn.Module):
    """50 Linear(4, 4) layers, each with a per-channel weight fake-quant and an output fake-quant.
    To keep 10,000 steps fast, the layers run on every 10th call only (the steps qviz snapshots);
    other calls return the input. What qviz stores does not depend on those calls."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(50))
        for layer in self.layers:
            layer.weight_fake_quant = tq.default_fused_per_channel_wt_fake_quant()
            layer.activation_post_process = tq.default_fused_act_fake_quant()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if (self.calls - 1) % 10:
            return x
        for layer in self.layers:
            x = layer.activation_post_process(nn.functional.linear(x, layer.weight_fake_quant(layer.weight), layer.bias))
        return x


def test_storage_stays_bounded_over_10000_steps():
    """Documented bound (qviz.capture.qat): per point and snapshot 16*K + 2 bytes (+2 per sampled
    weight), per point and histogram 8*bins + 56 bytes, 8 bytes per row of steps, 16 per scalar."""
    model, x = FiftyLayers().train(), torch.randn(2, 4)
    with torch.no_grad(), qviz.watch(model, every=10, histograms_every=100) as rec:
        for step in range(10_000):
            model(x)
            rec.log(loss=float(step))
    c, h, bins, k, samples = 256, 32, 256, 4, 16  # a 4x4 weight has 16 values to sample
    bound = (50 * (c * (16 * k + 2 + 2 * samples) + h * (8 * bins + 56))  # weight fake-quants
             + 50 * (c * (16 + 2) + h * (8 * bins + 56))  # output fake-quants
             + 8 * (c + h) + 4096 * 16)  # steps, one scalar
    assert rec.nbytes() <= rec.max_nbytes() <= bound < 8 * 2**20
    tl = rec.timeline()
    steps, hsteps = tl.arrays["steps"], tl.arrays["hist_steps"]
    assert tl.meta["steps"] == 10_000 and len(steps) <= c and len(hsteps) <= h
    assert steps[0] == 0 and steps[-1] >= 9_900 and (np.diff(steps) == tl.meta["snapshot_stride"]).all()
    assert hsteps[-1] >= 9_000 and (np.diff(hsteps) == tl.meta["histogram_stride"]).all()
    assert timeline_histogram(tl, tl.points[1]["name"], int(hsteps[-1])).total == 2 * 4
    loss = tl.scalars().loss
    assert len(loss) <= 4096 and loss.index[-1] >= 9_990 and (loss.index == loss.to_numpy()).all()


@pytest.mark.slow
def test_memory_the_recorder_holds_stops_growing():
    """Python-side memory (tracemalloc: numpy buffers, events, dicts; not torch's allocator) of a
    recorder snapshotting every step and a histogram every 4th: once its buffers are full, 6,000
    more steps add nothing that stays (the issue measured +35 MiB flat over 20,000 steps)."""
    import gc
    import tracemalloc

    torch.manual_seed(0)
    model = prepare_qat_fx(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).train(),
                           tq.get_default_qat_qconfig_mapping("x86"), (torch.randn(2, 8),))
    x = torch.randn(2, 8)
    tracemalloc.start()
    try:
        with torch.no_grad(), qviz.watch(model, every=1, histograms_every=4, max_snapshots=64,
                                         max_histograms=16, max_scalars=256) as rec:
            held = []
            for step in range(8_000):
                model(x)
                rec.log(loss=float(step))
                if step + 1 in (2_000, 8_000):
                    gc.collect()
                    held.append(tracemalloc.get_traced_memory()[0])
    finally:
        tracemalloc.stop()
    assert rec.step == 8_000 and rec.nbytes() <= rec.max_nbytes()
    assert held[1] - held[0] < 64 * 2**10, f"+{(held[1] - held[0]) / 2**10:.0f} KiB over 6,000 steps"


# -- Lightning -----------------------------------------------------------------------------------
def test_lightning_callback_without_lightning_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "lightning", None)
    monkeypatch.setitem(sys.modules, "pytorch_lightning", None)
    with pytest.raises(QvizError, match="pip install lightning"):
        QvizCallback(qviz.watch(qat_model("fx")))


def test_lightning_callback_records_a_fit():
    """Runs only where the optional ``lightning`` extra is installed (importorskip is used for this
    optional extra alone)."""
    pl = pytest.importorskip("lightning.pytorch")
    model = qat_model("eager")

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = model

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    rec = qviz.watch(model, every=2, histograms_every=4)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X[:320], Y[:320]), batch_size=BATCH)
    trainer = pl.Trainer(max_steps=8, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", callbacks=[QvizCallback(rec)])
    trainer.fit(Module(), loader)
    tl = rec.timeline()
    assert tl.meta["steps"] == 8 and tl.arrays["steps"].tolist() == [0, 2, 4, 6]
    assert len(tl.scalars().loss) == 8
    assert model_snapshot(model)["hooks"] == model_snapshot(qat_model("eager"))["hooks"]

"""Real model code: dict batches, integer inputs, structured outputs, in-place activations, errors.

Every per-layer figure is checked against an SQNR computed here from plain torch forward hooks that
CLONE what they record, on the session's own float_model() and quantized_model().
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import transformers
from torch import nn
from torch.ao import quantization as tq
from torch.ao.quantization import get_default_qat_qconfig_mapping
from torch.ao.quantization.quantize_fx import prepare_qat_fx

import qviz
from tests.helpers import assert_unchanged, model_snapshot

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning"
)


# -- plain torch: what the figures must equal ------------------------------------------------------
def _call(model, batch):
    if isinstance(batch, Mapping):
        return model(**batch)
    return model(*batch) if isinstance(batch, tuple) else model(batch)


def _tensor(value):
    return value[0] if isinstance(value, tuple) else value


def _as_float(t):
    return t.dequantize() if t.is_quantized else t.clone()


def _db(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double().flatten(), y.double().flatten()
    noise = float(torch.linalg.vector_norm(x - y))
    return math.inf if noise == 0 else 20 * math.log10(float(torch.linalg.vector_norm(x)) / noise)


def _layer_outputs(model, names, batches) -> dict[str, torch.Tensor]:
    kept = {n: [] for n in names}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: kept[n].append(_as_float(_tensor(o)))) for n in names]
    try:
        with torch.no_grad():
            for b in batches:
                _call(model, b)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat([t.flatten() for t in v]) for n, v in kept.items()}


def own_output_sqnr(session, batches, layers=None) -> dict[str, float]:
    """output_sqnr per layer from cloned hooks on the session's float and quantized models."""
    layers = list(session.to_dataframe().index) if layers is None else layers
    ref = _layer_outputs(session.float_model(), layers, batches)
    quant = _layer_outputs(session.quantized_model(), layers, batches)
    return {n: _db(ref[n], quant[n]) for n in layers}


def _assert_close_db(qviz_db: float, own_db: float, tol=1e-3):
    assert (math.isinf(qviz_db) and math.isinf(own_db)) or abs(qviz_db - own_db) < tol, (qviz_db, own_db)


def _assert_rows_match_own(session, batches):
    table = session.to_dataframe()
    assert len(table) > 0
    own = own_output_sqnr(session, batches)
    for layer in table.index:
        _assert_close_db(table.loc[layer, "output_sqnr"], own[layer])
    quantized = table[table.quantized.astype(bool)]
    assert len(quantized) > 0
    for col in ("output_sqnr", "local_sqnr", "weight_sqnr"):
        assert quantized[col].notna().all() and (quantized[col] > 0).all(), (col, quantized[col])


# -- models --------------------------------------------------------------------------------------
class Act(nn.Module):
    """The issue's in-place repro: conv -> Hardswish(inplace) -> mean -> fc (stubs for eager)."""

    def __init__(self, inplace: bool):
        super().__init__()
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
        self.conv, self.act, self.fc = nn.Conv2d(3, 8, 3), nn.Hardswish(inplace=inplace), nn.Linear(8, 4)

    def forward(self, x):
        return self.dequant(self.fc(self.act(self.conv(self.quant(x))).mean((2, 3))))


class KeywordNet(nn.Module):
    """Takes keyword inputs (input_ids, attention_mask) and returns a dict, as HF models do."""

    def __init__(self):
        super().__init__()
        self.embed, self.proj, self.head = nn.Embedding(50, 16), nn.Linear(16, 16), nn.Linear(16, 5)

    def forward(self, input_ids, attention_mask=None):
        h = torch.relu(self.proj(self.embed(input_ids)))
        h = h.masked_fill(attention_mask.unsqueeze(-1) == 0, 0.0)
        return {"hidden": h, "logits": self.head(h.mean(1))}


class RnnLM(nn.Module):
    """Embedding -> LSTM or GRU (returning (output, state)) -> vocabulary logits (batch, seq, vocab)."""

    def __init__(self, rnn=nn.LSTM, vocab=40):
        super().__init__()
        self.embed, self.rnn, self.head = nn.Embedding(vocab, 16), rnn(16, 24, batch_first=True), nn.Linear(24, vocab)

    def forward(self, ids):
        out, _ = self.rnn(self.embed(ids))
        return self.head(out)


def _ids(n=2, vocab=50, shape=(4, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, shape, generator=g) for _ in range(n)]


def _dict_batches(n=2, vocab=99, seed=0):
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids)} for ids in _ids(n, vocab, (2, 8), seed)]


def _bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=37)
    return transformers.BertForSequenceClassification(config).eval()


def _gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=99, n_positions=64)
    return transformers.GPT2LMHeadModel(config).eval()


# -- 4: in-place activations ---------------------------------------------------------------------
@pytest.mark.parametrize("flow", ["fx", "eager"])
def test_inplace_activation_leaves_output_sqnr_as_without(flow):
    torch.manual_seed(0)
    plain, inplace = Act(False), Act(True)
    inplace.load_state_dict(plain.state_dict())
    batches = [torch.randn(4, 3, 12, 12) for _ in range(2)]
    sessions = [qviz.Session(m, batches, eval_data=batches, flow=flow, progress=False).run() for m in (plain, inplace)]
    a, b = (s.to_dataframe() for s in sessions)
    assert a.loc["conv", "output_sqnr"] > 20  # ~0 dB when the reference output was overwritten
    for col in ("output_sqnr", "local_sqnr"):
        assert abs(a.loc["conv", col] - b.loc["conv", col]) < 1e-9, col
    for s in sessions:
        own = own_output_sqnr(s, batches, ["conv", "fc"])
        _assert_close_db(s.to_dataframe().loc["conv", "output_sqnr"], own["conv"])
        _assert_close_db(s.to_dataframe().loc["fc", "output_sqnr"], own["fc"])


def test_fake_quant_vs_int8_unaffected_by_inplace_activation():
    torch.manual_seed(0)
    plain, inplace = Act(False), Act(True)
    inplace.load_state_dict(plain.state_dict())
    batches = [torch.randn(4, 3, 12, 12) for _ in range(2)]
    figures = []
    for model in (plain, inplace):
        qat = prepare_qat_fx(copy.deepcopy(model).train(), get_default_qat_qconfig_mapping("x86"), (batches[0],))
        for x in batches:
            qat(x)
        s = qviz.Session.from_qat(qat, None, batches, eval_data=batches, progress=False)
        figures.append(s.to_dataframe().loc["conv", "fq_vs_int8_sqnr"])
    assert figures[0] > 20 and abs(figures[0] - figures[1]) < 1e-9, figures


def test_qat_watch_and_from_qat_with_dict_batches():
    torch.manual_seed(0)
    batches = [dict(b, attention_mask=b["attention_mask"].float()) for b in _dict_batches(2, 50)]
    first = batches[0]
    mapping = get_default_qat_qconfig_mapping("x86").set_module_name("embed", None)  # torch's QAT embedding wants other qparams
    qat = prepare_qat_fx(KeywordNet().train(), mapping,
                         (first["input_ids"], first["attention_mask"]))
    optimizer = torch.optim.SGD(qat.parameters(), lr=0.01)
    with qviz.watch(qat, every=1, histograms_every=None) as recorder:
        for b in batches * 2:
            optimizer.zero_grad()
            qat(**b)["logits"].sum().backward()
            optimizer.step()
    assert recorder.step == 4
    s = qviz.Session.from_qat(qat, recorder, batches, eval_data=batches, progress=False)
    table = s.to_dataframe()
    quantized = table[table.quantized.astype(bool)]
    assert len(quantized) >= 2 and quantized["fq_vs_int8_sqnr"].notna().all()
    assert all(b["input_ids"].dtype == torch.int64 for b in batches)


# -- 3: integer inputs ---------------------------------------------------------------------------
@pytest.mark.parametrize("flow", ["fx", "dynamic", "torchao"])
def test_token_ids_into_embedding(flow):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(100, 16), nn.Linear(16, 100))
    before = model_snapshot(model)
    batches = _ids(2, 100, (2, 8))
    s = qviz.Session(model, batches, eval_data=batches, flow=flow, progress=False).run()
    assert all(b.dtype == torch.int64 for b in batches)
    seen = []
    handle = s.float_model().get_submodule("0").register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
    s.sensitivity(progress=False)  # runs the reference: its embedding is fed the ids as they are
    handle.remove()
    assert seen and set(seen) == {torch.int64}
    if flow == "dynamic":  # the dynamic flow never quantizes embeddings: no row for it
        assert "0" not in s.to_dataframe().index
    else:
        assert s.to_dataframe().loc["0", "local_sqnr"] == math.inf  # its shadow run took the same ids
    _assert_rows_match_own(s, batches)
    assert_unchanged(model, before)


@pytest.mark.parametrize("flow", ["fx", "dynamic", "torchao"])
@pytest.mark.parametrize("rnn", [nn.LSTM, nn.GRU])
def test_rnn_language_models(flow, rnn):
    torch.manual_seed(0)
    model = RnnLM(rnn).eval()
    before = model_snapshot(model)
    batches = _ids(2, 40, (3, 7))
    s = qviz.Session(model, batches, eval_data=batches, flow=flow, progress=False).run()
    table = s.to_dataframe()
    if flow == "dynamic" and rnn is nn.LSTM:
        assert table.loc["rnn", "quantized"]
    _assert_rows_match_own(s, batches)
    assert_unchanged(model, before)
    out = [(_call(s.float_model(), b), _call(s.quantized_model(), b)) for b in batches]
    agree = sum(int((x.argmax(-1) == y.argmax(-1)).sum()) for x, y in out) / sum(x[..., 0].numel() for x, _ in out)
    assert s.summary()["top1_agreement"] == pytest.approx(agree)  # (batch, seq, vocab): over the last dim


# -- 1 and 2: keyword batches and structured outputs ---------------------------------------------
def test_keyword_batches_and_dict_output_fx_with_sweep():
    torch.manual_seed(0)
    model = KeywordNet().eval()
    before = model_snapshot(model)
    # a float mask: torch's FX mapping observes an int mask (see the error test below)
    batches = [dict(b, attention_mask=b["attention_mask"].float()) for b in _dict_batches(2, 50)]
    s = qviz.Session(model, batches, eval_data=batches, flow="fx", progress=False, example_inputs=batches[0],
                     latency=True).run()
    assert all(b["input_ids"].dtype == torch.int64 for b in batches)
    assert s.summary()["latency_ms"] > 0 and s.summary()["float_latency_ms"] > 0
    _assert_rows_match_own(s, batches)
    logits = [(_call(s.float_model(), b)["logits"], _call(s.quantized_model(), b)["logits"]) for b in batches]
    _assert_close_db(s.summary()["output_sqnr"], _db(torch.cat([x for x, _ in logits]), torch.cat([y for _, y in logits])))
    # the sweep's FX fast path (graph values, positional inputs) equals plain module swaps
    fast = s.sensitivity(progress=False).to_dataframe()
    from qviz.analysis.sensitivity import sweep

    slow = sweep(s.float_model(), s.quantized_model(), s._eval, list(fast.index), progress=False,
                 cache_bytes=0).to_dataframe()
    with ThreadPoolExecutor(2) as pool:  # work units carry the dict batches to their copies
        spread = sweep(s.float_model(), s.quantized_model(), s._eval, list(fast.index), progress=False,
                       executor=pool).to_dataframe()
    assert fast["quantize_only"].notna().all()
    for other in (slow, spread):
        assert (fast["quantize_only"] - other.loc[fast.index, "quantize_only"]).abs().max() < 1e-6
    assert_unchanged(model, before)


@pytest.mark.parametrize("flow", ["dynamic", "torchao"])
def test_output_fn_picks_the_compared_output(flow):
    torch.manual_seed(0)
    model = KeywordNet().eval()
    batches = _dict_batches(2, 50)
    default = qviz.Session(model, batches, eval_data=batches, flow=flow, progress=False).run()
    hidden = qviz.Session(model, batches, eval_data=batches, flow=flow, progress=False, output_fn=lambda out: out["hidden"]).run()
    pairs = [(_call(hidden.float_model(), b), _call(hidden.quantized_model(), b)) for b in batches]
    for session, key in ((default, "logits"), (hidden, "hidden")):
        own = _db(torch.cat([x[key].flatten() for x, _ in pairs]), torch.cat([y[key].flatten() for _, y in pairs]))
        _assert_close_db(session.summary()["output_sqnr"], own)
    assert math.isnan(hidden.summary()["top1_agreement"]) is False  # (batch, seq, hidden) via output_fn
    with pytest.raises(qviz.ConfigError, match="output_fn must return"):
        qviz.Session(model, batches, eval_data=batches, flow=flow, progress=False, output_fn=lambda out: out.keys()).run()


def test_tuple_and_list_outputs_compare_the_first_floating_tensor():
    class Tupled(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x):
            return [torch.argmax(x, 1), (self.b(self.a(x)), self.a(x))]

    torch.manual_seed(0)
    batches = [torch.randn(4, 8) for _ in range(2)]
    s = qviz.Session(Tupled().eval(), batches, eval_data=batches, flow="dynamic", progress=False).run()
    pairs = [(_call(s.float_model(), b)[1][0], _call(s.quantized_model(), b)[1][0]) for b in batches]
    _assert_close_db(s.summary()["output_sqnr"], _db(torch.cat([x for x, _ in pairs]), torch.cat([y for _, y in pairs])))


@pytest.mark.slow
@pytest.mark.parametrize("flow", ["dynamic", "torchao"])
def test_bert_with_dict_batches(flow):
    model = _bert()
    before = model_snapshot(model)
    batches = _dict_batches()
    if flow == "torchao":  # what a tokenizer returns: a mapping, not a dict
        batches = [transformers.BatchEncoding(b) for b in batches]
    s = qviz.Session(model, batches, eval_data=batches, flow=flow, progress=False, latency=True).run()
    assert all(b["input_ids"].dtype == torch.int64 for b in batches)
    _assert_rows_match_own(s, batches)
    summary = s.summary()
    assert math.isfinite(summary["output_sqnr"]) and 0 <= summary["top1_agreement"] <= 1
    assert summary["latency_ms"] > 0
    pairs = [(_call(s.float_model(), b).logits, _call(s.quantized_model(), b).logits) for b in batches]
    _assert_close_db(summary["output_sqnr"], _db(torch.cat([x for x, _ in pairs]), torch.cat([y for _, y in pairs])))
    assert_unchanged(model, before)


def test_gpt2_logits_top1_over_the_vocabulary():
    model = _gpt2()
    batches = _dict_batches()
    s = qviz.Session(model, batches, eval_data=batches, flow="dynamic", progress=False).run()
    _assert_rows_match_own(s, batches)
    pairs = [(_call(s.float_model(), b).logits, _call(s.quantized_model(), b).logits) for b in batches]
    agree = sum(int((x.argmax(-1) == y.argmax(-1)).sum()) for x, y in pairs) / sum(x[..., 0].numel() for x, _ in pairs)
    assert s.summary()["top1_agreement"] == pytest.approx(agree)


@pytest.mark.slow
def test_bert_pt2e_with_dict_batches():
    model = _bert()
    before = model_snapshot(model)
    batches = _dict_batches()
    s = qviz.Session(model, batches, eval_data=batches, flow="pt2e", progress=False).run()
    _assert_rows_match_own(s, batches)  # the layers' taps in the float and quantized graphs
    pairs = [(_call(s.float_model(), b).logits, _call(s.quantized_model(), b).logits) for b in batches]
    _assert_close_db(s.summary()["output_sqnr"], _db(torch.cat([x for x, _ in pairs]), torch.cat([y for _, y in pairs])))
    assert_unchanged(model, before)


# -- 5: errors that blame the data wrongly -------------------------------------------------------
class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        out = self.conv(x)
        out += x  # a float add on quantized tensors: eager mode cannot run it
        return out


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
        self.stem, self.block = nn.Conv2d(3, 4, 3, padding=1), Residual()

    def forward(self, x):
        return self.dequant(self.block(self.stem(self.quant(x))))


@pytest.mark.parametrize("eval_given", [False, True])
def test_op_the_backend_cannot_run_is_a_model_error(eval_given):
    batches = [torch.randn(2, 3, 8, 8)]
    kwargs = {"eval_data": batches} if eval_given else {}
    with pytest.raises(qviz.ModelError) as info:
        qviz.Session(Net(), batches, flow="eager", progress=False, **kwargs).run()
    message = str(info.value)
    assert ("eval_data[0]" if eval_given else "calib_data[0]") in message
    assert "'block' (Residual)" in message and "out += x" in message
    assert "aten::add.out" in message and "FloatFunctional" in message and "flow='fx'" in message


def test_float_model_failing_on_a_batch_stays_a_data_error():
    batches = [torch.randn(2, 3, 8, 8), torch.randn(2, 5, 8, 8)]
    with pytest.raises(qviz.InputDataError, match=r"calib_data\[1\].*\(2, 5, 8, 8\)"):
        qviz.Session(Act(False), batches, flow="fx", progress=False).run()


def test_a_generator_raising_midway_is_reported_as_what_it_is():
    def data():
        yield torch.randn(4, 3, 8, 8)
        raise TypeError("the loader broke")

    with pytest.raises(qviz.InputDataError, match=r"raised TypeError while producing calib_data\[1\]: the loader broke") as info:
        qviz.Session(Act(False), data(), progress=False)
    assert "must be an iterable" not in str(info.value)
    with pytest.raises(qviz.InputDataError, match="must be an iterable"):
        qviz.Session(Act(False), 3, progress=False)


def test_integer_tensor_meeting_an_observer_is_a_model_error():
    class MaskMul(nn.Module):  # torch's default FX mapping observes the int mask: histc fails on it
        def __init__(self):
            super().__init__()
            self.embed, self.head = nn.Embedding(50, 8), nn.Linear(8, 3)

        def forward(self, input_ids, attention_mask):
            return self.head(self.embed(input_ids) * attention_mask.unsqueeze(-1))

    with pytest.raises(qviz.ModelError, match=r"an integer tensor \(int64\) reaches the quantization point") as info:
        qviz.Session(MaskMul(), _dict_batches(1, 50), flow="fx", progress=False).run()
    message = str(info.value)  # not blamed on the data: it names the model's line and the fix
    assert "the model input `attention_mask` going into the method `.unsqueeze()`" in message
    assert "attention_mask.unsqueeze(-1)" in message and "set_object_type('unsqueeze', None)" in message
    assert "calib_data" not in message


def test_quantized_layer_fed_a_float_tensor_names_the_layer():
    class NoStubBeforeHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
            self.conv, self.head = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.head(self.dequant(self.conv(self.quant(x))))  # head quantized, fed float

    with pytest.raises(qviz.ModelError, match=r"quantized model failed on eval_data\[0\]") as info:
        batches = [torch.randn(2, 3, 8, 8)]
        qviz.Session(NoStubBeforeHead(), batches, eval_data=batches, flow="eager", progress=False).run()
    assert "in 'head' (Conv2d)" in str(info.value) and "QuantStub before" in str(info.value)

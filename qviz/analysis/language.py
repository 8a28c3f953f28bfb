"""Language-model metrics: perplexity and next-token agreement of a causal LM.

The labels are the inputs shifted by one (position t predicts token t+1), as Hugging Face's
causal LMs compute their loss; positions whose target is padding (``attention_mask`` 0) do not
count. :class:`Perplexity` is an ``eval_fn`` for ``Session.sensitivity()`` and ``search()``
(higher is better, so it returns minus the perplexity): the sweep then ranks layers by the
perplexity they cost, and ``search(eval_fn=Perplexity(batches), max_drop=0.5)`` allows half a
point of perplexity.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from qviz.analysis.compare import model_output
from qviz.errors import InputDataError
from qviz.flows.base import call_model, split_batch


def _tokens(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    args, kwargs = split_batch(batch)
    ids = kwargs.get("input_ids", args[0] if args else None)
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.dim() != 2:
        raise InputDataError("perplexity needs batches of token ids: a (batch, seq) integer tensor, or a dict "
                             "with 'input_ids' (and optionally 'attention_mask')")
    return ids, kwargs.get("attention_mask")


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None) -> tuple[float, int]:
    """(sum of next-token negative log-likelihoods, number of predicted tokens) of one batch."""
    if logits.dim() != 3 or logits.shape[:2] != ids.shape:
        raise InputDataError(f"perplexity needs (batch, seq, vocab) logits for (batch, seq) ids; the model's "
                             f"output has shape {tuple(logits.shape)}: pass output_fn= to pick the logits")
    targets = ids[:, 1:]
    keep = torch.ones_like(targets, dtype=torch.bool) if mask is None else mask[:, 1:].bool()
    nll = F.cross_entropy(logits[:, :-1].double().flatten(0, 1), targets.flatten(), reduction="none")
    return float(nll[keep.flatten()].sum()), int(keep.sum())


@torch.no_grad()
def perplexity(model: torch.nn.Module, batches, output_fn=None) -> float:
    """exp of the mean next-token negative log-likelihood over every predicted token."""
    total, count = 0.0, 0
    for batch in batches:
        ids, mask = _tokens(batch)
        nll, n = next_token_nll(model_output(call_model(model, batch), output_fn), ids, mask)
        total, count = total + nll, count + n
    return math.exp(total / count) if count else math.nan


@torch.no_grad()
def next_token_agreement(reference: torch.nn.Module, model: torch.nn.Module, batches, output_fn=None) -> float:
    """Share of predicted positions where ``model``'s most likely next token is ``reference``'s."""
    same, count = 0, 0
    for batch in batches:
        _, mask = _tokens(batch)
        a = model_output(call_model(reference, batch), output_fn).argmax(-1)[:, :-1]
        b = model_output(call_model(model, batch), output_fn).argmax(-1)[:, :-1]
        keep = torch.ones_like(a, dtype=torch.bool) if mask is None else mask[:, 1:].bool()
        same, count = same + int((a == b)[keep].sum()), count + int(keep.sum())
    return same / count if count else math.nan


class Perplexity:
    """``eval_fn(model)`` = minus the perplexity on ``batches`` (higher is better)."""

    __name__ = "neg_perplexity"

    def __init__(self, batches, output_fn=None):
        self.batches, self.output_fn = list(batches), output_fn
        for batch in self.batches:
            _tokens(batch)  # refuse batches without token ids now, not inside a sweep

    def __call__(self, model: torch.nn.Module) -> float:
        return -perplexity(model, self.batches, self.output_fn)

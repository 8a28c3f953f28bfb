"""The causal-LM demo: TinyLM, a byte-level decoder-only transformer trained on the Python
standard library's own sources, with its weights shipped in the package (no download).

The text is every top-level ``*.py`` file of the running interpreter's standard library
(``Path(os.__file__).parent``), in name order; :data:`HELD_OUT` files are never trained on and
give the evaluation text, the others the training and calibration text. Tokens are bytes
(vocabulary 256), so there is no tokenizer to ship; the uniform baseline perplexity is 256.

The model is a plain ``nn.Module`` of ``nn.Linear`` layers (query/key/value/output projections
and a two-layer MLP per block, and the output head), so every flow has linears to quantize.
The demo's flow is torchao's ``quantize_`` with int8 dynamic activations and int8 weights (the
usual first step for an LLM on CPU; the embeddings stay float rows); its metric is perplexity
(:mod:`qviz.analysis.language`): give ``Perplexity(eval_batches())`` to ``sensitivity()`` and
``search()`` to rank layers by the perplexity they cost.

``load_tinylm()`` gives the trained model; ``tinylm_session_inputs()`` gives it with
calibration and evaluation batches; ``tinylm_session()`` runs the session (``qviz demo --model
tinylm`` prints it, ``qviz serve --demo tinylm`` serves it). Retrain with ``python -m
qviz.demo.train_tinylm``.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qviz.analysis.language import perplexity
from qviz.errors import QvizError

WEIGHTS_PATH = Path(__file__).with_name("tinylm.npz")
VOCAB = 256  # bytes
CONTEXT = 128  # tokens per window: the longest input the position table covers
#: Standard-library files held out of training: the evaluation text (all present since Python 3.8).
HELD_OUT = ("bisect.py", "colorsys.py", "fnmatch.py", "heapq.py", "shlex.py", "textwrap.py")
DEFAULT_FLOW = "torchao"


class TinyLMWeightsMissingError(QvizError, FileNotFoundError):
    """TinyLM's weights file is not there (never trained, or left out of the install)."""


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then a GELU MLP, each residual."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, 4 * d_model)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * d_model, d_model)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.n_heads, -1)).transpose(1, 2)  # (B, H, T, head dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        att = F.scaled_dot_product_attention(self._heads(self.q_proj(h)), self._heads(self.k_proj(h)),
                                             self._heads(self.v_proj(h)), is_causal=True)
        x = x + self.out_proj(att.transpose(1, 2).flatten(-2))
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class TinyLM(nn.Module):
    """Byte embeddings plus learned positions, ``n_layers`` blocks, a final LayerNorm and a
    linear head. Input: int64 byte ids (N, T) with T <= :data:`CONTEXT`; output: (N, T, 256)
    next-byte logits (position t predicts byte t+1)."""

    def __init__(self, n_layers: int = 3, d_model: int = 128, n_heads: int = 4):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d_model)
        self.pos = nn.Embedding(CONTEXT, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.pos(torch.arange(ids.size(1), device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def stdlib_dir() -> Path:
    """The running interpreter's standard-library folder (where ``os.py`` is)."""
    return Path(os.__file__).parent


@lru_cache(maxsize=2)
def _corpus(held_out: bool) -> torch.Tensor:
    files = [p for p in sorted(stdlib_dir().glob("*.py")) if (p.name in HELD_OUT) == held_out]
    if not files:
        raise QvizError(f"no standard-library sources found under {stdlib_dir()}: TinyLM's text is the "
                        "interpreter's own *.py files (an install without them cannot run this demo)")
    data = b"\n".join(p.read_bytes() for p in files)
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).astype(np.int64))


def train_text() -> torch.Tensor:
    """The training text: every top-level stdlib ``*.py`` file but :data:`HELD_OUT`, as int64 bytes."""
    return _corpus(False)


def held_out_text() -> torch.Tensor:
    """The evaluation text: the :data:`HELD_OUT` files, as int64 bytes."""
    return _corpus(True)


def _windows(text: torch.Tensor, n_batches: int, batch_size: int, what: str) -> list[torch.Tensor]:
    """``n_batches`` batches of consecutive, non-overlapping :data:`CONTEXT`-byte windows from the start."""
    if n_batches < 1 or batch_size < 1:
        raise QvizError(f"{what}: n_batches and batch_size must be >= 1")
    need = n_batches * batch_size * CONTEXT
    if need > len(text):
        raise QvizError(f"{what}: {n_batches} x {batch_size} windows of {CONTEXT} bytes asked, the text has "
                        f"{len(text)} bytes")
    rows = text[:need].view(n_batches, batch_size, CONTEXT)
    return [rows[i].clone() for i in range(n_batches)]


def calibration_batches(n_batches: int = 4, batch_size: int = 8) -> list[torch.Tensor]:
    """Calibration data: windows from the start of the training text, int64 (batch_size, CONTEXT)."""
    return _windows(train_text(), n_batches, batch_size, "calibration_batches")


def eval_batches(n_batches: int = 4, batch_size: int = 16) -> list[torch.Tensor]:
    """Evaluation data: windows of the held-out text (never trained on), int64 (batch_size, CONTEXT)."""
    return _windows(held_out_text(), n_batches, batch_size, "eval_batches")


def load_tinylm(path: str | Path | None = None) -> TinyLM:
    """The trained :class:`TinyLM` in eval mode, from the shipped npz (no pickle involved; the
    architecture's sizes are stored beside the weights)."""
    path = Path(path) if path is not None else WEIGHTS_PATH
    if not path.is_file():
        raise TinyLMWeightsMissingError(
            f"TinyLM weights not found at {path}; create them with `python -m qviz.demo.train_tinylm`")
    with np.load(path, allow_pickle=False) as arrays:
        sizes = {key: int(arrays[f"config.{key}"]) for key in ("n_layers", "d_model", "n_heads")}
        state = {name: torch.from_numpy(arrays[name].astype(np.float32)) for name in arrays.files
                 if not name.startswith("config.")}
    model = TinyLM(**sizes)
    model.load_state_dict(state, strict=True)
    return model.eval()


def tinylm_session_inputs(n_calib: int = 4, n_eval: int = 4):
    """``(model, calibration batches, evaluation batches)`` with the default batch sizes."""
    return load_tinylm(), calibration_batches(n_calib), eval_batches(n_eval)


def tinylm_session(flow: str = DEFAULT_FLOW, backend: str = "x86", progress: bool = True, latency: bool = False):
    """TinyLM through ``flow``, run and compared on its logits (a few seconds)."""
    from qviz.session import Session

    model, calib, evals = tinylm_session_inputs()
    return Session(model, calib, flow=flow, backend=backend, eval_data=evals, progress=progress,
                   latency=latency).run()


def perplexity_line(session, n_eval: int = 4) -> str:
    """The held-out perplexity of the session's float and quantized models, as one line."""
    batches = eval_batches(n_eval)
    ref, quant = perplexity(session.float_model(), batches), perplexity(session.quantized_model(), batches)
    return (f"perplexity per byte on held-out standard-library text: float {ref:.3f}, quantized {quant:.3f} "
            f"({quant - ref:+.3f}; uniform guessing: {VOCAB})")

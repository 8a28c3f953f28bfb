"""The embedded demo: a small CNN on scikit-learn's digits with shipped weights, no download.

``load_demo_model()`` gives the trained float model; ``demo_session_inputs()`` gives it with
calibration and evaluation batches, ready for a qviz session; ``demo_session()`` runs that session
(what ``qviz demo`` prints and ``qviz serve --demo`` serves). Retrain with
``python -m qviz.demo.train``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from qviz.demo.data import (
    accuracy,
    calibration_batches,
    eval_batches,
    eval_labels,
    load_digits_split,
    preprocess,
)
from qviz.demo.model import DigitsNet
from qviz.errors import ConfigError, QvizError

WEIGHTS_PATH = Path(__file__).with_name("digits_cnn.npz")

__all__ = [
    "session_factory",
    "WEIGHTS_PATH",
    "DemoWeightsMissingError",
    "DigitsNet",
    "accuracy",
    "calibration_batches",
    "demo_session",
    "demo_session_inputs",
    "eval_batches",
    "eval_labels",
    "load_demo_model",
    "load_digits_split",
    "preprocess",
]


class DemoWeightsMissingError(QvizError, FileNotFoundError):
    """The demo's weights file is not there (never trained, or left out of the install)."""


def load_demo_model(path: str | Path | None = None) -> DigitsNet:
    """The trained :class:`DigitsNet` in eval mode, from the shipped npz (no pickle involved)."""
    path = Path(path) if path is not None else WEIGHTS_PATH
    if not path.is_file():
        raise DemoWeightsMissingError(
            f"demo weights not found at {path}; create them with `python -m qviz.demo.train`"
        )
    model = DigitsNet()
    with np.load(path, allow_pickle=False) as arrays:
        state = {name: torch.from_numpy(arrays[name].copy()) for name in arrays.files}
    model.load_state_dict(state, strict=True)
    return model.eval()


def demo_session_inputs() -> tuple[DigitsNet, list[torch.Tensor], list[torch.Tensor]]:
    """``(model, calibration_batches(), eval_batches())`` with the default batch sizes."""
    return load_demo_model(), calibration_batches(), eval_batches()


def demo_session(flow: str = "fx", backend: str = "x86", progress: bool = True, latency: bool = False):
    """The embedded demo model through ``flow``, run and compared (a few seconds)."""
    from qviz.session import Session

    model, calib, evals = demo_session_inputs()
    return Session(model, calib, flow=flow, backend=backend, eval_data=evals, progress=progress,
                   latency=latency).run()


def session_factory(path=None, *, demo: bool | str = False, check: bool = True) -> Callable:
    """The sessions to serve: a fresh demo session per call (each visitor may apply; ``demo``
    True or "digits": the embedded digits CNN, "minilm": all-MiniLM-L6-v2, see
    :mod:`qviz.demo.minilm`, "tinylm": the small causal LM of :mod:`qviz.demo.tinylm`), or the session file at ``path`` loaded once (never a pickle) and
    the same Session returned to every visitor. Sharing it is safe: a loaded session holds
    results only, and nothing in the dashboard changes them (apply, sweeps and searches refuse
    to run on it). ``check`` loads the file (or checks the MiniLM demo's packages) now, so a bad
    path or a missing package fails here rather than in every tab."""
    if (path is None) == (not demo):
        raise ConfigError("give a session file path or demo=True (one of them)")
    if demo == "minilm":
        from qviz.demo import minilm

        if check:
            minilm.check_available()
        return lambda: minilm.minilm_session(progress=False)
    if demo == "tinylm":
        from qviz.demo import tinylm

        if check:
            tinylm.load_tinylm()  # the shipped weights are there (a clear error now, not per tab)
        return lambda: tinylm.tinylm_session(progress=False)
    if demo:
        if demo not in (True, "digits"):
            raise ConfigError(f"demo must be True, 'digits', 'minilm' or 'tinylm', not {demo!r}")
        return lambda: demo_session(progress=False)
    from qviz.session import load

    loaded = functools.cache(functools.partial(load, Path(path)))
    if check:
        loaded()
    return loaded
